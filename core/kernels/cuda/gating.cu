// DeepSeek-V3 gate top-k (parameters: gating.h). One CTA per token. Selection by rank: an
// element is kept when fewer than k others beat it (greater score, or equal score and lower
// index), which is the CPU's "ties to the lowest index" rule without any sort. O(E^2 / threads)
// comparisons per token: 256 per thread for DeepSeek-V3, negligible beside the gate GEMM.
#include <cfloat>

#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/gating.h"

namespace expertmesh::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGroups = 64;

__device__ __forceinline__ bool Beats(float a, int ia, float b, int ib) {
  return a > b || (a == b && ia < ib);
}

__global__ void GateTopkKernel(const GateTopkParams p) {
  __shared__ float s_biased[kGateMaxExperts];
  __shared__ float s_masked[kGateMaxExperts];
  __shared__ unsigned char s_chosen[kGateMaxExperts];
  __shared__ float s_group_score[kMaxGroups];
  __shared__ unsigned char s_group_kept[kMaxGroups];
  const int E = p.n_routed_experts;
  const int group_size = E / p.n_group;
  const float* s = p.scores + static_cast<int64_t>(blockIdx.x) * E;

  for (int e = threadIdx.x; e < E; e += kThreads) s_biased[e] = s[e] + p.correction_bias[e];
  __syncthreads();
  // Group score: the sum of the group's two largest biased scores (its largest alone when a
  // group has one expert).
  for (int gi = threadIdx.x; gi < p.n_group; gi += kThreads) {
    const float* b = s_biased + gi * group_size;
    int i1 = 0;
    for (int i = 1; i < group_size; ++i) {
      if (Beats(b[i], i, b[i1], i1)) i1 = i;
    }
    float sum = 0.0f + b[i1];
    if (group_size > 1) {
      int i2 = i1 == 0 ? 1 : 0;
      for (int i = 0; i < group_size; ++i) {
        if (i != i1 && Beats(b[i], i, b[i2], i2)) i2 = i;
      }
      sum += b[i2];
    }
    s_group_score[gi] = sum;
  }
  __syncthreads();
  for (int gi = threadIdx.x; gi < p.n_group; gi += kThreads) {
    int rank = 0;
    for (int o = 0; o < p.n_group; ++o) {
      rank += Beats(s_group_score[o], o, s_group_score[gi], gi) ? 1 : 0;
    }
    s_group_kept[gi] = rank < p.topk_group;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kThreads) {
    s_masked[e] = s_group_kept[e / group_size] ? s_biased[e] : -INFINITY;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kThreads) {
    int rank = 0;
    const float v = s_masked[e];
    for (int o = 0; o < E; ++o) rank += Beats(s_masked[o], o, v, e) ? 1 : 0;
    s_chosen[e] = rank < p.num_experts_per_tok;
  }
  __syncthreads();
  // Ascending ids, weights summed in that order (as the CPU does).
  if (threadIdx.x == 0) {
    int32_t* ids = p.topk_ids + static_cast<int64_t>(blockIdx.x) * p.num_experts_per_tok;
    float* w = p.topk_weights + static_cast<int64_t>(blockIdx.x) * p.num_experts_per_tok;
    int n = 0;
    float sum = 0.0f;
    for (int e = 0; e < E && n < p.num_experts_per_tok; ++e) {
      if (!s_chosen[e]) continue;
      ids[n] = e;
      w[n] = s[e];
      sum += s[e];
      ++n;
    }
    for (int i = 0; i < n; ++i) {
      float v = w[i];
      if (p.norm_topk_prob) v /= sum + 1e-20f;
      w[i] = v * p.routed_scaling_factor;
    }
  }
}

}  // namespace

cudaError_t LaunchGateTopk(const GateTopkParams& p, cudaStream_t stream) {
  if (p.n_tokens == 0) return cudaSuccess;
  if (p.n_routed_experts <= 0 || p.n_routed_experts > kGateMaxExperts || p.n_group <= 0 ||
      p.n_group > kMaxGroups || p.n_routed_experts % p.n_group != 0 || p.num_experts_per_tok <= 0 ||
      p.num_experts_per_tok > p.n_routed_experts) {
    return cudaErrorInvalidValue;
  }
  GateTopkKernel<<<p.n_tokens, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace expertmesh::cuda
