#include "tools/launcher/cluster.h"

#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/base/status.h"
#include "service-common/grpc_util.h"
#include "service-common/process.h"
#include "spdlog/spdlog.h"

namespace expertmesh::launcher {
namespace fs = std::filesystem;

std::string FindBinDir() {
  if (const char* env = std::getenv("EXPERTMESH_BIN_DIR"); env != nullptr && *env != '\0') {
    return env;
  }
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return ".";
  for (fs::path dir = self.parent_path(); !dir.empty(); dir = dir.parent_path()) {
    if (fs::exists(dir / "router" / "router-service")) return dir.string();
    if (dir == dir.root_path()) break;
  }
  return self.parent_path().string();
}

absl::StatusOr<std::string> FindServiceBinary(const std::string& bin_dir, const std::string& name,
                                              const std::string& subdir) {
  const fs::path flat = fs::path(bin_dir) / name;
  const fs::path tree = fs::path(bin_dir) / subdir / name;
  for (const fs::path& p : {tree, flat}) {
    if (access(p.c_str(), X_OK) == 0) return p.string();
  }
  return absl::NotFoundError(absl::StrCat("no executable ", name, " at ", tree.string(), " or ",
                                          flat.string(), " (set --bin-dir or EXPERTMESH_BIN_DIR)"));
}

namespace {

// The readiness of whatever service listens there (see WaitServing).
absl::StatusOr<bool> Ready(grpc::Channel& channel) {
  for (const char* name : {"expertmesh.v1.AttentionService", "expertmesh.v1.Gateway"}) {
    absl::StatusOr<bool> ready = CheckHealth(channel, name, absl::Milliseconds(500));
    if (ready.status().code() != absl::StatusCode::kNotFound) return ready;
  }
  return CheckHealth(channel, "", absl::Milliseconds(500));
}

}  // namespace

absl::Status WaitServing(const std::string& address, absl::Duration timeout, ChildProcess* process,
                         std::shared_ptr<grpc::ChannelCredentials> credentials) {
  auto channel = MakeChannel(address, kDefaultMaxMessageBytes, std::move(credentials));
  const absl::Time end = absl::Now() + timeout;
  absl::Status last = absl::UnavailableError("not asked yet");
  while (absl::Now() < end) {
    if (process != nullptr && !process->Running()) {
      return absl::FailedPreconditionError(absl::StrCat(
          process->spec().name, " ", process->ExitDescription(),
          " before serving; its log ends with:\n", TailOfFile(process->spec().log_path)));
    }
    absl::StatusOr<bool> serving = Ready(*channel);
    if (serving.ok() && *serving) return absl::OkStatus();
    last = serving.ok() ? absl::UnavailableError("NOT_SERVING") : serving.status();
    // Start-up is polled: services announce readiness only through grpc health.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat(address, " not SERVING within ",
                                                  absl::FormatDuration(timeout),
                                                  " (last: ", last.ToString(), ")"));
}

absl::StatusOr<std::unique_ptr<Cluster>> Cluster::Start(const ClusterOptions& options) {
  if (options.shards < 1 || options.replicas < 1) {
    return absl::InvalidArgumentError("shards and replicas must be >= 1");
  }
  if (!fs::exists(fs::path(options.model_dir) / "config.json")) {
    return absl::NotFoundError(absl::StrCat("no config.json in ", options.model_dir));
  }
  EM_RETURN_IF_ERROR(ValidateTlsFiles(options.tls));
  std::unique_ptr<Cluster> cluster(new Cluster(options));
  cluster->credentials_ = MakeChannelCredentials(options.tls);
  absl::Status s = cluster->StartAll();
  if (!s.ok()) {
    const absl::Status stop = cluster->Stop();
    if (!stop.ok()) spdlog::warn("while cleaning up: {}", stop.ToString());
    return s;
  }
  return cluster;
}

Cluster::~Cluster() {
  const absl::Status s = Stop();
  if (!s.ok()) spdlog::warn("cluster stop: {}", s.ToString());
}

absl::StatusOr<Cluster::Member> Cluster::StartService(const std::string& name,
                                                      const std::string& binary,
                                                      std::vector<std::string> args, int port,
                                                      int metrics_port) {
  Member m;
  m.endpoint.name = name;
  m.endpoint.grpc_address = absl::StrCat(options_.host, ":", port);
  m.endpoint.metrics_port = metrics_port;
  std::string log_name = name;
  for (char& c : log_name) {
    if (c == '[' || c == ']' || c == ' ') c = '_';
  }
  ProcessSpec spec{name, binary, std::move(args), (fs::path(log_dir_) / (log_name + ".log"))};
  EM_ASSIGN_OR_RETURN(m.process, ChildProcess::Start(spec));
  return m;
}

