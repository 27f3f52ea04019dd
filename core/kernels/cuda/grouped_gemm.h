// Parameters of the routed-expert grouped GEMM (FP8, DeepSeek block scales): plain structs of
// device pointers, shared by the kernels (grouped_gemm.cuh), the dispatcher and the tests.
//
// One launch computes, for every slot s of the contiguous layout
// (core/kernels/plan/expert_layout.h),
//   h[s]        = quant_1x128( silu(x[row] W_gate^T) * (x[row] W_up^T) )    (gate/up kernel)
//   slot_out[s] = weight[s] * (h[s] W_down^T)                              (down kernel)
// and then out[r] = sum of row r's slot_out in ascending expert order      (combine kernel).
// Dimension legend: R = rows, P = slots ((row, expert) pairs), E = local experts,
// H = hidden_size, I = moe_intermediate_size, I_pad = ceil(I / 128) * 128.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/kernels/cuda/host_device.h"

namespace expertmesh::cuda {

// Device pointers of one routed expert, as the checkpoint stores it (W ~= fp8 * scale_inv).
struct ExpertWeightPtrs {
  const uint8_t* gate = nullptr;      // gate_proj.weight [I, H] e4m3
  const float* gate_scale = nullptr;  // gate_proj.weight_scale_inv [ceil(I/128), ceil(H/128)]
  const uint8_t* up = nullptr;        // up_proj.weight [I, H] e4m3
  const float* up_scale = nullptr;    // [ceil(I/128), ceil(H/128)]
  const uint8_t* down = nullptr;      // down_proj.weight [H, I] e4m3
  const float* down_scale = nullptr;  // [ceil(H/128), ceil(I/128)]
};

struct GroupedExpertsParams {
  int32_t hidden_size = 0;                    // H, multiple of 16
  int32_t moe_intermediate_size = 0;          // I, multiple of 16
  int32_t n_rows = 0;                         // R
  int32_t n_slots = 0;                        // P
  int32_t n_tiles = 0;                        // entries of `tiles`
  const ExpertWeightPtrs* experts = nullptr;  // [E]
  const uint8_t* x = nullptr;                 // [R, H] e4m3
  const float* x_scales = nullptr;            // [R, ceil(H/128)]
  const int32_t* slot_row = nullptr;          // [P]
  const float* slot_weight = nullptr;         // [P]
  const int32_t* tiles = nullptr;             // [n_tiles, 3]: expert, slot_begin, slot_end
  const int32_t* row_offsets = nullptr;       // [R + 1]
  const int32_t* row_slots = nullptr;         // [P]
  uint8_t* h = nullptr;                       // workspace [P, I_pad] e4m3
  float* h_scales = nullptr;                  // workspace [P, I_pad / 128]
  float* slot_out = nullptr;                  // workspace [P, H]
  float* out = nullptr;                       // [R, H]
  // Dense mode (tiles == nullptr, slot_weight == nullptr): one weight for all rows; used by
  // the FP8 linear layer below through the down kernel.
  ExpertWeightPtrs dense;
};

// A plain FP8 linear layer y = x W^T with DeepSeek's scales (attention projections, dense and
// shared MLPs), computed by the down kernel in dense mode:
//   x: [R, K] e4m3 with x_scales [R, K / 128] (K = in_features, a multiple of 128),
//   weight: [N, K] e4m3 with weight_scale_inv [ceil(N / 128), K / 128], y: [R, N] float.
struct Fp8LinearParams {
  int32_t n_rows = 0;        // R
  int32_t in_features = 0;   // K
  int32_t out_features = 0;  // N, multiple of 16
  const uint8_t* x = nullptr;
  const float* x_scales = nullptr;
  const uint8_t* weight = nullptr;
  const float* weight_scale_inv = nullptr;
  float* y = nullptr;
};

EM_HOST_DEVICE int64_t PaddedIntermediate(int64_t moe_intermediate_size) {
  return (moe_intermediate_size + 127) / 128 * 128;
}
// Bytes of the three workspaces for P slots (each 256-byte aligned when carved in this order).
int64_t GroupedExpertsWorkspaceBytes(int64_t n_slots, int64_t hidden_size,
                                     int64_t moe_intermediate_size);
// Points p.h, p.h_scales and p.slot_out into `workspace` (GroupedExpertsWorkspaceBytes long).
void CarveGroupedExpertsWorkspace(void* workspace, GroupedExpertsParams& p);

// Kernel launchers, one per MMA path (grouped_gemm_fp8.cu, grouped_gemm_f16.cu); block_m is
// 16 or 64. Callers go through dispatch.h, which chooses the path and block_m per device.
cudaError_t LaunchGroupedExpertsFp8(const GroupedExpertsParams& p, int block_m,
                                    cudaStream_t stream);
cudaError_t LaunchGroupedExpertsF16(const GroupedExpertsParams& p, int block_m,
                                    cudaStream_t stream);
cudaError_t LaunchFp8LinearFp8(const Fp8LinearParams& p, int block_m, cudaStream_t stream);
cudaError_t LaunchFp8LinearF16(const Fp8LinearParams& p, int block_m, cudaStream_t stream);
// Static (__shared__ array) bytes of a path's kernels at tile height block_m on the current
// device (cudaFuncGetAttributes), which the dynamic bytes of the plan must leave room for.
cudaError_t GroupedGemmStaticSmemBytesFp8(int block_m, int64_t* bytes);
cudaError_t GroupedGemmStaticSmemBytesF16(int block_m, int64_t* bytes);

}  // namespace expertmesh::cuda
