// A plan's placement in the router's terms (placement/placement.h): shard group i = expert
// card i of the pool, copies included, so `expertmesh plan --placement-out FILE` writes a file
// the router's --placement accepts (through PlacementToJson, never by hand).
#pragma once

#include "absl/status/statusor.h"
#include "placement/placement.h"
#include "planner/planner.h"

namespace expertmesh::planner {

absl::StatusOr<Placement> ToPlacement(const Plan& plan);

}  // namespace expertmesh::planner
