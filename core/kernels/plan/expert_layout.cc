#include "core/kernels/plan/expert_layout.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_format.h"

namespace expertmesh {

int32_t ExpertLayout::max_rows_per_expert() const {
  int32_t m = 0;
  for (int32_t e = 0; e < n_experts; ++e) m = std::max(m, rows_of(e));
  return m;
}

int32_t ExpertLayout::active_experts() const {
  int32_t n = 0;
  for (int32_t e = 0; e < n_experts; ++e) n += rows_of(e) > 0 ? 1 : 0;
  return n;
}

absl::StatusOr<ExpertLayout> BuildExpertLayout(const ExpertRoutes& routes, int32_t n_experts) {
  if (n_experts <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat("n_experts must be > 0, got %d", n_experts));
  }
  const int64_t n_rows = routes.n_rows();
  if (n_rows < 0 || routes.offsets.empty() || routes.offsets.front() != 0) {
    return absl::InvalidArgumentError("routes.offsets must start with 0");
  }
  const int64_t n_pairs = routes.offsets.back();
  if (static_cast<int64_t>(routes.experts.size()) != n_pairs ||
      static_cast<int64_t>(routes.weights.size()) != n_pairs) {
    return absl::InvalidArgumentError(
        absl::StrFormat("routes: offsets end at %d but %d experts and %d weights", n_pairs,
                        routes.experts.size(), routes.weights.size()));
  }

  // Pass 1: validate and count rows per expert.
  std::vector<int32_t> counts(n_experts, 0);
  for (int64_t r = 0; r < n_rows; ++r) {
    const int32_t begin = routes.offsets[r], end = routes.offsets[r + 1];
    if (end < begin || end > n_pairs) {
      return absl::InvalidArgumentError(
          absl::StrFormat("routes.offsets not monotone at row %d", r));
    }
    for (int32_t p = begin; p < end; ++p) {
      const int32_t e = routes.experts[p];
      if (e < 0 || e >= n_experts) {
        return absl::InvalidArgumentError(
            absl::StrFormat("row %d: expert %d outside [0, %d)", r, e, n_experts));
      }
      if (p > begin && routes.experts[p - 1] >= e) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "row %d: experts not strictly ascending (%d then %d)", r, routes.experts[p - 1], e));
      }
      if (!std::isfinite(routes.weights[p])) {
        return absl::InvalidArgumentError(absl::StrFormat("row %d: weight is not finite", r));
      }
      ++counts[e];
    }
  }

  ExpertLayout layout;
  layout.n_experts = n_experts;
  layout.expert_offsets.assign(n_experts + 1, 0);
  for (int32_t e = 0; e < n_experts; ++e) {
    layout.expert_offsets[e + 1] = layout.expert_offsets[e] + counts[e];
  }
  layout.slot_row.resize(n_pairs);
  layout.slot_weight.resize(n_pairs);
  layout.row_offsets = routes.offsets;
  layout.row_slots.resize(n_pairs);

  // Pass 2: place pairs. Rows are visited in order, so each expert's slots are in row order;
  // a row's pairs are in ascending expert order, so row_slots follows that order too.
  std::vector<int32_t> cursor(layout.expert_offsets.begin(), layout.expert_offsets.end() - 1);
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int32_t p = routes.offsets[r]; p < routes.offsets[r + 1]; ++p) {
      const int32_t slot = cursor[routes.experts[p]]++;
      layout.slot_row[slot] = static_cast<int32_t>(r);
      layout.slot_weight[slot] = routes.weights[p];
      layout.row_slots[p] = slot;
    }
  }
  return layout;
}

std::vector<GemmTile> BuildTileSchedule(const ExpertLayout& layout, int32_t block_m) {
  std::vector<GemmTile> tiles;
  for (int32_t e = 0; e < layout.n_experts; ++e) {
    for (int32_t s = layout.expert_offsets[e]; s < layout.expert_offsets[e + 1]; s += block_m) {
      tiles.push_back({e, s, std::min(s + block_m, layout.expert_offsets[e + 1])});
    }
  }
  return tiles;
}

void CombineSlots(const ExpertLayout& layout, std::span<const float> slot_out, int64_t dim,
                  std::span<float> out) {
  for (int64_t r = 0; r < layout.n_rows(); ++r) {
    float* o = out.data() + r * dim;
    std::fill(o, o + dim, 0.0f);
    for (int32_t p = layout.row_offsets[r]; p < layout.row_offsets[r + 1]; ++p) {
      const float* y = slot_out.data() + static_cast<int64_t>(layout.row_slots[p]) * dim;
      for (int64_t c = 0; c < dim; ++c) o[c] += y[c];
    }
  }
}

}  // namespace expertmesh
