// Template bodies of the routed-expert grouped GEMM (parameters: grouped_gemm.h). Included only
// by grouped_gemm_fp8.cu and grouped_gemm_f16.cu, which instantiate one MMA path each.
//
// Design note.
// Work: per slot 2*H*I (gate, up) + H*I (down) multiply-adds. DeepSeek-V3 (H 7168, I 2048):
// 88 MFLOP per slot; weights 44 MB per expert (FP8).
// Decode (1..16 rows per expert): each weight byte is used by at most 16 rows, about 1-32
//   FLOP/byte, far below an H200's ~400 FLOP/byte ridge (~1979 TFLOP/s FP8 dense over 4.8
//   TB/s): the kernel is a weight stream. A 16-row tile (block_m 16) loads nothing twice; the
//   measure is GB/s of weights against a device-to-device copy.
// Prefill (hundreds of rows per expert): a 64 x 256 tile with K steps of 128 does 64*256*128
//   MACs per 40 KB of shared-memory loads, ~100 FLOP/byte from L2; the measure is TFLOP/s
//   against cuBLASLt FP8 on the same work.
// Structure (both kernels): one CTA = one tile of <= block_m slots of one expert (GemmTile) x
//   256 weight rows (gate/up: 128 gate + 128 up rows, so SwiGLU and the 1x128 requantization
//   of the intermediate happen in registers; down: 256 output columns). 8 warps, each owns
//   block_m rows x 32 of the 256 columns. K advances by 128 (one scale block) per stage through
//   a two-stage cp.async pipeline; shared rows are padded to 144 bytes so that the 32-bit
//   fragment loads of a warp hit 32 different banks.
// Numerics (as DeepSeek's FP8 GEMM): each 128-deep K block is summed on tensor cores into a
//   fresh FP32 partial, which is multiplied by activation scale x weight scale and added to the
//   FP32 accumulator ("promotion"). The intermediate h = silu(gate) * up is quantized per
//   slot per 128 channels with scale = max(amax, 1e-4) / 448, exactly as core/numerics/quant.h. The
//   down kernel writes weight * result per slot; a combine kernel sums each row's slots in
//   ascending expert order -- no atomics, so a row's result never depends on the batch.
// Not done yet (measure first): split-K for decode batches that give fewer CTAs than SMs,
//   ldmatrix / swizzled layouts, wgmma on sm_90, TMA multicast.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/grouped_gemm.h"

