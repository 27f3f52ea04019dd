// Where each routed expert lives: a placement assigns every (layer, expert) of every MoE
// layer (MTP layers included) to one or more of num_shards shard groups. An expert held by
// several groups has redundant copies (placement/eplb.h makes them for hot experts); the
// dispatcher sends each (row, expert) pair to one copy, chosen by ChooseShards below, so every
// copy computes the same expert from the same checkpoint tensors. The default plan spreads each
// layer's experts evenly in contiguous ranges (expert e of E goes to shard floor(e * N / E), as
// DeepSeek's expert parallelism does); a JSON file can give any other plan. The router service,
// the expert service (--shard-id/--num-shards) and the dispatcher all use these functions, so
// they cannot disagree.
//
// JSON plan file:  {"num_shards": 2, "layers": {"1": [0, [0, 1], 1, 1], "2": [1, 0, 1, 0]}}
//   "layers" maps every MoE layer to the shard of each of its n_routed_experts experts: an
//   integer, or an array of distinct shard ids where the expert has copies in several groups.
//   PlacementToJson writes arrays only for experts with copies.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/format/config.h"
#include "core/model/local_experts.h"
#include "expertmesh/v1/router.pb.h"

namespace expertmesh {

struct Placement {
  int32_t num_shards = 0;
  int32_t n_layers = 0;           // num_hidden_layers + num_nextn_predict_layers
  int32_t n_routed_experts = 0;   // per MoE layer
  std::vector<int32_t> shard_of;  // [n_layers, n_routed_experts]: the first (lowest) copy;
                                  // -1 = not a MoE layer
  // All copies, CSR over the same [n_layers * n_routed_experts] index: the shards of pair i
  // are copy_shards[copy_offsets[i] .. copy_offsets[i + 1]), ascending and distinct. Both are
  // empty when no expert has a second copy: then shard_of alone is the placement. Set them
  // with SetCopies, which keeps shard_of consistent.
  std::vector<int32_t> copy_offsets;  // [n_layers * n_routed_experts + 1]
  std::vector<int32_t> copy_shards;

  // -1 when (layer, expert) is out of range or not routed; else the first copy.
  int32_t ShardOf(int64_t layer, int64_t expert) const;
  // Every shard group holding (layer, expert), ascending; empty when out of range or not routed.
  std::span<const int32_t> ShardsOf(int64_t layer, int64_t expert) const;
  // The (layer, expert) pairs of a shard (copies included), in (layer, expert) order.
  std::vector<LayerExpert> ExpertsOf(int32_t shard) const;
  // True when some expert has more than one copy.
  bool HasCopies() const { return !copy_offsets.empty(); }
  // Replaces the whole table: shards[i] lists the copies of pair i = layer * E + expert
  // (ascending, distinct, each in [0, num_shards); empty = not routed). shards.size() must be
  // n_layers * n_routed_experts. Drops the CSR when every pair has at most one copy.
  absl::Status SetCopies(const std::vector<std::vector<int32_t>>& shards);

  bool operator==(const Placement&) const = default;
};

absl::StatusOr<Placement> EvenPlacement(const ModelConfig& config, int32_t num_shards);
absl::StatusOr<Placement> PlacementFromJson(std::string_view json, const ModelConfig& config);
absl::StatusOr<Placement> LoadPlacementFile(const std::string& path, const ModelConfig& config);
std::string PlacementToJson(const Placement& placement);

// "layer:e1,e2;layer:e3" (spaces ignored; a range "a-b" is allowed) -> sorted pairs.
absl::StatusOr<std::vector<LayerExpert>> ParseExpertList(std::string_view text);

// The shard groups of a placement map, without replicas (the router adds those). An expert
// with copies is listed in each group that holds one.
void FillShardGroups(const Placement& placement, v1::PlacementMap* map);
// The inverse: the expert -> shards table of a published map. A (layer, expert) may belong to
// several shard groups but only once to each, must lie within the map's n_layers x
// n_routed_experts, and a layer that has any expert in the map must have every expert.
absl::StatusOr<Placement> PlacementFromMap(const v1::PlacementMap& map);

enum class CopyChoice {
  // A copy in a shard group the row already uses (for a one-copy expert, or for a copy chosen
  // before it) when there is one, else the rotation below: fewer groups per token, fewer bytes.
  // The load of an expert's copies then follows what its rows share with other experts, not
  // an even split (tests/placement/eplb_test.cc and tools/bench/bench_placement.cc measure it).
  kFewerGroups,
  // Always the rotation: each expert's load splits evenly over its copies (the split
  // placement/eplb.h predicts), at the price of more groups per token.
  kSpread,
};

// Picks one copy for each (row, expert) pair of one row of a MoE layer:
//   row_experts: [k] the row's experts; shard_out: [k] receives the chosen shard of each.
// Experts with one copy go to it. For an expert with several copies: see CopyChoice; the
// rotation takes copy (row_key + expert) mod copies of the ascending list, so rows with
// consecutive keys take turns. Callers should pass a key that differs from row to row and
// from step to step (e.g. a running count of rows dispatched): a key that is always 0 sends
// every row to the same copies. Deterministic: the same placement, layer, experts, key and
// choice give the same shards. Returns false (that pair's shard_out is -1) when an expert has
// no copy or the spans differ in size; every other pair is still filled.
bool ChooseShards(const Placement& placement, int layer, std::span<const int32_t> row_experts,
                  uint64_t row_key, std::span<int32_t> shard_out,
                  CopyChoice choice = CopyChoice::kFewerGroups);

// Whole expert groups (n_group groups of n_routed_experts / n_group consecutive experts, the
// unit DeepSeek's gate selects topk_group of) on shard groups, so that a token touches at most
// topk_group shard groups when ChooseShards picks the copies:
//   n_group % num_shards == 0: shard g holds n_group / num_shards consecutive expert groups
//     (the same as the even plan, which is already group-aligned then);
//   num_shards % n_group == 0: each expert group is held whole by num_shards / n_group shard
//     groups (redundant copies: each shard holds n_routed_experts / n_group experts per layer,
//     num_shards / n_group times the even plan's memory), which share its load;
//   otherwise: the even plan, and *aligned (if given) is set to false.
absl::StatusOr<Placement> GroupAlignedPlacement(const ModelConfig& config, int32_t num_shards,
                                                bool* aligned = nullptr);

}  // namespace expertmesh
