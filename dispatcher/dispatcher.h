// The dispatcher: RoutedExperts over gRPC. At each MoE layer it takes the batch (already
// quantized to FP8 per 128 channels) and the gate's (expert, weight) pairs, sends every shard
// group one ExpertRequest holding only the rows that route to it with only its pairs, on
// long-lived bidirectional streams (one per shard replica, opened once and kept), and
// combines the answers into out. Combine modes (DispatcherOptions::combine):
//   exact (default): shards answer one BF16 output per (row, expert) pair (COMBINE_PER_EXPERT);
//     they are scattered back to the batch's pair order and added per row in ascending expert
//     order with AddWeightedBf16 (CombinePerExpert, core/model/experts.h), the very function
//     LocalExperts::Run uses: out is bit-identical to the in-process engine whatever the
//     placement, shard count, replica count or arrival order. A shard group's rows are split
//     over several requests when its answer would exceed max_answer_bytes.
//   partial: shards answer one BF16 partial sum per row, added in shard-id order (never
//     arrival order): fewer answer bytes, but the rounding depends on which experts share a
//     shard.
//
// Replicas: among a shard's replicas the one with the least outstanding rows gets the work
// (failed streams last; ties: the one chosen longest ago, so replicas take turns and a replica
// added by scaling out gets work at its first turn). A replica that fails (stream broken, retryable
// error), does not answer within attempt_timeout (a stalled process) or answers garbage (wrong
// sizes, NaN/Inf outputs: refused, counted in expertmesh_dispatch_bad_answers_total{shard,reason},
// never summed) is abandoned for this request, its stream is cut, and the request goes to another
// replica of the same shard; with none left the step fails with UNAVAILABLE naming the shard. A cut
// replica comes back when it is next chosen and its handshake succeeds; it ranks with the others
// again once a newer map lists it (a replica restarted on its address registers again), on a new
// channel (no reconnect backoff inherited from its crash). The whole step is bounded by
// step_deadline.
//
// Placement and replicas come from the router's versioned maps (WatchRouter: a
// WatchPlacement stream, reconnected when it breaks); replicas that register later are used
// from the next step. A step (one forward) takes the newest map at its first MoE layer and
// keeps it for its other layers, so a live placement change switches at a step boundary (the
// shards keep experts they lose until no step uses them).
//
// Micro-batches: a forward split into micro-batches whose steps overlap (the attention
// service's --micro-batches, core/engine/micro_batch_engine.h) reaches the dispatcher through
// MicroBatch(i): each micro-batch is its own sequence of steps with its own step table, so two
// overlapping steps never take each other's map, and each switches at its own step boundary.
// Run() is micro-batch 0. The requests carry the micro-batch index (ExpertRequest.micro_batch). An
// expert with copies in several shard groups goes, per (row, expert) pair, to the copy ChooseShards
// (placement/placement.h) picks, keyed by a running count of the rows dispatched; in exact mode the
// output does not depend on the copy.
//
// Data plane: a replica the router lists with a data_address gets its requests as frames on
// plain TCP connections (dataplane/frame.h) instead of its Compute stream. A request takes a
// connection of its own from the replica's pool (opened with a handshake when none is idle),
// writes the frame from Run()'s thread, and Run()'s thread reads the answer itself (poll over
// every connection of the step, with the step's gRPC answers woken through an eventfd): no
// thread hand-off on the round trip. Failover, timeouts, bad-answer checks and combining are
// the same for both transports; a connection that fails or times out is closed, never reused.
// A replica has at most max_data_connections_per_replica connections from the dispatcher. gRPC
// is the fallback data plane: a request that gets a connection from no replica of its shard
// (all at that bound, refusing connections over their own bound, or down) takes one of those
// replicas' Compute streams instead of failing the step.
//
// Dimension legend: R = rows (tokens) of the batch, H = hidden_size, S = shard groups.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/format/config.h"
#include "core/model/experts.h"
#include "expertmesh/v1/common.pb.h"
#include "expertmesh/v1/router.pb.h"
#include "placement/placement.h"
#include "service-common/grpc_util.h"
#include "service-common/metrics.h"

namespace expertmesh {

enum class CombineMode { kExact, kPartial };
// "exact" / "partial"; InvalidArgument otherwise.
absl::StatusOr<CombineMode> ParseCombineMode(std::string_view name);
const char* CombineModeName(CombineMode mode);

struct DispatcherOptions {
  v1::PeerIdentity identity;  // sent in handshakes; replicas of another model are refused
  absl::Duration step_deadline = absl::Seconds(10);   // one Run(), all shards answered
  absl::Duration attempt_timeout = absl::Seconds(3);  // one replica's answer, then failover
  absl::Duration connect_timeout = absl::Seconds(2);  // handshake when a stream is opened
  int max_message_bytes = kDefaultMaxMessageBytes;
  int max_in_flight_per_replica = 256;  // requests queued or outstanding on one stream
  CombineMode combine = CombineMode::kExact;
  // Exact mode: the largest answer (outputs bytes) one request may ask for; a shard group's
  // rows go out in several requests above it. Below max_message_bytes and the shards'
  // ExpertRequestLimits::max_response_bytes (63 MiB by default).
  uint64_t max_answer_bytes = 60ull << 20;
  // With WatchRouter: how often the tokens sent to each expert since the last report go to
  // the router (ReportLoad: the planner's input). Zero = never.
  absl::Duration load_report_interval = absl::Seconds(5);
  // Send a replica's requests on its framed TCP data plane (dataplane/frame.h) when the router
  // lists one for it (ShardReplica.data_address), else on its gRPC Compute stream. Never under
  // mTLS (ProcessTls(): the data plane is plaintext): the streams are used then.
  bool data_plane = true;
  // Data-plane connections one replica may have open from this dispatcher (one per request in
  // flight on it: overlapping micro-batches and split groups each take their own). A request
  // that finds every replica of its shard at the bound goes on a replica's gRPC stream instead.
  int max_data_connections_per_replica = 16;
  MetricsRegistry* metrics = nullptr;  // optional; must outlive the dispatcher
};

class ReplicaStream;  // dispatcher.cc

class Dispatcher final : public RoutedExperts {
 public:
  static absl::StatusOr<std::unique_ptr<Dispatcher>> Create(const ModelConfig& config,
                                                            DispatcherOptions options);
  ~Dispatcher() override;  // stops the watcher, closes every stream

