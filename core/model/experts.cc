#include "core/model/experts.h"

#include <cassert>
#include <string>

namespace expertmesh {

void ExpertRoutes::AddRow(std::span<const int32_t> e, std::span<const float> w) {
  assert(e.size() == w.size());
  experts.insert(experts.end(), e.begin(), e.end());
  weights.insert(weights.end(), w.begin(), w.end());
  offsets.push_back(static_cast<int32_t>(experts.size()));
}

absl::Status RoutedExperts::RunUnquantized(int layer, std::span<const float>, const ExpertRoutes&,
                                           std::span<float>) {
  return absl::UnimplementedError("this RoutedExperts takes FP8 activations only (layer " +
                                  std::to_string(layer) + ")");
}

}  // namespace expertmesh
