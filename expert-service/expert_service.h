// An expert shard: holds the routed experts of one shard group (LocalExperts maps only their
// tensors) and serves ExpertService.Compute, a long-lived bidirectional stream on which each
// ExpertRequest is validated before anything is allocated for it, computed, and answered by
// one ExpertResponse (BF16 rows of sum weight * expert(x)). A bad message gets an error in its
// own response; the stream and the service stay up.
//
// Lifecycle (ExpertServer): gRPC up and NOT_SERVING -> weights loaded -> SERVING -> registered
// with the router (heartbeats) ... Drain(): deregister, refuse new work, finish what is in
// flight, stop.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/model/local_experts.h"
#include "dataplane/frame_server.h"
#include "expert-service/registration.h"
#include "expertmesh/v1/expert.grpc.pb.h"
#include "service-common/grpc_util.h"
#include "service-common/metrics.h"

namespace expertmesh {

struct ExpertRequestLimits {
  uint64_t max_request_bytes = 48ull << 20;  // one message, serialized
  uint32_t max_rows = 1 << 16;               // rows in one message
  // The answer's outputs (BF16; n_rows x H partial sums, or n_pairs x H per-expert outputs,
  // up to num_experts_per_tok times more): larger requests are refused (ResourceExhausted)
  // instead of answered with a message the client's transport would refuse. Below the
  // default client limit (kDefaultMaxMessageBytes, 64 MiB) with room for the other fields.
  uint64_t max_response_bytes = 63ull << 20;
  float max_weight = 0.0f;  // largest accepted route weight; 0 = from the config (see .cc)
  // Compute streams open at once; one more is refused with RESOURCE_EXHAUSTED. (Callback
  // streams hold no thread each, so this is their bound.)
  uint32_t max_streams = 64;
  // Connections of the framed TCP data plane open at once (each holds a thread while open);
  // one more is answered with a RESOURCE_EXHAUSTED error frame and closed.
  uint32_t max_data_connections = 128;
};

// Checks everything about a request before it is used; InvalidArgument for malformed
// contents, ResourceExhausted for oversized ones, FailedPrecondition for experts this shard
// does not hold. `holds(layer, expert)`.
absl::Status ValidateExpertRequest(const v1::ExpertRequest& request, const ModelConfig& config,
                                   const ExpertRequestLimits& limits,
                                   const std::function<bool(int, int)>& holds);

// The address a replica registers: `advertise` when given, else the listen host with the
// bound port (a wildcard host becomes 127.0.0.1, with a warning).
std::string AdvertisedAddress(const std::string& advertise, const std::string& listen,
                              int bound_port);

// Compute runs on the gRPC callback API: a ServerBidiReactor per stream reads raw bytes,
// parses, validates and computes each message on the gRPC thread whose read completed, and
// writes the answer from there (no hand-off to a sync-server thread and back). Handshake stays
// a sync method.
class ExpertServiceImpl final
    : public v1::ExpertService::WithRawCallbackMethod_Compute<v1::ExpertService::Service> {
 public:
  ExpertServiceImpl(const ModelConfig& config, v1::PeerIdentity identity,
                    ExpertRequestLimits limits, MetricsRegistry* metrics);

  grpc::Status Handshake(grpc::ServerContext* ctx, const v1::HandshakeRequest* req,
                         v1::HandshakeResponse* resp) override;
  // ExpertService.Compute. Messages are read as raw bytes and parsed here, so that bytes that
  // are not an ExpertRequest end the stream with INVALID_ARGUMENT (a typed reader cannot tell
  // a message that fails to parse from the end of the stream). One message at a time per
  // stream: read, compute, write, then the next read.
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Compute(
      grpc::CallbackServerContext* ctx) override;

  // A connection of the framed TCP data plane (dataplane/frame.h): the handshake first (the
  // same check as the Handshake RPC), then each ExpertRequest frame answered by Handle, as on
  // a Compute stream; a frame that does not parse ends the connection with INVALID_ARGUMENT.
  std::unique_ptr<dataplane::FrameSession> NewDataSession();

  // One message, validated and computed (what Compute does for each).
  v1::ExpertResponse Handle(const v1::ExpertRequest& request);
  // The same into `response` (cleared first), reusing its buffers.
  void Handle(const v1::ExpertRequest& request, v1::ExpertResponse* response);

  // Once loaded: the backend (CPU LocalExperts or CUDA) and the (layer, expert) pairs it holds.
  // `serialize`: the backend takes one caller at a time (the CUDA backend).
  void SetExperts(std::unique_ptr<RoutedExperts> experts, std::span<const LayerExpert> held,
                  bool serialize);
  RoutedExperts* experts() const { return experts_.load(); }

  // The (layer, expert) pairs requests may name: swapped whole (live placement); a request
  // keeps the set it was validated against until it is answered.
  using HeldSet = std::set<std::pair<int, int>>;
  std::shared_ptr<const HeldSet> held() const;
  void PublishHeld(std::span<const LayerExpert> held);
  // Waits until `old` (a set replaced by PublishHeld, passed by its last other holder) is no
  // longer used by any request: every request validated against it has been answered.
  static void WaitUnused(std::shared_ptr<const HeldSet> old);
  // When a request last named (layer, expert) (InfinitePast: never, or out of range).
  absl::Time LastUse(int layer, int expert) const;
  void StartDraining();  // new messages get UNAVAILABLE from now on
  // Waits until no message is being computed.
  void WaitIdle();
  uint32_t outstanding_rows() const { return outstanding_rows_.load(); }

 private:
  class ComputeReactor;  // expert_service.cc
  class RefusedReactor;
  class DataSession;
  void CountRequest(absl::StatusCode code);

  const ModelConfig& config_;
  v1::PeerIdentity identity_;
  ExpertRequestLimits limits_;
  MetricsRegistry* metrics_;
  // With metrics_: the per-message series, looked up once (other codes are looked up when met).
  Counter* requests_ok_ = nullptr;
  Counter* rows_total_ = nullptr;
  Histogram* compute_seconds_ = nullptr;
  std::atomic<RoutedExperts*> experts_{nullptr};
  std::unique_ptr<RoutedExperts> owned_experts_;
  mutable std::mutex held_mu_;
  std::shared_ptr<const HeldSet> held_;  // guarded by held_mu_; the set itself is immutable
  // Per layer * n_routed_experts + expert: absl::ToUnixNanos of the last request naming it.
  std::unique_ptr<std::atomic<int64_t>[]> last_use_;
  int64_t n_last_use_ = 0;
  bool serialize_ = false;
  std::mutex run_mu_;  // taken around Run() when serialize_
  std::atomic<bool> draining_{false};
  std::atomic<uint32_t> outstanding_rows_{0};
  std::atomic<uint32_t> open_streams_{0};  // ComputeReactors alive
  std::mutex idle_mu_;
  std::condition_variable idle_cv_;
  int in_flight_ = 0;
};

struct ExpertServerOptions {
  std::string model_dir;
  std::vector<LayerExpert> experts;  // what this replica holds
  int32_t shard_id = 0;              // the shard group it registers for
  ServerOptions server;              // listen address (port 0 = any)
  std::string advertise_address;     // what the router hands out; default AdvertisedAddress()
  // The framed TCP data plane (dataplane/frame.h) beside gRPC: host:port to listen on (port 0 =
  // any), empty = off. Plaintext: refused when the process runs mTLS (ProcessTls()).
  std::string data_listen;
  // The data-plane address the router hands out; default: the advertise_address host when one
  // is given, else the data listen host (the gRPC advertised host for a wildcard), with the
  // bound data port.
  std::string data_advertise_address;
  std::string router_address;  // empty: do not register
  std::string instance_id = "expert";
  ExpertRequestLimits limits;
  bool quantize_activations = true;
  std::string device = "cpu";  // "cpu" or "cuda:N[,M...]" (experts spread over the GPUs)
  uint32_t capacity = 4096;    // rows in flight announced to the router
  // Expert throughput relative to a reference replica, announced to the router's rebalancer.
  float capacity_weight = 1.0f;
  // Register with live_placement (load and release experts on the router's targets). Only the
  // CPU backend (LocalExperts) can; a CUDA replica always registers without it.
  bool live_placement = true;
  // After a committed target: experts beyond it are released once unused this long.
  absl::Duration release_grace = absl::Seconds(10);
  absl::Duration rpc_timeout = absl::Seconds(2);
  MetricsRegistry* metrics = nullptr;  // optional; must outlive the server
};

class LivePlacement;  // expert-service/live_placement.h

class ExpertServer {
 public:
  // Starts gRPC (NOT_SERVING), loads the experts, turns SERVING, registers with the router.
  static absl::StatusOr<std::unique_ptr<ExpertServer>> Start(ExpertServerOptions options);
  ~ExpertServer();  // Drain()

