// The attention service: the sequence owner (docs/ARCHITECTURE.md). AttentionServer loads the
// model without its routed experts, connects a Dispatcher (dispatcher/) that follows the
// router's placement maps and reaches the expert shards, runs the continuous-batching
// Scheduler, and serves expertmesh.v1.AttentionService (Submit, Cancel, GetLoad, Handshake)
// plus grpc health, reflection and /metrics.
//
// Health is NOT_SERVING until the model is loaded and every shard group of the router's map
// has a replica (and again whenever a shard group has none left).
// The gRPC handlers are thin: validate and convert the request (ToGenerationRequest), hand it
// to the scheduler, stream its events back.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "attention-service/scheduler.h"
#include "core/format/safetensors.h"
#include "core/model/experts.h"
#include "core/model/local_experts.h"
#include "core/model/model.h"
#include "dispatcher/dispatcher.h"
#include "expertmesh/v1/attention.grpc.pb.h"
#include "service-common/grpc_util.h"
#include "service-common/metrics.h"
#include "service-common/metrics_http.h"

namespace expertmesh::attention {

struct AttentionServerOptions {
  std::string model_dir;
  std::string router_address;              // placement maps come from here
  ServerOptions server;                    // listen address (port 0 = any)
  std::string metrics_host = "127.0.0.1";  // /metrics binds here (the main: --metrics-host)
  int metrics_port = -1;                   // 0 = any free port, -1 = off
  std::string instance_id = "attention";
  SchedulerOptions scheduler;
  absl::Duration step_deadline = absl::Seconds(10);   // one MoE dispatch, all shards
  absl::Duration attempt_timeout = absl::Seconds(3);  // one shard replica, then failover
  // How the dispatcher combines shard answers (dispatcher/dispatcher.h): exact (per-expert
  // answers, bit-identical to the in-process engine for any placement) or partial.
  CombineMode combine = CombineMode::kExact;
  // Use the shards' framed TCP data plane where the router lists one (DispatcherOptions::
  // data_plane; never under mTLS); false: the gRPC Compute streams only.
  bool data_plane = true;
  absl::Duration default_deadline = absl::Minutes(10);  // a Submit without a deadline
  bool load_progress = false;                           // log loading progress
  // The MTP module's routed experts in this process (drafting without a network round
  // trip); off: on the shards, like every other layer.
  bool local_mtp_experts = true;
};

// SubmitRequest -> SequenceRequest: checks what needs no model (sampling values, limits),
// fills defaults (max_tokens 0 = up to the context, top_p 0 = off), sets the deadline from
// deadline_ms (relative; 0 = default) and the RPC deadline, whichever comes first.
absl::StatusOr<SequenceRequest> ToGenerationRequest(const v1::SubmitRequest& request,
                                                    int64_t max_context, absl::Time now,
                                                    absl::Time rpc_deadline,
                                                    absl::Duration default_deadline);

class AttentionServiceImpl final : public v1::AttentionService::Service {
 public:
  AttentionServiceImpl(v1::PeerIdentity identity, absl::Duration default_deadline)
      : identity_(std::move(identity)), default_deadline_(default_deadline) {}
  void SetScheduler(Scheduler* scheduler) { scheduler_.store(scheduler); }

  grpc::Status Handshake(grpc::ServerContext* ctx, const v1::HandshakeRequest* req,
                         v1::HandshakeResponse* resp) override;
  grpc::Status Submit(grpc::ServerContext* ctx, const v1::SubmitRequest* req,
                      grpc::ServerWriter<v1::TokenEvent>* writer) override;
  grpc::Status Cancel(grpc::ServerContext* ctx, const v1::CancelRequest* req,
                      v1::CancelResponse* resp) override;
  grpc::Status GetLoad(grpc::ServerContext* ctx, const v1::LoadRequest* req,
                       v1::LoadResponse* resp) override;

  // Drain: new Submits get UNAVAILABLE from now on (the gateway opens them elsewhere).
  void StartDraining() { draining_ = true; }
  // Submit streams open now (each until its sequence's last event is written).
  int open_streams() const { return open_streams_.load(); }

 private:
  const v1::PeerIdentity identity_;
  const absl::Duration default_deadline_;
  std::atomic<Scheduler*> scheduler_{nullptr};
  std::atomic<uint64_t> next_id_{1};
  std::atomic<bool> draining_{false};
  std::atomic<int> open_streams_{0};
};

class AttentionServer {
 public:
  // Starts gRPC (NOT_SERVING), loads the model, connects to the router, starts the
  // scheduler; health turns SERVING once every shard group has a replica.
  static absl::StatusOr<std::unique_ptr<AttentionServer>> Start(AttentionServerOptions options);
  ~AttentionServer();  // Shutdown()

  int port() const { return port_; }
  int metrics_port() const { return metrics_http_ ? metrics_http_->port() : 0; }
  Scheduler& scheduler() { return *scheduler_; }
  MetricsRegistry& metrics() { return metrics_; }
  // Waits until SERVING (model loaded and every shard covered).
  absl::Status WaitServing(absl::Duration timeout);
  // SIGTERM: health NOT_SERVING at once (Kubernetes readiness and the gateways' pollers stop
  // choosing this replica), new Submits get UNAVAILABLE, the sequences already accepted run
  // to their end for up to `grace`; then Shutdown(). Returns the sequences the grace cut.
  int Drain(absl::Duration grace);
  // Stops taking requests, ends every live sequence with UNAVAILABLE, stops the server.
  void Shutdown();

 private:
  AttentionServer() = default;
  void MonitorCoverage();

  AttentionServerOptions options_;
  MetricsRegistry metrics_;
  ModelConfig config_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<Dispatcher> dispatcher_;
  std::unique_ptr<LocalExperts> mtp_experts_;  // with local_mtp_experts and drafting
  std::unique_ptr<LayerSplitExperts>
      experts_;  // dispatcher_ below the MTP layers, then mtp_experts_
  // With micro-batches: per micro-batch i, dispatcher_->MicroBatch(i) below the MTP layers,
  // then mtp_experts_ (when held here).
  std::vector<std::unique_ptr<LayerSplitExperts>> micro_batch_experts_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<AttentionServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  int port_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool draining_ = false;  // health stays NOT_SERVING
  bool serving_ = false;
  std::thread monitor_;
};

}  // namespace expertmesh::attention
