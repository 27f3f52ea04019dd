// A whole ExpertMesh cluster as separate processes on loopback: one router-service,
// shards x replicas expert-service processes, one attention-service and optionally the
// gateway, each on a free port, started in dependency order and awaited through their
// grpc.health.v1 endpoints. `expertmesh up` runs one for an operator; the cluster tests
// run the same thing, so what they test is what an operator starts.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "service-common/tls.h"
#include "tools/launcher/process.h"

namespace expertmesh::launcher {

struct ClusterOptions {
  std::string model_dir;
  int shards = 1;    // shard groups
  int replicas = 1;  // replicas per shard group
  bool gateway = false;
  int gateway_http_port = 0;  // the gateway's OpenAI HTTP port; 0 = a free port
  // HTTPS on the gateway's HTTP port (its --http-tls-cert/--http-tls-key/--http-tls-ca); the
  // client CA is optional.
  std::string gateway_http_tls_cert, gateway_http_tls_key, gateway_http_tls_ca;
  // Where the service binaries are: <bin_dir>/<name> or <bin_dir>/<name-dir>/<name> (a
  // build tree). Empty: FindBinDir().
  std::string bin_dir;
  std::string log_dir;  // one <service>.log per process; empty: a fresh directory under /tmp
  std::string host = "127.0.0.1";
  // attention-service settings
  int kv_blocks = 1024;
  int kv_block_size = 16;
  int max_batch = 64;
  int max_waiting = 256;
  int prefill_chunk = 64;
  int step_deadline_ms = 2000;
  std::string combine = "exact";  // --combine: exact or partial (dispatcher/dispatcher.h)
  // --micro-batches: ping-pong micro-batches per step (core/engine/micro_batch_engine.h); 1 = off
  int micro_batches = 2;
  std::vector<std::string> extra_router_args;
  std::vector<std::string> extra_attention_args;
  std::vector<std::string> extra_expert_args;
  std::vector<std::string> extra_gateway_args;
  // mTLS for the whole cluster (all three files or none): every service is started with
  // --tls-cert/--tls-key/--tls-ca, and the launcher's own health checks present the same
  // certificate. One certificate for all services, so it must name the host they listen on
  // (e.g. IP:127.0.0.1) and allow both server and client use.
  TlsFiles tls;
  absl::Duration ready_timeout = absl::Seconds(60);
  absl::Duration stop_grace = absl::Seconds(10);
};

struct Endpoint {
  std::string name;
  std::string grpc_address;  // host:port
  int metrics_port = 0;      // 0 = none
};

class Cluster {
 public:
  // Starts every process and waits until each reports SERVING (the attention service only
  // does once its router map covers every shard). On failure, stops what was started and
  // returns the error with the tail of the failing service's log.
  static absl::StatusOr<std::unique_ptr<Cluster>> Start(const ClusterOptions& options);
  ~Cluster();  // Stop()

  const ClusterOptions& options() const { return options_; }
  const Endpoint& router() const { return router_; }
  const Endpoint& attention() const { return attention_; }
  const std::optional<Endpoint>& gateway() const { return gateway_; }
  const Endpoint& expert(int shard, int replica) const;
  std::vector<Endpoint> AllEndpoints() const;
  const std::string& log_dir() const { return log_dir_; }

  // The process of a shard replica (nullptr once killed).
  ChildProcess* expert_process(int shard, int replica);
  // Sends `sig` to a shard replica and waits for it to exit (SIGKILL = a crash).
  absl::Status KillExpert(int shard, int replica, int sig);
  // Starts a (killed) shard replica again on a fresh port and waits until it is SERVING.
  absl::Status RestartExpert(int shard, int replica);
  // Processes that exited although nobody stopped them (name and exit description).
  std::vector<std::string> UnexpectedExits();

  // Stops gateway, attention, experts, router in that order (SIGTERM, grace, SIGKILL).
  // Returns the first error (a service that did not exit cleanly).
  absl::Status Stop();

 private:
  struct Member {
    Endpoint endpoint;
    std::unique_ptr<ChildProcess> process;
  };
  explicit Cluster(ClusterOptions options) : options_(std::move(options)) {}
  absl::Status StartAll();
  absl::StatusOr<Member> StartService(const std::string& name, const std::string& binary,
                                      std::vector<std::string> args, int port, int metrics_port);
  absl::Status StartExpert(int shard, int replica);
  std::vector<std::string> ExpertArgs(int shard, int replica, int port, int metrics_port) const;
  // --tls-cert/--tls-key/--tls-ca when options_.tls is enabled; nothing otherwise.
  std::vector<std::string> TlsArgs() const;
  absl::Status WaitMember(const std::string& address, ChildProcess* process) const;

  ClusterOptions options_;
  std::shared_ptr<grpc::ChannelCredentials> credentials_;  // the launcher's health checks
  std::string bin_dir_;
  std::string log_dir_;
  Endpoint router_;
  Endpoint attention_;
  std::optional<Endpoint> gateway_;
  std::unique_ptr<ChildProcess> router_process_;
  std::unique_ptr<ChildProcess> attention_process_;
  std::unique_ptr<ChildProcess> gateway_process_;
  std::map<std::pair<int, int>, Member> experts_;  // (shard, replica)
  bool stopped_ = false;
};

// The directory holding the service binaries: $EXPERTMESH_BIN_DIR, else the build tree the
// running executable belongs to (found by walking up from /proc/self/exe until a directory
// with router/router-service exists), else the executable's own directory.
std::string FindBinDir();
// <bin_dir>/<name>, or <bin_dir>/<subdir>/<name> in a build tree; NotFound naming both.
absl::StatusOr<std::string> FindServiceBinary(const std::string& bin_dir, const std::string& name,
                                              const std::string& subdir);

// Polls grpc.health.v1 on `address` until the service is ready or `timeout`; also fails early
// when `process` (if given) has exited. Ready: the attention service's and the gateway's named
// status (readiness: their "" is liveness, SERVING before their dependencies are), Check("")
// for a server that registers neither name (router, shards: one status for both). `credentials`
// null: the process-wide TLS setting.
absl::Status WaitServing(const std::string& address, absl::Duration timeout,
                         ChildProcess* process = nullptr,
                         std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);

}  // namespace expertmesh::launcher