std::vector<std::string> Cluster::ExpertArgs(int shard, int replica, int port,
                                             int metrics_port) const {
  std::vector<std::string> args = {"--model",        options_.model_dir,
                                   "--shard-id",     std::to_string(shard),
                                   "--num-shards",   std::to_string(options_.shards),
                                   "--listen",       absl::StrCat(options_.host, ":", port),
                                   "--router",       router_.grpc_address,
                                   "--metrics-port", std::to_string(metrics_port),
                                   "--instance-id",  absl::StrCat("shard", shard, "-r", replica)};
  args.insert(args.end(), options_.extra_expert_args.begin(), options_.extra_expert_args.end());
  const std::vector<std::string> tls = TlsArgs();
  args.insert(args.end(), tls.begin(), tls.end());
  return args;
}

std::vector<std::string> Cluster::TlsArgs() const {
  if (!options_.tls.enabled()) return {};
  return {"--tls-cert",     options_.tls.cert, "--tls-key",
          options_.tls.key, "--tls-ca",        options_.tls.ca};
}

absl::Status Cluster::WaitMember(const std::string& address, ChildProcess* process) const {
  return WaitServing(address, options_.ready_timeout, process, credentials_);
}

absl::Status Cluster::StartExpert(int shard, int replica) {
  EM_ASSIGN_OR_RETURN(std::string bin,
                      FindServiceBinary(bin_dir_, "expert-service", "expert-service"));
  EM_ASSIGN_OR_RETURN(int port, PickFreePort());
  EM_ASSIGN_OR_RETURN(int mport, PickFreePort());
  EM_ASSIGN_OR_RETURN(
      Member m,
      StartService(absl::StrCat("expert-service[shard ", shard, " replica ", replica, "]"), bin,
                   ExpertArgs(shard, replica, port, mport), port, mport));
  experts_[{shard, replica}] = std::move(m);
  return absl::OkStatus();
}

absl::Status Cluster::StartAll() {
  bin_dir_ = options_.bin_dir.empty() ? FindBinDir() : options_.bin_dir;
  if (options_.log_dir.empty()) {
    char tmpl[] = "/tmp/expertmesh-cluster-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
    log_dir_ = tmpl;
  } else {
    log_dir_ = options_.log_dir;
    std::error_code ec;
    fs::create_directories(log_dir_, ec);
    if (ec) return absl::PermissionDeniedError(absl::StrCat("cannot create ", log_dir_));
  }
  spdlog::info("cluster logs in {}", log_dir_);

  // 1. Router.
  {
    EM_ASSIGN_OR_RETURN(std::string bin, FindServiceBinary(bin_dir_, "router-service", "router"));
    absl::StatusOr<int> port = PickFreePort();
    absl::StatusOr<int> mport = PickFreePort();
    if (!port.ok() || !mport.ok()) return absl::UnavailableError("no free port");
    std::vector<std::string> args = {"--model",        options_.model_dir,
                                     "--num-shards",   std::to_string(options_.shards),
                                     "--listen",       absl::StrCat(options_.host, ":", *port),
                                     "--metrics-port", std::to_string(*mport)};
    args.insert(args.end(), options_.extra_router_args.begin(), options_.extra_router_args.end());
    const std::vector<std::string> tls = TlsArgs();
    args.insert(args.end(), tls.begin(), tls.end());
    EM_ASSIGN_OR_RETURN(Member m, StartService("router-service", bin, args, *port, *mport));
    router_ = m.endpoint;
    router_process_ = std::move(m.process);
    EM_RETURN_IF_ERROR(WaitMember(router_.grpc_address, router_process_.get()));
  }
  // 2. Expert shards (all started, then awaited, so they load in parallel).
  for (int shard = 0; shard < options_.shards; ++shard) {
    for (int replica = 0; replica < options_.replicas; ++replica) {
      EM_RETURN_IF_ERROR(StartExpert(shard, replica));
    }
  }
  // 3. Attention service (loads its part of the model while the shards load theirs).
  {
    EM_ASSIGN_OR_RETURN(std::string bin,
                        FindServiceBinary(bin_dir_, "attention-service", "attention-service"));
    absl::StatusOr<int> port = PickFreePort();
    absl::StatusOr<int> mport = PickFreePort();
    if (!port.ok() || !mport.ok()) return absl::UnavailableError("no free port");
    std::vector<std::string> args = {"--model",
                                     options_.model_dir,
                                     "--router",
                                     router_.grpc_address,
                                     "--listen",
                                     absl::StrCat(options_.host, ":", *port),
                                     "--metrics-port",
                                     std::to_string(*mport),
                                     "--kv-blocks",
                                     std::to_string(options_.kv_blocks),
                                     "--kv-block-size",
                                     std::to_string(options_.kv_block_size),
                                     "--max-batch",
                                     std::to_string(options_.max_batch),
                                     "--max-waiting",
                                     std::to_string(options_.max_waiting),
                                     "--prefill-chunk",
                                     std::to_string(options_.prefill_chunk),
                                     "--step-deadline-ms",
                                     std::to_string(options_.step_deadline_ms),
                                     "--combine",
                                     options_.combine,
                                     "--micro-batches",
                                     std::to_string(options_.micro_batches)};
    args.insert(args.end(), options_.extra_attention_args.begin(),
                options_.extra_attention_args.end());
    const std::vector<std::string> tls = TlsArgs();
    args.insert(args.end(), tls.begin(), tls.end());
    EM_ASSIGN_OR_RETURN(Member m, StartService("attention-service", bin, args, *port, *mport));
    attention_ = m.endpoint;
    attention_process_ = std::move(m.process);
  }
  for (auto& [key, member] : experts_) {
    EM_RETURN_IF_ERROR(WaitMember(member.endpoint.grpc_address, member.process.get()));
  }
  EM_RETURN_IF_ERROR(WaitMember(attention_.grpc_address, attention_process_.get()));
  // 4. Gateway.
  if (options_.gateway) {
    EM_ASSIGN_OR_RETURN(std::string bin, FindServiceBinary(bin_dir_, "gateway", "gateway"));
    absl::StatusOr<int> port = PickFreePort();
    absl::StatusOr<int> hport =
        options_.gateway_http_port != 0 ? options_.gateway_http_port : PickFreePort();
    if (!port.ok() || !hport.ok()) return absl::UnavailableError("no free port");
    std::vector<std::string> args = {"--model",     options_.model_dir,
                                     "--attention", attention_.grpc_address,
                                     "--listen",    absl::StrCat(options_.host, ":", *port),
                                     "--http-port", std::to_string(*hport)};
    const std::vector<std::string> tls = TlsArgs();
    args.insert(args.end(), tls.begin(), tls.end());
    for (const auto& [flag, value] : {std::pair<const char*, const std::string&>{
                                          "--http-tls-cert", options_.gateway_http_tls_cert},
                                      {"--http-tls-key", options_.gateway_http_tls_key},
                                      {"--http-tls-ca", options_.gateway_http_tls_ca}}) {
      if (!value.empty()) args.insert(args.end(), {flag, value});
    }
    args.insert(args.end(), options_.extra_gateway_args.begin(), options_.extra_gateway_args.end());
    EM_ASSIGN_OR_RETURN(Member m, StartService("gateway", bin, args, *port, *hport));
    gateway_ = m.endpoint;
    gateway_process_ = std::move(m.process);
    EM_RETURN_IF_ERROR(WaitMember(gateway_->grpc_address, gateway_process_.get()));
  }
  return absl::OkStatus();
}

