// When and how the router rebalances the experts: from the load window (router/load_window.h)
// and the shard groups' capacities, a placement with redundant copies of the hottest experts
// (placement/eplb.h, DeepSeek's EPLB adapted to unequal shard groups), applied live by
// Membership::BeginChange. Plain logic; the router calls it under its lock.
//
// The measure: a MoE layer's imbalance is max over shard groups of load / (capacity share x
// the layer's load) (1.0 = every group gets exactly its share; with equal groups max / mean),
// the step's pace is set by the worst group of each layer, and the figure compared with the
// threshold is the mean over the layers that had load in the window.
// Triggers: automatic (every `check_every`, when that figure exceeds `threshold` and at least
// `cooldown` passed since the last change), periodic (`interval` > 0: also below the
// threshold), and by hand (the Rebalance RPC, `expertmesh rebalance`). In every case a new
// placement is applied only when its predicted figure is at least `min_gain` (relative) below
// the current one (or `force`), and only with `min_tokens` routed in the window.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/format/config.h"
#include "placement/placement.h"
#include "router/load_window.h"

namespace expertmesh {

struct RebalancerOptions {
  bool automatic = true;    // --no-rebalance: only by hand
  double threshold = 1.25;  // mean max/mean over the layers that starts a rebalance
  double min_gain = 0.05;   // the new placement must predict this much less (relative)
  absl::Duration check_every = absl::Seconds(10);
  absl::Duration interval = absl::ZeroDuration();  // periodic rebalance; zero = off
  absl::Duration cooldown = absl::Seconds(60);     // between automatic changes
  uint64_t min_tokens = 2000;        // routed (layer, expert) tokens in the window, all layers
  int32_t extra_slots = 1;           // experts per group per layer beyond the initial placement's
  int32_t redundant_per_layer = -1;  // copies beyond one per expert; -1 = every free slot
};

struct RebalancePlan {
  bool change = false;     // apply `placement`
  std::string reason;      // why (not), in words
  double before = 1.0;     // the current placement's figure (see the top)
  double after = 1.0;      // the new one's, predicted
  Placement placement;     // with change
  uint32_t moved = 0;      // (layer, expert, group) copies a group gains
  uint32_t redundant = 0;  // copies beyond one per expert in `placement`
};

// The mean over loaded layers of each layer's max/mean under `placement`; 1.0 without load.
absl::StatusOr<double> MeanImbalance(const ModelConfig& config, const Placement& placement,
                                     const LoadWindow::Sums& load,
                                     const std::vector<double>& capacity);

// Copies beyond one per expert.
uint32_t RedundantCopies(const Placement& placement);

// Computes a placement from the window. `initial` sets each group's slots (its most experts
// in a layer + extra_slots). Does not apply anything; `force` skips the threshold and the gain.
absl::StatusOr<RebalancePlan> PlanRebalance(const ModelConfig& config, const Placement& current,
                                            const Placement& initial, const LoadWindow::Sums& load,
                                            const std::vector<double>& capacity,
                                            const RebalancerOptions& options, bool force);

}  // namespace expertmesh