namespace expertmesh::cuda::grouped_gemm {

constexpr int kBlockN = 256;
constexpr int kBlockK = 128;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 2;
constexpr int kPitch = frag::kPitch;  // bytes per shared row (128 + 16 padding)
constexpr float kActMinAmax = 1e-4f;  // core/numerics/quant.h kActQuantMinAmax
constexpr float kFp8Max = 448.0f;

enum class Mma { kF16FromFp8, kFp8 };
enum class Phase { kGateUp, kDown };

template <Mma M>
__device__ __forceinline__ void MmaStep(float (&d)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[2]) {
  if constexpr (M == Mma::kFp8) {
    MmaFp8(d, a, b);
  } else {
    MmaF16FromFp8(d, a, b);
  }
}

template <Mma M>
__host__ __device__ constexpr bool CompiledForThisArch() {
#if defined(__CUDA_ARCH__)
  // NOTES: FP8 MMA exists from sm_89; the FP16 path compiles everywhere so that a Hopper or
  // Ada machine can test the sm_86 numerics too.
  return M == Mma::kF16FromFp8 || __CUDA_ARCH__ >= 890;
#else
  return false;
#endif
}

__host__ __device__ constexpr int SmemBytes(int block_m) {
  return kStages * (block_m + kBlockN) * kPitch;
}

// GateUp: A = x rows gathered by slot, B = [gate rows n0..n0+127 ; up rows n0..n0+127],
//   grid = (n_tiles, I_pad / 128), writes h and h_scales.
// Down:   A = h rows of the tile's slots, B = down rows n0..n0+255,
//   grid = (n_tiles, ceil(H / 256)), writes slot_out.
template <Mma M, Phase P, int MT>
__global__ void __launch_bounds__(kThreads, 1) GroupedGemmKernel(const GroupedExpertsParams p) {
  if constexpr (CompiledForThisArch<M>()) {
    constexpr int kBlockM = 16 * MT;
    constexpr float kUnscale = M == Mma::kFp8 ? 1.0f : kF16FromFp8Unscale;
    extern __shared__ __align__(16) uint8_t smem[];
    uint8_t* s_a = smem;                               // [kStages][kBlockM][kPitch]
    uint8_t* s_b = smem + kStages * kBlockM * kPitch;  // [kStages][kBlockN][kPitch]
    __shared__ int32_t s_arow[kBlockM];                // A row of each tile row, -1 past the end
    __shared__ float s_amax[kWarps][kBlockM];          // gate/up epilogue

    // Dense mode (tiles == null, a plain FP8 linear layer): CTA row x = rows [x * block_m, ...)
    // of the one weight in p.dense.
    const bool dense = p.tiles == nullptr;
    const int32_t slot_begin = dense ? blockIdx.x * kBlockM : p.tiles[3 * blockIdx.x + 1];
    const int32_t rows =
        (dense ? min(p.n_slots, slot_begin + kBlockM) : p.tiles[3 * blockIdx.x + 2]) - slot_begin;
    const ExpertWeightPtrs w = dense ? p.dense : p.experts[p.tiles[3 * blockIdx.x]];
    const int H = p.hidden_size;
    const int I = p.moe_intermediate_size;
    const int I_pad = static_cast<int>(PaddedIntermediate(I));
    const int K = P == Phase::kGateUp ? H : I;
    const int N = P == Phase::kGateUp ? I : H;  // rows of each B matrix
    const int n_kb = (K + kBlockK - 1) / kBlockK;
    const int n0 = blockIdx.y * (P == Phase::kGateUp ? 128 : kBlockN);
    const uint8_t* a_base = P == Phase::kGateUp ? p.x : p.h;
    const int64_t a_stride = P == Phase::kGateUp ? H : I_pad;
    const float* a_scales = P == Phase::kGateUp ? p.x_scales : p.h_scales;
    const int64_t a_scale_stride = P == Phase::kGateUp ? (H + 127) / 128 : I_pad / 128;

    for (int i = threadIdx.x; i < kBlockM; i += kThreads) {
      s_arow[i] =
          i >= rows ? -1 : (P == Phase::kGateUp ? p.slot_row[slot_begin + i] : slot_begin + i);
    }
    __syncthreads();

    auto load_stage = [&](int stage, int kb) {
      const int k0 = kb * kBlockK;
      uint8_t* a_dst = s_a + stage * kBlockM * kPitch;
      uint8_t* b_dst = s_b + stage * kBlockN * kPitch;
      for (int c = threadIdx.x; c < kBlockM * 8; c += kThreads) {
        const int r = c >> 3, kc = (c & 7) * 16;
        const int src = s_arow[r];
        const bool valid = src >= 0 && k0 + kc < K;
        const uint8_t* g = valid ? a_base + src * a_stride + k0 + kc : a_base;
        CpAsync16(a_dst + r * kPitch + kc, g, valid);
      }
#pragma unroll
      for (int i = 0; i < kBlockN * 8 / kThreads; ++i) {
        const int c = threadIdx.x + i * kThreads;
        const int r = c >> 3, kc = (c & 7) * 16;
        const uint8_t* mat;
        int n;
        if constexpr (P == Phase::kGateUp) {
          mat = r < 128 ? w.gate : w.up;
          n = n0 + (r & 127);
        } else {
          mat = w.down;
          n = n0 + r;
        }
        const bool valid = n < N && k0 + kc < K;
        const uint8_t* g = valid ? mat + static_cast<int64_t>(n) * K + k0 + kc : mat;
        CpAsync16(b_dst + r * kPitch + kc, g, valid);
      }
    };

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = lane & 3;  // thread in its quad
    // Shared B rows of this warp's four n8 tiles: gate/up take 16 gate + the same 16 up rows, so
    // the thread that holds gate[r][c] also holds up[r][c].
    int b_row[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) b_row[j] = frag::BRow(P == Phase::kGateUp, warp, j);
    // Weight scale rows (128-row blocks) of the warp's columns.
    const int n_kb_w = n_kb;  // scale columns of a weight = ceil(K / 128)
    const float* sb_row[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (P == Phase::kGateUp) {
        sb_row[j] = (j < 2 ? w.gate_scale : w.up_scale) + (n0 / 128) * n_kb_w;
      } else {
        const int nb = min((n0 + 32 * warp) / 128, (N - 1) / 128);  // clamp: edge warps idle
        sb_row[j] = w.down_scale + nb * n_kb_w;
      }
    }

    float acc[MT][4][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][j][c] = 0.0f;

    load_stage(0, 0);
    CpAsyncCommit();
    for (int kb = 0; kb < n_kb; ++kb) {
      if (kb + 1 < n_kb) {
        load_stage((kb + 1) & 1, kb + 1);
        CpAsyncCommit();
        CpAsyncWait<1>();
      } else {
        CpAsyncWait<0>();
      }
      __syncthreads();
      // Scales of this K block, read before the MMAs so that their latency overlaps.
      float sa[MT][2], sb[4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int src = s_arow[frag::AccRow(m, lane, 2 * half)];
          sa[m][half] = src >= 0 ? a_scales[src * a_scale_stride + kb] * kUnscale : 0.0f;
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) sb[j] = sb_row[j][kb];

      const uint8_t* a_s = s_a + (kb & 1) * kBlockM * kPitch;
      const uint8_t* b_s = s_b + (kb & 1) * kBlockN * kPitch;
      float part[MT][4][4];
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) part[m][j][c] = 0.0f;
#pragma unroll 2
      for (int ks = 0; ks < kBlockK / 32; ++ks) {
        uint32_t bf[4][2];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          bf[j][0] = LoadSmemU32(b_s + frag::BOffset(b_row[j], ks, lane, 0));
          bf[j][1] = LoadSmemU32(b_s + frag::BOffset(b_row[j], ks, lane, 1));
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          uint32_t af[4];
#pragma unroll
          for (int reg = 0; reg < 4; ++reg)
            af[reg] = LoadSmemU32(a_s + frag::AOffset(m, ks, lane, reg));
#pragma unroll
          for (int j = 0; j < 4; ++j) MmaStep<M>(part[m][j], af, bf[j]);
        }
      }
      // Promotion: acc += partial * scale_a * scale_b, per 128-deep K block.
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[m][j][c] += part[m][j][c] * (sa[m][c >> 1] * sb[j]);
      __syncthreads();  // the next iteration's loads overwrite this stage
    }

