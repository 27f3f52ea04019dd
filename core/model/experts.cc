#include "core/model/experts.h"

#include <algorithm>
#include <bit>
#include <cassert>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/numerics/numerics.h"

namespace expertmesh {

void ExpertRoutes::AddRow(std::span<const int32_t> e, std::span<const float> w) {
  assert(e.size() == w.size());
  experts.insert(experts.end(), e.begin(), e.end());
  weights.insert(weights.end(), w.begin(), w.end());
  offsets.push_back(static_cast<int32_t>(experts.size()));
}

void AddWeightedBf16(std::span<float> out_row, float weight, const uint16_t* y_bf16, int64_t H) {
  assert(static_cast<int64_t>(out_row.size()) >= H);
  float* out = out_row.data();
  for (int64_t d = 0; d < H; ++d) {
    // Bf16ToFloat, spelled out so that the loop vectorizes.
    out[d] += weight * std::bit_cast<float>(static_cast<uint32_t>(y_bf16[d]) << 16);
  }
}

absl::Status CombinePerExpert(const ExpertRoutes& routes, std::span<const uint16_t> pair_out,
                              int64_t H, std::span<float> out) {
  const int64_t n_rows = routes.n_rows();
  const int64_t n_pairs = std::ssize(routes.experts);
  if (H <= 0 || static_cast<int64_t>(out.size()) != n_rows * H ||
      static_cast<int64_t>(pair_out.size()) != n_pairs * H ||
      std::ssize(routes.weights) != n_pairs || routes.offsets.back() != n_pairs) {
    return absl::InvalidArgumentError(
        absl::StrCat("combine: ", n_rows, " rows and ", n_pairs, " pairs of hidden_size ", H,
                     " but ", out.size(), " output and ", pair_out.size(), " per-pair values"));
  }
  std::fill(out.begin(), out.end(), 0.0f);
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int32_t p = routes.offsets[r]; p < routes.offsets[r + 1]; ++p) {
      AddWeightedBf16(out.subspan(r * H, H), routes.weights[p], pair_out.data() + p * H, H);
    }
  }
  return absl::OkStatus();
}

absl::Status RoutedExperts::RunUnquantized(int layer, std::span<const float>, const ExpertRoutes&,
                                           std::span<float>) {
  return absl::UnimplementedError("this RoutedExperts takes FP8 activations only (layer " +
                                  std::to_string(layer) + ")");
}

absl::Status RoutedExperts::RunPerExpert(int layer, const QuantizedActivations& x,
                                         const ExpertRoutes& routes, std::span<uint16_t> pair_out) {
  const int64_t H = x.dim;
  const int64_t n_rows = routes.n_rows();
  const int64_t n_pairs = std::ssize(routes.experts);
  if (n_rows != x.n_rows || static_cast<int64_t>(pair_out.size()) != n_pairs * H) {
    return absl::InvalidArgumentError(
        absl::StrCat("per-expert run: ", n_rows, " routed rows, ", x.n_rows, " activation rows, ",
                     n_pairs, " pairs but ", pair_out.size(), " output values"));
  }
  int32_t max_k = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    max_k = std::max(max_k, routes.offsets[r + 1] - routes.offsets[r]);
  }
  std::vector<float> out(static_cast<size_t>(n_rows * H));
  for (int32_t k = 0; k < max_k; ++k) {
    // Rank k: every row's k-th pair alone, weight 1 (rows with fewer pairs route nowhere).
    ExpertRoutes one;
    one.offsets.reserve(static_cast<size_t>(n_rows) + 1);
    for (int64_t r = 0; r < n_rows; ++r) {
      const int32_t p = routes.offsets[r] + k;
      if (p < routes.offsets[r + 1]) {
        const float w = 1.0f;
        one.AddRow(std::span<const int32_t>(&routes.experts[p], 1), std::span<const float>(&w, 1));
      } else {
        one.AddRow({}, {});
      }
    }
    if (absl::Status s = Run(layer, x, one, out); !s.ok()) return s;
    for (int64_t r = 0; r < n_rows; ++r) {
      const int32_t p = routes.offsets[r] + k;
      if (p >= routes.offsets[r + 1]) continue;
      FloatToBf16(std::span<const float>(out.data() + r * H, H), pair_out.subspan(p * H, H));
    }
  }
  return absl::OkStatus();
}

}  // namespace expertmesh
