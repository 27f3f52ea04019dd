// The few small CUDA ops the GPU engine (cuda_engine.h) needs beyond the existing kernels:
// embedding / row gather, the gate's sigmoid, SwiGLU, the MLA cache write (kv_a_layernorm + BF16
// store into the paged cache) and FP8 activation dequantization (for FP8 weights run as float
// GEMMs). All memory-bound, one pass; launched only by cuda_engine.cc. Dimension legend: T =
// tokens, D = channels, P = pages, B = page_size.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace expertmesh::cuda {

// out[i, :] = table[ids[i], :]; table [rows, dim] float, out [n, dim].
cudaError_t LaunchGatherRows(const float* table, const int32_t* ids, int32_t n, int32_t dim,
                             float* out, cudaStream_t stream);

// x[i] = 1 / (1 + exp(-x[i])) over n values (the MoE gate's scores).
cudaError_t LaunchSigmoid(float* x, int64_t n, cudaStream_t stream);

// The same from a BF16 table (rows widened exactly).
cudaError_t LaunchGatherRowsBf16(const uint16_t* table, const int32_t* ids, int32_t n, int32_t dim,
                                 float* out, cudaStream_t stream);

// gate[i] = silu(gate[i]) * up[i] over n values (SwiGLU between gate/up and down).
cudaError_t LaunchSwiglu(float* gate, const float* up, int64_t n, cudaStream_t stream);

// MLA cache write of T new tokens into one layer of a paged BF16 cache:
//   cache[slot[t]] = bf16([rmsnorm(kv[t, :kv_lora_rank]) * norm_weight | kv[t, kv_lora_rank:]])
// kv: [T, kv_lora_rank + qk_rope_head_dim] float (RoPE already applied to k_pe);
// slot[t] = page * page_size + offset; cache: [P * B, kv_lora_rank + qk_rope_head_dim] bf16.
struct KvCacheWriteParams {
  int32_t n_tokens = 0;
  int32_t kv_lora_rank = 0;
  int32_t qk_rope_head_dim = 0;
  float eps = 1e-6f;
  const float* kv = nullptr;
  const float* norm_weight = nullptr;  // kv_a_layernorm [kv_lora_rank]
  const int64_t* slot = nullptr;       // [T]
  uint16_t* cache = nullptr;
};
cudaError_t LaunchKvCacheWrite(const KvCacheWriteParams& p, cudaStream_t stream);

// x[t, c] = e4m3(q[t, c]) * scales[t, c / 128]; q: [T, D], scales: [T, ceil(D / 128)].
cudaError_t LaunchDequantActivations(const uint8_t* q, const float* scales, int32_t n_rows,
                                     int32_t dim, float* x, cudaStream_t stream);

}  // namespace expertmesh::cuda