  int port() const { return port_; }
  std::string address() const;
  int data_port() const { return data_server_ ? data_server_->port() : 0; }  // 0: off
  const std::string& data_address() const { return data_address_; }          // empty: off
  uint64_t bytes_mapped() const;
  const ModelConfig& config() const { return config_; }
  ExpertServiceImpl& service() { return *service_; }
  // Live placement on this replica (null on CUDA, or when live_placement is off).
  LivePlacement* live_placement() { return live_.get(); }
  // Deregisters, refuses new work, finishes in-flight messages, stops the server. Idempotent.
  void Drain();
  // Stops abruptly (no deregistration, streams cut): a crash, for failover tests.
  void Kill();

 private:
  ExpertServer() = default;
  ExpertServerOptions options_;
  ModelConfig config_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<ExpertServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<dataplane::FrameServer> data_server_;
  std::string data_address_;
  std::unique_ptr<LivePlacement> live_;  // after what it borrows, before registration_
  std::unique_ptr<RouterRegistration> registration_;
  int port_ = 0;
  uint64_t bytes_mapped_ = 0;      // at load (the CPU backend's count is read live)
  LocalExperts* local_ = nullptr;  // the CPU backend
  std::mutex stop_mu_;
  bool stopped_ = false;
};

}  // namespace expertmesh
