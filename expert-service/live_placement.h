// Live placement on a shard replica (the shard side of router/membership.h's placement
// change): the router hands the replica ExpertTargets (generation, experts, committed) in its
// Register and Heartbeat answers; LivePlacement applies them to the replica's LocalExperts on
// its own worker thread, so loading never blocks heartbeats or requests:
//   - gained experts (target minus held) are mapped from the checkpoint and packed
//     (LocalExperts::Add maps only their tensors), then the service's held set is republished
//     with them and held_generation() becomes the target's generation (reported in every
//     heartbeat); a load failure is reported as load_error() instead;
//   - after a committed target, experts held beyond it are released once no request has named
//     them for `release_grace` and the target arrived at least `release_grace` ago (steps that
//     still use the previous map keep arriving for a while): the held set is republished
//     without them, requests validated against the old set are waited for, then
//     LocalExperts::Release frees their packed memory.
// A target that the replica already holds sets held_generation() at once, on the caller's
// thread (a replica that registers with its target stays in the maps).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/time.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/model/local_experts.h"
#include "expert-service/expert_service.h"
#include "expertmesh/v1/router.pb.h"
#include "service-common/metrics.h"

namespace expertmesh {

class LivePlacement {
 public:
  struct Options {
    absl::Duration release_grace = absl::Seconds(10);
    MetricsRegistry* metrics = nullptr;  // optional; must outlive this object
  };
  // All borrowed, and must outlive this object. `experts` is the backend `service` computes
  // with; the service's held set must already list what `experts` holds.
  LivePlacement(const Checkpoint& checkpoint, const ModelConfig& config, LocalExperts* experts,
                ExpertServiceImpl* service, Options options);
  ~LivePlacement();  // stops the worker (a load in progress finishes first)

  // A target from the router (any thread; returns at once).
  void OnTarget(const v1::ExpertTarget& target);
  // The newest target generation held (0: none yet), and the last load failure (empty: none).
  uint64_t held_generation() const;
  std::string load_error() const;
  // What the replica holds now (for a registration made again).
  std::vector<LayerExpert> Held() const { return experts_->Held(); }
  // Test hooks: targets applied and release passes finished so far.
  uint64_t applied() const;
  uint64_t releases() const;

 private:
  void Loop();
  void Apply(const v1::ExpertTarget& target);  // worker thread
  // Releases the candidates that are due; returns when the next one is (or nullopt).
  std::optional<absl::Time> ReleaseDue(absl::Time now);  // worker thread
  void UpdateGauges();

  const Checkpoint& checkpoint_;
  const ModelConfig& config_;
  LocalExperts* experts_;
  ExpertServiceImpl* service_;
  Options options_;
  Gauge* held_gauge_ = nullptr;
  Gauge* bytes_gauge_ = nullptr;
  Counter* loads_ = nullptr;
  Counter* releases_total_ = nullptr;
  Counter* load_errors_ = nullptr;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::optional<v1::ExpertTarget> pending_;  // the newest target not applied yet
  uint64_t held_generation_ = 0;
  std::string load_error_;
  uint64_t applied_ = 0;
  uint64_t release_passes_ = 0;
  // Worker thread only: the committed target's experts, when it arrived, and the experts held
  // beyond it (release candidates).
  bool committed_ = false;
  absl::Time committed_at_ = absl::InfinitePast();
  std::set<LayerExpert> target_;
  std::thread thread_;
};

}  // namespace expertmesh
