#include "router/rebalancer.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "placement/eplb.h"

namespace expertmesh {
namespace {

// The window's tokens as EPLB's [n_moe_layers][E] load.
std::vector<std::vector<double>> LayerLoads(const ModelConfig& config, const LoadWindow::Sums& load,
                                            uint64_t* total) {
  const std::vector<int32_t> layers = MoeLayers(config);
  const int64_t E = config.n_routed_experts;
  std::vector<std::vector<double>> out(layers.size(), std::vector<double>(E, 0.0));
  *total = 0;
  for (size_t li = 0; li < layers.size(); ++li) {
    for (int64_t e = 0; e < E; ++e) {
      const size_t i = static_cast<size_t>(layers[li] * E + e);
      if (i < load.tokens.size()) {
        out[li][e] = static_cast<double>(load.tokens[i]);
        *total += load.tokens[i];
      }
    }
  }
  return out;
}

}  // namespace

uint32_t RedundantCopies(const Placement& placement) {
  uint32_t n = 0;
  for (int32_t l = 0; l < placement.n_layers; ++l) {
    for (int32_t e = 0; e < placement.n_routed_experts; ++e) {
      const size_t c = placement.ShardsOf(l, e).size();
      if (c > 1) n += static_cast<uint32_t>(c - 1);
    }
  }
  return n;
}

absl::StatusOr<double> MeanImbalance(const ModelConfig& config, const Placement& placement,
                                     const LoadWindow::Sums& load,
                                     const std::vector<double>& capacity) {
  uint64_t total = 0;
  const std::vector<std::vector<double>> loads = LayerLoads(config, load, &total);
  absl::StatusOr<std::vector<double>> per_layer =
      PlacementImbalance(placement, config, loads, capacity);
  if (!per_layer.ok()) return per_layer.status();
  double sum = 0;
  int n = 0;
  for (size_t li = 0; li < loads.size(); ++li) {
    if (std::accumulate(loads[li].begin(), loads[li].end(), 0.0) <= 0) continue;
    sum += (*per_layer)[li];
    ++n;
  }
  return n > 0 ? sum / n : 1.0;
}

absl::StatusOr<RebalancePlan> PlanRebalance(const ModelConfig& config, const Placement& current,
                                            const Placement& initial, const LoadWindow::Sums& load,
                                            const std::vector<double>& capacity,
                                            const RebalancerOptions& options, bool force) {
  RebalancePlan plan;
  const int32_t N = current.num_shards;
  if (capacity.size() != static_cast<size_t>(N)) {
    return absl::InvalidArgumentError("rebalance: one capacity per shard group expected");
  }
  for (int32_t g = 0; g < N; ++g) {
    if (!(capacity[g] > 0)) {
      plan.reason = absl::StrCat("shard group ", g, " has no serving replica");
      return plan;
    }
  }
  uint64_t total = 0;
  const std::vector<std::vector<double>> loads = LayerLoads(config, load, &total);
  absl::StatusOr<double> before = MeanImbalance(config, current, load, capacity);
  if (!before.ok()) return before.status();
  plan.before = plan.after = *before;
  if (total < options.min_tokens) {
    plan.reason = absl::StrCat(total, " tokens in the load window, fewer than the ",
                               options.min_tokens, " a rebalance needs");
    return plan;
  }
  if (!force && *before <= options.threshold) {
    plan.reason =
        absl::StrFormat("imbalance %.3f is within the threshold %.2f", *before, options.threshold);
    // A periodic rebalance still tries; the gain test below decides.
    if (options.interval <= absl::ZeroDuration()) return plan;
  }
  // Slots: each group's largest per-layer count in the initial placement, plus extra_slots.
  std::vector<int32_t> slots(static_cast<size_t>(N), 0);
  for (int32_t l = 0; l < initial.n_layers; ++l) {
    std::vector<int32_t> count(static_cast<size_t>(N), 0);
    for (int32_t e = 0; e < initial.n_routed_experts; ++e) {
      for (int32_t s : initial.ShardsOf(l, e)) ++count[static_cast<size_t>(s)];
    }
    for (int32_t g = 0; g < N; ++g) slots[g] = std::max(slots[g], count[g]);
  }
  for (int32_t& s : slots) {
    s = std::min<int32_t>(s + std::max(options.extra_slots, 0),
                          static_cast<int32_t>(config.n_routed_experts));
  }
  EplbInput in;
  in.num_shards = N;
  in.load = loads;
  in.capacity = capacity;
  in.slots = slots;
  in.redundant_per_layer = options.redundant_per_layer;
  // EPLB packs whole expert groups first where they divide evenly over the shard groups (a
  // token then reaches at most topk_group groups), but when the hot experts crowd into one
  // expert group that packing cannot even the load out. So both are computed, the
  // hierarchical one kept unless the global packing predicts clearly (5 %) better.
  absl::StatusOr<EplbResult> result = RebalanceExperts(config, in);
  if (!result.ok()) return result.status();
  absl::StatusOr<double> after = MeanImbalance(config, result->placement, load, capacity);
  if (!after.ok()) return after.status();
  if (result->hierarchical) {
    ModelConfig flat = config;
    flat.n_group = 1;
    flat.topk_group = 1;
    absl::StatusOr<EplbResult> global = RebalanceExperts(flat, in);
    if (global.ok()) {
      absl::StatusOr<double> global_after =
          MeanImbalance(config, global->placement, load, capacity);
      if (global_after.ok() && *global_after < *after * 0.95) {
        result = std::move(global);
        after = global_after;
      }
    }
  }
  plan.after = *after;
  plan.placement = std::move(result->placement);
  plan.redundant = RedundantCopies(plan.placement);
  for (int32_t l = 0; l < current.n_layers; ++l) {
    for (int32_t e = 0; e < current.n_routed_experts; ++e) {
      const std::span<const int32_t> was = current.ShardsOf(l, e);
      for (int32_t s : plan.placement.ShardsOf(l, e)) {
        if (std::find(was.begin(), was.end(), s) == was.end()) ++plan.moved;
      }
    }
  }
  if (plan.placement == current) {
    plan.reason = "the balanced placement is the current one";
    return plan;
  }
  if (!force && !(*after < *before * (1.0 - options.min_gain))) {
    plan.reason = absl::StrFormat(
        "the balanced placement predicts %.3f against %.3f now: less than the %.0f%% gain "
        "required",
        *after, *before, options.min_gain * 100);
    return plan;
  }
  plan.change = true;
  plan.reason = absl::StrFormat("imbalance %.3f -> %.3f predicted; %u copies move, %u redundant",
                                *before, *after, plan.moved, plan.redundant);
  return plan;
}

}  // namespace expertmesh
