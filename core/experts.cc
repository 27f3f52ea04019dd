#include "core/experts.h"

#include <cassert>

namespace expertmesh {

void ExpertRoutes::AddRow(std::span<const int32_t> e, std::span<const float> w) {
  assert(e.size() == w.size());
  experts.insert(experts.end(), e.begin(), e.end());
  weights.insert(weights.end(), w.begin(), w.end());
  offsets.push_back(static_cast<int32_t>(experts.size()));
}

}  // namespace expertmesh
