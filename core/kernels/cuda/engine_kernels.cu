// Small per-token kernels of the GPU engine (parameters: engine_kernels.h). Memory-bound:
// one CTA per row or a grid-stride loop, no shared-memory tiling.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/engine_kernels.h"

namespace expertmesh::cuda {
namespace {

__global__ void GatherRowsKernel(const float* table, const int32_t* ids, int32_t dim, float* out) {
  const int64_t src = static_cast<int64_t>(ids[blockIdx.x]) * dim;
  const int64_t dst = static_cast<int64_t>(blockIdx.x) * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) out[dst + c] = table[src + c];
}

__global__ void GatherRowsBf16Kernel(const uint16_t* table, const int32_t* ids, int32_t dim,
                                     float* out) {
  const int64_t src = static_cast<int64_t>(ids[blockIdx.x]) * dim;
  const int64_t dst = static_cast<int64_t>(blockIdx.x) * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) out[dst + c] = Bf16Bits(table[src + c]);
}

__global__ void SigmoidKernel(float* x, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] = 1.0f / (1.0f + expf(-x[i]));
  }
}

__global__ void SwigluKernel(float* gate, const float* up, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

// One CTA of 256 threads per token.
__global__ void KvCacheWriteKernel(const KvCacheWriteParams p) {
  const int dim = p.kv_lora_rank + p.qk_rope_head_dim;
  const float* row = p.kv + static_cast<int64_t>(blockIdx.x) * dim;
  uint16_t* dst = p.cache + p.slot[blockIdx.x] * dim;
  const float inv = BlockInvRms256(row, p.kv_lora_rank, p.eps);
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    const float v = c < p.kv_lora_rank ? p.norm_weight[c] * (row[c] * inv) : row[c];
    dst[c] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
}

__global__ void DequantActivationsKernel(const uint8_t* q, const float* scales, int32_t dim,
                                         float* x) {
  const int groups = (dim + 127) / 128;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    const __half_raw h = __nv_cvt_fp8_to_halfraw(q[base + c], __NV_E4M3);
    x[base + c] =
        __half2float(__half(h)) * scales[static_cast<int64_t>(blockIdx.x) * groups + c / 128];
  }
}

}  // namespace

cudaError_t LaunchGatherRows(const float* table, const int32_t* ids, int32_t n, int32_t dim,
                             float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  GatherRowsKernel<<<n, 256, 0, stream>>>(table, ids, dim, out);
  return cudaGetLastError();
}

cudaError_t LaunchGatherRowsBf16(const uint16_t* table, const int32_t* ids, int32_t n, int32_t dim,
                                 float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  GatherRowsBf16Kernel<<<n, 256, 0, stream>>>(table, ids, dim, out);
  return cudaGetLastError();
}

cudaError_t LaunchSigmoid(float* x, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 4096);
  SigmoidKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(x, n);
  return cudaGetLastError();
}

cudaError_t LaunchSwiglu(float* gate, const float* up, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 4096);
  SwigluKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(gate, up, n);
  return cudaGetLastError();
}

cudaError_t LaunchKvCacheWrite(const KvCacheWriteParams& p, cudaStream_t stream) {
  if (p.n_tokens == 0) return cudaSuccess;
  KvCacheWriteKernel<<<p.n_tokens, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchDequantActivations(const uint8_t* q, const float* scales, int32_t n_rows,
                                     int32_t dim, float* x, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  DequantActivationsKernel<<<n_rows, 256, 0, stream>>>(q, scales, dim, x);
  return cudaGetLastError();
}

}  // namespace expertmesh::cuda
