#include "planner/to_placement.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/base/status.h"

namespace expertmesh::planner {

absl::StatusOr<Placement> ToPlacement(const Plan& plan) {
  // Built field by field (not from EvenPlacement): a pool may have more cards than a layer
  // has experts, which plan files allow as long as every shard group holds an expert.
  Placement p;
  p.num_shards = static_cast<int32_t>(plan.pool.cards.size());
  p.n_layers =
      static_cast<int32_t>(plan.config.num_hidden_layers + plan.config.num_nextn_predict_layers);
  p.n_routed_experts = static_cast<int32_t>(plan.config.n_routed_experts);
  p.shard_of.assign(static_cast<size_t>(p.n_layers) * p.n_routed_experts, -1);
  std::vector<std::vector<int32_t>> shards(plan.copies.size());
  for (size_t i = 0; i < plan.copies.size(); ++i) {
    shards[i].assign(plan.copies[i].begin(), plan.copies[i].end());
    std::sort(shards[i].begin(), shards[i].end());
  }
  EM_RETURN_IF_ERROR(p.SetCopies(shards));
  for (size_t c = 0; c < plan.cards.size(); ++c) {
    if (plan.cards[c].experts.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "card ", c, " (", plan.pool.cards[c].kind.name,
          ") holds no expert, and a shard group without experts is not a valid placement: "
          "remove it from the pool"));
    }
  }
  return p;
}

}  // namespace expertmesh::planner