    if constexpr (P == Phase::kGateUp) {
      // h = silu(gate) * up on the thread's values: acc[m][jj] is gate, acc[m][jj + 2] is up;
      // h replaces gate in place (registers are the limit of the 64-row tile).
      auto& h = acc;
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const float gv = acc[m][jj][c];
            h[m][jj][c] = gv / (1.0f + expf(-gv)) * acc[m][jj + 2][c];
          }
          // Row amax over the CTA's 128 columns: thread -> quad -> warp (smem) -> CTA.
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float a = 0.0f;
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            a = fmaxf(a, fabsf(h[m][jj][2 * half]));
            a = fmaxf(a, fabsf(h[m][jj][2 * half + 1]));
          }
          a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 1));
          a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 2));
          if (t == 0) s_amax[warp][frag::AccRow(m, lane, 2 * half)] = a;
        }
      __syncthreads();
      const int i_blocks = I_pad / 128;
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = frag::AccRow(m, lane, 2 * half);
          if (r >= rows) continue;
          float amax = kActMinAmax;
#pragma unroll
          for (int v = 0; v < kWarps; ++v) amax = fmaxf(amax, s_amax[v][r]);
          const float scale = amax / kFp8Max;
          const int64_t slot = slot_begin + r;
          uint8_t* h_row = p.h + slot * I_pad + n0;
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {  // gate tiles: shared B row = intermediate column
            const uint16_t q = static_cast<uint16_t>(ToFp8(h[m][jj][2 * half] / scale)) |
                               static_cast<uint16_t>(ToFp8(h[m][jj][2 * half + 1] / scale)) << 8;
            *reinterpret_cast<uint16_t*>(h_row + frag::AccBRow(b_row[jj], lane, 0)) = q;
          }
          if (warp == 0 && t == 0) p.h_scales[slot * i_blocks + blockIdx.y] = scale;
        }
    } else {
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = frag::AccRow(m, lane, 2 * half);
          if (r >= rows) continue;
          const int64_t slot = slot_begin + r;
          const float weight = p.slot_weight != nullptr ? p.slot_weight[slot] : 1.0f;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int col = n0 + frag::AccBRow(b_row[j], lane, 0);
            if (col >= H) continue;  // H % 16 == 0, so col + 1 < H too
            *reinterpret_cast<float2*>(p.slot_out + slot * H + col) =
                make_float2(acc[m][j][2 * half] * weight, acc[m][j][2 * half + 1] * weight);
          }
        }
    }
  } else {
#if defined(__CUDA_ARCH__)
    __trap();  // the dispatcher never launches a path on an arch it is not compiled for
#endif
  }
}

