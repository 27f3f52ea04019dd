// Per-token CUDA ops (parameters: elementwise.h). Memory-bound: one pass over the input, one
// over the output; no tensor cores.
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/elementwise.h"

namespace expertmesh::cuda {
namespace {

constexpr float kActMinAmax = 1e-4f;  // core/numerics/quant.h kActQuantMinAmax
constexpr float kFp8Max = 448.0f;

// One warp per (row, 128-channel group); lane l owns channels 4l..4l+3 of the group.
// grid = (T, ceil(groups / 4)), block = 128.
__global__ void ActQuantKernel(const ActQuantParams p) {
  const int row = blockIdx.x;
  const int groups = (p.dim + 127) / 128;
  const int group = blockIdx.y * 4 + (threadIdx.x >> 5);
  if (group >= groups) return;
  const int lane = threadIdx.x & 31;
  const int64_t base = static_cast<int64_t>(row) * p.dim;
  float v[4];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = group * 128 + lane * 4 + i;
    v[i] = c < p.dim ? p.x[base + c] : 0.0f;
    amax = fmaxf(amax, fabsf(v[i]));
  }
  amax = fmaxf(WarpMax(amax), kActMinAmax);
  const float scale = amax / kFp8Max;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = group * 128 + lane * 4 + i;
    if (c < p.dim) p.q[base + c] = ToFp8(v[i] / scale);
  }
  if (lane == 0) p.scales[static_cast<int64_t>(row) * groups + group] = scale;
}

// One CTA of 256 threads per row.
__global__ void RmsNormKernel(const RmsNormParams p) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * p.dim;
  const float inv = BlockInvRms256(p.x + base, p.dim, p.eps);
  for (int c = threadIdx.x; c < p.dim; c += blockDim.x) {
    p.out[base + c] = p.weight[c] * (p.x[base + c] * inv);
  }
}

// One CTA per token, threads over (head, pair).
__global__ void RopeKernel(const RopeParams p) {
  const int token = blockIdx.x;
  const int pairs = p.rope_dim / 2;
  const float pos = static_cast<float>(p.positions[token]);
  for (int i = threadIdx.x; i < p.n_heads * pairs; i += blockDim.x) {
    const int head = i / pairs, k = i % pairs;
    const float angle = pos * p.inv_freq[k];
    const float c = cosf(angle) * p.attention_scaling;
    const float s = sinf(angle) * p.attention_scaling;
    float* x = p.x + static_cast<int64_t>(token) * p.token_stride +
               static_cast<int64_t>(head) * p.head_stride + p.rope_offset + 2 * k;
    const float x0 = x[0], x1 = x[1];
    x[0] = x0 * c - x1 * s;
    x[1] = x0 * s + x1 * c;
  }
}

}  // namespace

cudaError_t LaunchActQuant(const ActQuantParams& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  const int groups = (p.dim + 127) / 128;
  ActQuantKernel<<<dim3(p.n_rows, (groups + 3) / 4), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  RmsNormKernel<<<p.n_rows, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchRope(const RopeParams& p, cudaStream_t stream) {
  if (p.n_tokens == 0) return cudaSuccess;
  RopeKernel<<<p.n_tokens, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace expertmesh::cuda
