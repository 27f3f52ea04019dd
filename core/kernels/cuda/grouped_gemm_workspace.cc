// Workspace carving of the grouped expert GEMM (host code; see grouped_gemm.h).
#include <cstdint>

#include "core/kernels/cuda/grouped_gemm.h"

namespace expertmesh::cuda {
namespace {

int64_t Align256(int64_t n) { return (n + 255) / 256 * 256; }

}  // namespace

int64_t GroupedExpertsWorkspaceBytes(int64_t n_slots, int64_t hidden_size,
                                     int64_t moe_intermediate_size) {
  const int64_t i_pad = PaddedIntermediate(moe_intermediate_size);
  return Align256(n_slots * i_pad) + Align256(n_slots * (i_pad / 128) * 4) +
         Align256(n_slots * hidden_size * 4);
}

void CarveGroupedExpertsWorkspace(void* workspace, GroupedExpertsParams& p) {
  const int64_t i_pad = PaddedIntermediate(p.moe_intermediate_size);
  auto* base = static_cast<uint8_t*>(workspace);
  p.h = base;
  base += Align256(int64_t{p.n_slots} * i_pad);
  p.h_scales = reinterpret_cast<float*>(base);
  base += Align256(int64_t{p.n_slots} * (i_pad / 128) * 4);
  p.slot_out = reinterpret_cast<float*>(base);
}

}  // namespace expertmesh::cuda
