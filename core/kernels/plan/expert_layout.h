// Host-side grouping of a batch's (row, expert) pairs for grouped expert GEMMs.
//
// The gate gives each row (token) a few (expert, weight) pairs (ExpertRoutes, CSR by row).
// A grouped GEMM wants the opposite order: all rows of expert 0, then all rows of expert 1, ...
// so that each expert's weights are streamed once for all of its rows. This file builds that
// "contiguous layout" (DeepGEMM's name): one slot per pair, slots grouped by expert, with
//   - expert_offsets: slots of local expert e are [expert_offsets[e], expert_offsets[e+1]),
//   - slot_row / slot_weight: the source row and gate weight of each slot (gather map),
//   - row_slots (CSR by row, same offsets as the routes): for each row its slots in ascending
//     expert order (scatter map). The combine sums a row's slot outputs in that order, which
//     is the RoutedExperts contract's order, so the result is independent of the batch.
// and the tile schedule of a grouped GEMM (which M tile of which expert each CTA row handles).
// No CUDA here: it is compiled and unit-tested on every machine.
//
// Dimension legend: R = rows (tokens) in the batch, P = (row, expert) pairs, E = local experts.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/experts.h"

namespace expertmesh {

struct ExpertLayout {
  int32_t n_experts = 0;                // E
  std::vector<int32_t> expert_offsets;  // [E + 1], slot ranges per expert
  std::vector<int32_t> slot_row;        // [P], source row of each slot
  std::vector<float> slot_weight;       // [P], gate weight of each slot
  std::vector<int32_t> row_offsets;     // [R + 1], == routes.offsets
  std::vector<int32_t> row_slots;       // [P], slots of each row, ascending expert order

  int64_t n_rows() const { return static_cast<int64_t>(row_offsets.size()) - 1; }
  int64_t n_slots() const { return static_cast<int64_t>(slot_row.size()); }
  int32_t rows_of(int32_t e) const { return expert_offsets[e + 1] - expert_offsets[e]; }
  int32_t max_rows_per_expert() const;
  int32_t active_experts() const;  // experts with at least one slot
};

// Groups routes by expert. Experts must be local ids in [0, n_experts), strictly ascending
// within a row (the ExpertRoutes contract), weights finite. Within an expert, slots keep row
// order (stable), so the layout is a pure function of the routes.
absl::StatusOr<ExpertLayout> BuildExpertLayout(const ExpertRoutes& routes, int32_t n_experts);

// One CTA row of a grouped GEMM: rows [slot_begin, slot_end) of expert `expert`,
// slot_end - slot_begin <= block_m; the tile's last rows may be a ragged edge.
struct GemmTile {
  int32_t expert = 0;
  int32_t slot_begin = 0;
  int32_t slot_end = 0;
  bool operator==(const GemmTile&) const = default;
};

// Tiles in expert order, then slot order; experts without rows get no tile.
std::vector<GemmTile> BuildTileSchedule(const ExpertLayout& layout, int32_t block_m);

// Reference combine on the host (what the device combine kernel computes):
// out[r, :] = sum over row r's slots in ascending expert order of slot_out[slot, :].
// slot_out: [P, dim] (already multiplied by the slot weight); out: [R, dim], overwritten.
void CombineSlots(const ExpertLayout& layout, std::span<const float> slot_out, int64_t dim,
                  std::span<float> out);

}  // namespace expertmesh
