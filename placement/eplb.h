// Expert-parallel load balancing: from the tokens each expert received in a window, a
// placement with redundant copies of the hottest experts, packed so that every shard group's
// expected load is proportional to its capacity.
//   N = num_shards (shard groups), E = n_routed_experts, L[e] = tokens routed to expert e of a
//   layer in the window, n[e] = copies of e, c[g] = capacity[g] / sum(capacity) (g's share),
//   load of a copy = L[e] / n[e], load[g] = sum of the copies g holds,
//   imbalance of a layer = max over g of load[g] / (c[g] * sum(L))   (1.0 = perfect; with
//   equal capacities it is max / mean of load[g]).
//
// Starting point: DeepSeek's EPLB (eplb.py of the deepseek-ai/EPLB repository), reimplemented:
//   replicate: each extra slot goes to the expert with the largest L[e] / n[e];
//   pack: copies, heaviest first, each into the lightest group that has room;
//   hierarchical: whole expert groups are packed onto shard groups first, so that a token,
//   whose gate keeps at most topk_group expert groups, reaches at most topk_group shard groups
//   through its experts' home copies; otherwise the global packing of every copy.
// Where ours differs, and why:
//   - Our "nodes" are shard groups and there is no GPU level below them: every replica of a
//     shard group serves the same experts (replicas add throughput and failover, not slots). So
//     there is no third packing step onto GPUs, and a second copy of an expert in the group that
//     already holds it would be useless: copies of one expert always go to distinct groups
//     (at most N copies).
//   - Capacities are unequal (a pool of different consumer GPUs). EPLB assumes equal GPUs and
//     packs to the lightest pack; we pack to the group whose load after adding the item, divided
//     by its capacity share, is smallest (weighted longest-processing-time), and report the
//     imbalance relative to each group's share.
//   - Slots are per group (each group's memory), not a single count of physical experts; a
//     layer uses at most sum(slots) - E redundant copies (or redundant_per_layer), and a copy
//     that finds no group with room that lacks the expert is dropped rather than forced.
//   - Hierarchical applies when topk_group < n_group, N <= n_group, E % n_group == 0 and the
//     slots hold every expert group whole (at least one per shard group); EPLB requires
//     n_group % N == 0 and gives every node the same number of groups. With unequal groups an
//     equal count cannot give a big card its share, so a group takes as many expert groups as
//     its slots allow (weighted LPT decides which).
//   - Global copies are chosen first (EPLB's replicate, then packing, then a local search of
//     moves and swaps out of the busiest group). In the hierarchical case the home copies are
//     fixed, so copies are added one at a time instead: a copy of an expert of the busiest group
//     into the group where it lowers the highest load / share the most.
//   - In the hierarchical case EPLB makes redundant copies inside a node; we have no GPUs
//     inside a group, so the extra copies of hot experts go to other shard groups. The home
//     copies keep every expert group together; ChooseShards (placement.h) prefers copies in
//     groups a row already uses, so the topk_group bound holds for most rows, not all.
//   - Experts with no load in the window get no extra copy; a layer with no load at all is
//     treated as uniform (no information: spread evenly).
// The prediction splits an expert's load evenly over its copies, as ChooseShards with
// CopyChoice::kSpread does; kFewerGroups (fewer bytes) shifts load towards groups that rows
// already use: tests/placement/eplb_test.cc and tools/bench/bench_placement.cc measure both.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "core/format/config.h"
#include "placement/placement.h"

namespace expertmesh {

// The MoE layers of a model (MTP layers included), ascending: the rows of EplbInput::load.
std::vector<int32_t> MoeLayers(const ModelConfig& config);

struct EplbInput {
  int32_t num_shards = 0;
  std::vector<std::vector<double>> load;  // [n_moe_layers][n_routed_experts], tokens, >= 0
  std::vector<double> capacity;      // [num_shards] > 0: sum of each group's replicas' capacity
  std::vector<int32_t> slots;        // [num_shards] >= 1: experts a group may hold per layer
  int32_t redundant_per_layer = -1;  // extra copies per layer; -1 = every free slot
};

struct EplbResult {
  Placement placement;
  bool hierarchical = false;                    // expert groups packed whole
  std::vector<std::vector<double>> group_load;  // [n_moe_layers][num_shards] predicted tokens
  std::vector<double> imbalance;                // [n_moe_layers] predicted max/mean (see top)
  std::vector<int32_t> copies;                  // [n_moe_layers] experts + redundant copies
};

absl::StatusOr<EplbResult> RebalanceExperts(const ModelConfig& config, const EplbInput& input);

// The predicted imbalance of any placement under a load: [n_moe_layers] max/mean as above, and
// the per-group loads in *group_load if given. Fails on sizes that do not match.
absl::StatusOr<std::vector<double>> PlacementImbalance(
    const Placement& placement, const ModelConfig& config,
    const std::vector<std::vector<double>>& load, const std::vector<double>& capacity,
    std::vector<std::vector<double>>* group_load = nullptr);

}  // namespace expertmesh