const Endpoint& Cluster::expert(int shard, int replica) const {
  return experts_.at({shard, replica}).endpoint;
}

std::vector<Endpoint> Cluster::AllEndpoints() const {
  std::vector<Endpoint> out = {router_};
  for (const auto& [key, m] : experts_) out.push_back(m.endpoint);
  out.push_back(attention_);
  if (gateway_) out.push_back(*gateway_);
  return out;
}

ChildProcess* Cluster::expert_process(int shard, int replica) {
  auto it = experts_.find({shard, replica});
  return it == experts_.end() ? nullptr : it->second.process.get();
}

absl::Status Cluster::KillExpert(int shard, int replica, int sig) {
  ChildProcess* p = expert_process(shard, replica);
  if (p == nullptr) return absl::NotFoundError("no such shard replica");
  p->Signal(sig);
  if (!p->WaitFor(options_.stop_grace)) {
    return absl::DeadlineExceededError(absl::StrCat(p->spec().name, " still running"));
  }
  experts_[{shard, replica}].process.reset();
  return absl::OkStatus();
}

absl::Status Cluster::RestartExpert(int shard, int replica) {
  if (expert_process(shard, replica) != nullptr) {
    return absl::FailedPreconditionError("replica is running");
  }
  EM_RETURN_IF_ERROR(StartExpert(shard, replica));
  Member& m = experts_[{shard, replica}];
  return WaitMember(m.endpoint.grpc_address, m.process.get());
}

std::vector<std::string> Cluster::UnexpectedExits() {
  std::vector<std::string> out;
  auto check = [&](ChildProcess* p) {
    if (p != nullptr && !p->Running()) {
      out.push_back(absl::StrCat(p->spec().name, " ", p->ExitDescription()));
    }
  };
  if (!stopped_) {
    check(router_process_.get());
    check(attention_process_.get());
    check(gateway_process_.get());
    for (auto& [key, m] : experts_) check(m.process.get());
  }
  return out;
}

absl::Status Cluster::Stop() {
  if (stopped_) return absl::OkStatus();
  stopped_ = true;
  absl::Status first;
  auto stop = [&](std::unique_ptr<ChildProcess>& p) {
    if (p == nullptr) return;
    absl::Status s = p->Stop(options_.stop_grace);
    if (!s.ok()) {
      spdlog::warn("{}", s.ToString());
      if (first.ok()) first = s;
    }
    p.reset();
  };
  stop(gateway_process_);
  stop(attention_process_);
  // Shards stop in parallel: each finishes in-flight work and deregisters.
  for (auto& [key, m] : experts_) {
    if (m.process) m.process->Signal(SIGTERM);
  }
  for (auto& [key, m] : experts_) stop(m.process);
  stop(router_process_);
  return first;
}

}  // namespace expertmesh::launcher
