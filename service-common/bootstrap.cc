#include "service-common/bootstrap.h"

#include <cstdio>

#include "absl/debugging/failure_signal_handler.h"
#include "absl/debugging/symbolize.h"
#include "core/base/status.h"
#include "service-common/grpc_util.h"
#include "service-common/process.h"
#include "service-common/tls.h"
#include "spdlog/spdlog.h"

#if defined(__has_feature)
#define EM_HAS_FEATURE(x) __has_feature(x)
#else
#define EM_HAS_FEATURE(x) 0
#endif

namespace expertmesh {

std::string HostOf(const std::string& address) {
  if (address.starts_with("[")) {
    const size_t close = address.find(']');
    return close == std::string::npos ? address : address.substr(1, close - 1);
  }
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || address.find(':') != colon) return address;  // bare v6
  return address.substr(0, colon);
}

ServiceMain::ServiceMain(std::string service, std::string description, CommonFlags defaults)
    : service_(std::move(service)), app_(std::move(description)), flags_(std::move(defaults)) {
  app_.add_option("--listen", flags_.listen, "gRPC address host:port (port 0 = any)")
      ->capture_default_str();
  if (flags_.metrics_flags) {
    app_.add_option("--metrics-host", flags_.metrics_host,
                    "Address /metrics binds (default: the host of --listen)");
    app_.add_option("--metrics-port", flags_.metrics_port, "Port of /metrics (0 = any, -1 = off)")
        ->check(CLI::Range(-1, 65535))
        ->capture_default_str();
  }
  app_.add_option("--log-level", flags_.log_level, "Log level")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}))
      ->capture_default_str();
  app_.add_option("--tls-cert", flags_.tls_cert,
                  "PEM certificate chain of this service: enables mTLS on the gRPC server and "
                  "every gRPC client (with --tls-key and --tls-ca; reloaded when it changes)");
  app_.add_option("--tls-key", flags_.tls_key, "PEM private key of --tls-cert");
  app_.add_option("--tls-ca", flags_.tls_ca,
                  "PEM CA bundle that peers' certificates (clients' and servers') must chain to");
}

ServiceMain::~ServiceMain() { ResetProcessTls(); }

std::optional<int> ServiceMain::Parse(int argc, char** argv) {
  try {
    app_.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app_.exit(e) == 0 ? kExitOk : kExitUsage;  // exit() prints help or the error
  }
  const TlsFiles tls{.cert = flags_.tls_cert, .key = flags_.tls_key, .ca = flags_.tls_ca};
  if (absl::Status s = ValidateTlsFiles(tls); !s.ok()) {
    std::fprintf(stderr, "%s: %s\n", service_.c_str(), std::string(s.message()).c_str());
    return absl::IsInvalidArgument(s) ? kExitUsage : kExitStartFailed;
  }
  SetProcessTls(tls);
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) && \
    !EM_HAS_FEATURE(address_sanitizer) && !EM_HAS_FEATURE(thread_sanitizer)
  // A crash (SIGSEGV, SIGABRT, ...) writes its stack to stderr (the service's log) before the
  // signal takes its default action (core dump, exit status). Sanitizer builds keep their own
  // handlers, which report more.
  absl::InitializeSymbolizer(argc > 0 ? argv[0] : nullptr);
  absl::InstallFailureSignalHandler(absl::FailureSignalHandlerOptions{});
#endif
  if (absl::Status s = BlockTerminationSignals(); !s.ok()) {
    spdlog::critical("{}: {}", service_, s);
    return kExitStartFailed;
  }
  if (absl::Status s = SetupLogging(service_, flags_.log_level); !s.ok()) {
    spdlog::critical("{}: {}", service_, s);  // (the flag check makes this unreachable)
    return kExitUsage;
  }
  if (tls.enabled()) {
    spdlog::info("mTLS on: cert {}, key {}, CA {} (reloaded when they change)", tls.cert, tls.key,
                 tls.ca);
  }
  return std::nullopt;
}

std::string ServiceMain::MetricsHost() const {
  return flags_.metrics_host.empty() ? HostOf(flags_.listen) : flags_.metrics_host;
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> ServiceMain::StartMetrics(
    const MetricsRegistry* registry) const {
  if (flags_.metrics_port < 0) return nullptr;
  EM_ASSIGN_OR_RETURN(std::unique_ptr<MetricsHttpServer> server,
                      MetricsHttpServer::Start(registry, MetricsHost(), flags_.metrics_port));
  spdlog::info("/metrics on {}:{}", MetricsHost(), server->port());
  return server;
}

int ServiceMain::StartFailed(const absl::Status& status) const {
  spdlog::error("{} cannot start: {}", service_, status);
  return kExitStartFailed;
}

int ServiceMain::RunUntilSignal(const std::function<void()>& stop) const {
  const int sig = WaitForTerminationSignal();
  spdlog::info("signal {} ({}): shutting down", sig, strsignal(sig));
  if (stop) stop();
  spdlog::info("{} stopped", service_);
  return kExitOk;
}

}  // namespace expertmesh
