// The start-up every service binary shares: the common flags, one exit-code convention, logs,
// signals, /metrics and run-until-signal. A service main is then
//
//   ServiceMain main("router", "router-service: ...", {.listen = "127.0.0.1:7000"});
//   ... main.app().add_option(...) for the service's own flags ...
//   if (std::optional<int> exit = main.Parse(argc, argv)) return *exit;
//   ... start; on failure: return main.StartFailed(status);
//   return main.RunUntilSignal([&] { server->Shutdown(); });
//
// Exit codes: 0 after an orderly stop on SIGTERM/SIGINT (and for --help), 1 when the service
// could not start (a file, a port, a peer, a device, a flag combination that cannot serve),
// 2 for flags that do not parse or are out of range (nothing was started).
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <grpcpp/channel.h>
#include <grpcpp/server.h>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "service-common/grpc_util.h"  // SetLive / SetReady / CheckReady
#include "service-common/metrics.h"
#include "service-common/metrics_http.h"

namespace expertmesh {

inline constexpr int kExitOk = 0;
inline constexpr int kExitStartFailed = 1;
inline constexpr int kExitUsage = 2;

struct CommonFlags {
  std::string listen = "127.0.0.1:0";  // gRPC host:port (port 0 = any)
  bool metrics_flags = true;           // --metrics-host/--metrics-port (the gateway serves
                                       // /metrics on its HTTP port instead)
  std::string metrics_host;            // empty: the host of --listen
  int metrics_port = -1;               // 0 = any free port, -1 = off
  std::string log_level = "info";
  // mTLS (all three or none; none = insecure). Used by the gRPC server and every channel.
  std::string tls_cert, tls_key, tls_ca;
};

class ServiceMain {
 public:
  // `service` names the logger ("router", "expert", ...); `description` heads --help.
  ServiceMain(std::string service, std::string description, CommonFlags defaults = {});
  // Drops the process-wide TLS credentials (ResetProcessTls in service-common/tls.h) so that
  // gRPC shuts down before main returns; declare the ServiceMain first in main.
  ~ServiceMain();
  ServiceMain(const ServiceMain&) = delete;
  ServiceMain& operator=(const ServiceMain&) = delete;

  CLI::App& app() { return app_; }
  const CommonFlags& flags() const { return flags_; }

  // Parses the command line, then blocks the termination signals (before any thread starts)
  // and sets up logging. Returns the exit code when the process must end now (--help: 0; a
  // flag error, printed with the usage hint: 2), nullopt to go on.
  std::optional<int> Parse(int argc, char** argv);

  // /metrics for `registry` on --metrics-host (default: the host of --listen, so that what can
  // reach the gRPC port can scrape it, in a pod too) and --metrics-port; null when off.
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> StartMetrics(
      const MetricsRegistry* registry) const;
  // The address /metrics binds.
  std::string MetricsHost() const;

  // Logs why the service could not start; returns kExitStartFailed.
  int StartFailed(const absl::Status& status) const;

  // Blocks until SIGTERM or SIGINT, logs it, runs `stop` (the orderly shutdown); returns 0.
  int RunUntilSignal(const std::function<void()>& stop) const;

 private:
  std::string service_;
  CLI::App app_;
  CommonFlags flags_;
};

// The host part of "host:port", "[v6]:port" or "host" (brackets removed).
std::string HostOf(const std::string& address);

}  // namespace expertmesh