// out[r] = sum of slot_out over row r's slots in ascending expert order (core CombineSlots).
// grid = R. A template only so that each path's .cu holds its own copy.
template <Mma M>
__global__ void CombineSlotsKernel(const GroupedExpertsParams p) {
  const int r = blockIdx.x;
  const int H = p.hidden_size;
  const int begin = p.row_offsets[r], end = p.row_offsets[r + 1];
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float sum = 0.0f;
    for (int q = begin; q < end; ++q)
      sum += p.slot_out[static_cast<int64_t>(p.row_slots[q]) * H + c];
    p.out[static_cast<int64_t>(r) * H + c] = sum;
  }
}

template <Mma M, int MT>
cudaError_t LaunchForTile(const GroupedExpertsParams& p, cudaStream_t stream) {
  constexpr int kSmem = SmemBytes(16 * MT);
  auto gate_up = GroupedGemmKernel<M, Phase::kGateUp, MT>;
  auto down = GroupedGemmKernel<M, Phase::kDown, MT>;
  cudaError_t err =
      cudaFuncSetAttribute(gate_up, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(down, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  const unsigned i_blocks =
      static_cast<unsigned>(PaddedIntermediate(p.moe_intermediate_size) / 128);
  const unsigned h_blocks = static_cast<unsigned>((p.hidden_size + kBlockN - 1) / kBlockN);
  if (p.n_tiles > 0) {
    gate_up<<<dim3(p.n_tiles, i_blocks), kThreads, kSmem, stream>>>(p);
    down<<<dim3(p.n_tiles, h_blocks), kThreads, kSmem, stream>>>(p);
  }
  if (p.n_rows > 0) CombineSlotsKernel<M><<<p.n_rows, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

template <Mma M>
cudaError_t Launch(const GroupedExpertsParams& p, int block_m, cudaStream_t stream) {
  switch (block_m) {
    case 16:
      return LaunchForTile<M, 1>(p, stream);
    case 64:
      return LaunchForTile<M, 4>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// y [R, N] = x [R, K] . W^T through the down kernel in dense mode (weight 1, no gather).
template <Mma M, int MT>
cudaError_t LaunchLinearForTile(const Fp8LinearParams& lp, cudaStream_t stream) {
  constexpr int kSmem = SmemBytes(16 * MT);
  auto down = GroupedGemmKernel<M, Phase::kDown, MT>;
  cudaError_t err = cudaFuncSetAttribute(down, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  GroupedExpertsParams p;
  p.hidden_size = lp.out_features;           // N: B rows and output columns
  p.moe_intermediate_size = lp.in_features;  // K (a multiple of 128: rows are not padded)
  p.n_rows = lp.n_rows;
  p.n_slots = lp.n_rows;
  // The down kernel only reads h and h_scales (they are the gate/up kernel's outputs).
  p.h = const_cast<uint8_t*>(lp.x);
  p.h_scales = const_cast<float*>(lp.x_scales);
  p.slot_out = lp.y;
  p.dense.down = lp.weight;
  p.dense.down_scale = lp.weight_scale_inv;
  if (lp.n_rows == 0) return cudaSuccess;
  const unsigned m_tiles = static_cast<unsigned>((lp.n_rows + 16 * MT - 1) / (16 * MT));
  const unsigned n_tiles = static_cast<unsigned>((lp.out_features + kBlockN - 1) / kBlockN);
  down<<<dim3(m_tiles, n_tiles), kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

// Static shared memory of the tile height's kernels (the larger of gate/up and down) on the
// current device.
template <Mma M, int MT>
cudaError_t StaticSmemForTile(int64_t* bytes) {
  cudaFuncAttributes gate_up{}, down{};
  cudaError_t err = cudaFuncGetAttributes(&gate_up, GroupedGemmKernel<M, Phase::kGateUp, MT>);
  if (err != cudaSuccess) return err;
  err = cudaFuncGetAttributes(&down, GroupedGemmKernel<M, Phase::kDown, MT>);
  if (err != cudaSuccess) return err;
  *bytes =
      static_cast<int64_t>(gate_up.sharedSizeBytes > down.sharedSizeBytes ? gate_up.sharedSizeBytes
                                                                          : down.sharedSizeBytes);
  return cudaSuccess;
}

template <Mma M>
cudaError_t StaticSmem(int block_m, int64_t* bytes) {
  switch (block_m) {
    case 16:
      return StaticSmemForTile<M, 1>(bytes);
    case 64:
      return StaticSmemForTile<M, 4>(bytes);
    default:
      return cudaErrorInvalidValue;
  }
}

template <Mma M>
cudaError_t LaunchLinear(const Fp8LinearParams& p, int block_m, cudaStream_t stream) {
  switch (block_m) {
    case 16:
      return LaunchLinearForTile<M, 1>(p, stream);
    case 64:
      return LaunchLinearForTile<M, 4>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace expertmesh::cuda::grouped_gemm