  // x: [R, H] FP8; routes.n_rows() == R; out: [R, H], overwritten. Micro-batch 0's steps.
  absl::Status Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                   std::span<float> out) override;

  static constexpr int kMaxMicroBatches = 8;
  // The dispatcher as seen by micro-batch `micro_batch` in [0, kMaxMicroBatches): its Run is
  // this dispatcher's Run under that micro-batch's own step table (see the header comment).
  // Owned by the dispatcher; the same object for the same index. Concurrent calls on different
  // micro-batches (and on one) are safe.
  RoutedExperts* MicroBatch(int micro_batch);
  // The placement version micro-batch `micro_batch`'s current step uses (0 before its first).
  uint64_t step_version(int micro_batch) const;

  // Applies a placement map (newer versions only, unless `any_version`: the first map of a
  // new watch stream is taken whatever its version, since a restarted router counts again
  // from 1). The router watcher calls this; tests and static deployments may call it directly.
  absl::Status ApplyPlacement(const v1::PlacementMap& map, bool any_version = false);
  // Watches router_address's placement maps on a background thread until destruction, and
  // reports expert load there every load_report_interval.
  void WatchRouter(const std::string& router_address);
  // Sends the expert load accumulated since the last report now (what the timer does).
  absl::Status ReportLoad();

  uint64_t placement_version() const;
  // Every shard group of the current map has at least one replica.
  bool Covered() const;
  // Waits until Covered() (and, if min_version > 0, a map of at least that version arrived).
  absl::Status WaitCovered(absl::Duration timeout, uint64_t min_version = 0);

  uint64_t failovers() const { return failovers_.load(); }

  // The replicas of the current map with the state of their streams. `open`: a stream is up
  // and not failed; false before its first use and from a failure (broken stream, no answer
  // within the attempt timeout, a bad answer) until the stream is opened again, which happens
  // when the replica is next chosen (failed replicas are chosen after every open one).
  struct ReplicaState {
    int32_t shard = 0;
    std::string replica_id;
    std::string address;
    bool open = false;
    int64_t outstanding_rows = 0;
  };
  std::vector<ReplicaState> Replicas() const;

 private:
  struct Table;  // a placement map with its replica streams, immutable once published
  struct Group;  // one shard's part of a step
  struct ShardMetrics;
  class StepRun;  // the phases of one Run()
  class MicroBatchView;
  // The step state of one micro-batch (under mu_).
  struct Lane {
    std::shared_ptr<const Table> step_table;  // the table of its current step (see RunStep)
    int32_t last_layer = -1;                  // the layer of its last Run
  };
  Dispatcher(const ModelConfig& config, DispatcherOptions options);
  absl::Status RunStep(int micro_batch, int layer, const QuantizedActivations& x,
                       const ExpertRoutes& routes, std::span<float> out);
  void WatchLoop(std::string router_address);
  void ReportLoop();
  Counter* ExpertTokens(int layer, int expert);

  int64_t hidden_size_;
  int32_t n_layers_;
  int32_t n_routed_experts_;
  DispatcherOptions options_;
  std::atomic<uint64_t> next_batch_id_{1};
  bool use_data_plane_ = false;  // options_.data_plane and not mTLS
  std::atomic<uint64_t> failovers_{0};
  std::atomic<uint64_t> pick_clock_{0};  // orders replica choices (least recently chosen wins ties)
  std::atomic<uint64_t> rows_dispatched_{0};  // row keys for the copy choice (ChooseShards)
  const int32_t first_moe_layer_;             // a step boundary: the table is taken here

  mutable std::mutex mu_;
  std::condition_variable table_changed_;
  std::shared_ptr<const Table> table_;
  Lane lanes_[kMaxMicroBatches];                                   // by micro-batch
  std::unique_ptr<MicroBatchView> views_[kMaxMicroBatches];        // MicroBatch(i), lazily
  std::map<std::string, std::shared_ptr<ReplicaStream>> streams_;  // by replica_id@address

  std::mutex watch_mu_;
  std::condition_variable watch_cv_;
  bool stopping_ = false;
  grpc::ClientContext* watch_ctx_ = nullptr;  // the open watch call, cancelled on stop
  std::thread watcher_;
  std::thread reporter_;
  std::string router_address_;

  std::vector<std::atomic<Counter*>> expert_tokens_;    // [n_layers, n_routed_experts], lazy
  std::vector<Histogram*> layer_latency_;               // [n_layers], MoE layers only
  std::vector<std::atomic<uint64_t>> unreported_load_;  // [n_layers, n_routed_experts]
};

}  // namespace expertmesh
