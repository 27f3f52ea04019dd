#include "planner/to_placement.h"

#include <algorithm>

#include "core/base/status.h"

namespace expertmesh::planner {

absl::StatusOr<Placement> ToPlacement(const Plan& plan) {
  EM_ASSIGN_OR_RETURN(Placement p,
                      EvenPlacement(plan.config, static_cast<int32_t>(plan.cards.size())));
  std::vector<std::vector<int32_t>> shards(plan.copies.size());
  for (size_t i = 0; i < plan.copies.size(); ++i) {
    shards[i].assign(plan.copies[i].begin(), plan.copies[i].end());
    std::sort(shards[i].begin(), shards[i].end());
  }
  EM_RETURN_IF_ERROR(p.SetCopies(shards));
  return p;
}

}  // namespace expertmesh::planner
