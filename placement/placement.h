// Where each routed expert lives: a placement assigns every (layer, expert) of every MoE
// layer (MTP layers included) to one of num_shards shard groups. The default plan spreads
// each layer's experts evenly in contiguous ranges (expert e of E goes to shard
// floor(e * N / E), as DeepSeek's expert parallelism does); a JSON file can give any other
// plan. The router service, the expert service (--shard-id/--num-shards) and the dispatcher
// all use these functions, so they cannot disagree.
//
// JSON plan file:  {"num_shards": 2, "layers": {"1": [0, 0, 1, 1], "2": [1, 0, 1, 0]}}
//   "layers" maps every MoE layer to the shard of each of its n_routed_experts experts.
#pragma once

#include <cstdint>
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
  std::vector<int32_t> shard_of;  // [n_layers, n_routed_experts]; -1 = not a MoE layer

  // -1 when (layer, expert) is out of range or not routed.
  int32_t ShardOf(int64_t layer, int64_t expert) const;
  // The (layer, expert) pairs of a shard, in (layer, expert) order.
  std::vector<LayerExpert> ExpertsOf(int32_t shard) const;
};

absl::StatusOr<Placement> EvenPlacement(const ModelConfig& config, int32_t num_shards);
absl::StatusOr<Placement> PlacementFromJson(std::string_view json, const ModelConfig& config);
absl::StatusOr<Placement> LoadPlacementFile(const std::string& path, const ModelConfig& config);
std::string PlacementToJson(const Placement& placement);

// "layer:e1,e2;layer:e3" (spaces ignored; a range "a-b" is allowed) -> sorted pairs.
absl::StatusOr<std::vector<LayerExpert>> ParseExpertList(std::string_view text);

// The shard groups of a placement map, without replicas (the router adds those).
void FillShardGroups(const Placement& placement, v1::PlacementMap* map);
// The inverse: the expert -> shard table of a published map. Every (layer, expert) must
// belong to at most one shard and lie within the map's n_layers x n_routed_experts.
absl::StatusOr<Placement> PlacementFromMap(const v1::PlacementMap& map);

}  // namespace expertmesh
