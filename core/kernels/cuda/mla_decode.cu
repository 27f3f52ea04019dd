// MLA decode attention (parameters: mla_decode.h).
//
// Design note. Per decode step and sequence the kernel reads the whole latent cache once:
// L x D x 2 bytes (DeepSeek-V3: 1152 bytes per token per layer) against 2 x Hq x L x D FLOPs,
// so with 128 heads ~ 128 FLOP/byte if each token is read once for all heads, but Hq times more
// traffic if each head re-reads it. A CTA therefore takes heads_per_cta heads (16 on an H200)
// and streams the sequence's tokens through shared memory in chunks, each token loaded once per
// CTA: traffic = L x D x 2 x (Hq / heads_per_cta). Softmax is online (running max and sum per
// head), so one pass suffices. Not done yet: splitting long sequences over several CTAs
// (FlashMLA's split-KV) for batches with fewer CTAs than SMs, tensor cores for the scores.
#include <cfloat>

#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/mla_decode.h"

namespace expertmesh::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCols = kMlaMaxLoraRank / kThreads;  // latent columns per thread

// grid = (num_heads / heads_per_cta, S). Shared: q [HC, D] f32, kv [TC, D] bf16,
// p [HC, TC] f32.
__global__ void __launch_bounds__(kThreads)
    MlaDecodeKernel(const MlaDecodeParams p, int HC, int TC) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float s_m[kMlaMaxHeadsPerCta], s_l[kMlaMaxHeadsPerCta], s_alpha[kMlaMaxHeadsPerCta];
  const int D = p.kv_lora_rank + p.qk_rope_head_dim;
  const int R = p.kv_lora_rank;
  const int seq = blockIdx.y;
  const int head0 = blockIdx.x * HC;
  float* s_q = reinterpret_cast<float*>(smem);
  uint16_t* s_kv = reinterpret_cast<uint16_t*>(s_q + HC * D);
  float* s_p = reinterpret_cast<float*>(s_kv + ((TC * D + 1) & ~1));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int len = p.seq_lens[seq];

  const float* q = p.q + (static_cast<int64_t>(seq) * p.num_heads + head0) * D;
  for (int i = threadIdx.x; i < HC * D; i += kThreads) s_q[i] = q[i];
  if (threadIdx.x < HC) {
    s_m[threadIdx.x] = -INFINITY;
    s_l[threadIdx.x] = 0.0f;
  }
  float acc[kMlaMaxHeadsPerCta][kMaxCols];
#pragma unroll
  for (int h = 0; h < kMlaMaxHeadsPerCta; ++h)
#pragma unroll
    for (int j = 0; j < kMaxCols; ++j) acc[h][j] = 0.0f;
  __syncthreads();

  for (int t0 = 0; t0 < len; t0 += TC) {
    const int n = min(TC, len - t0);
    // Load the chunk's cache rows (32-bit words; D is even).
    const int words = D / 2;
    for (int i = threadIdx.x; i < n * words; i += kThreads) {
      const int tt = i / words, wi = i % words;
      const int pos = t0 + tt;
      const int page =
          p.block_table[static_cast<int64_t>(seq) * p.max_pages_per_seq + pos / p.page_size];
      const uint32_t* src = reinterpret_cast<const uint32_t*>(
          p.kv_cache + (static_cast<int64_t>(page) * p.page_size + pos % p.page_size) * D);
      reinterpret_cast<uint32_t*>(s_kv + tt * D)[wi] = src[wi];
    }
    __syncthreads();
    // Scores: one warp per (head, token) pair, lanes split D.
    for (int pair = warp; pair < HC * TC; pair += kWarps) {
      const int h = pair / TC, tt = pair % TC;
      float dot = 0.0f;
      if (tt < n) {
        for (int c = lane; c < D; c += 32) dot += s_q[h * D + c] * Bf16Bits(s_kv[tt * D + c]);
        dot = WarpSum(dot);
      }
      if (lane == 0) s_p[h * TC + tt] = tt < n ? dot * p.softmax_scale : -INFINITY;
    }
    __syncthreads();
    // Online softmax bookkeeping: warp w owns heads w, w + 8, ...
    for (int h = warp; h < HC; h += kWarps) {
      float m_chunk = -INFINITY;
      for (int tt = lane; tt < TC; tt += 32) m_chunk = fmaxf(m_chunk, s_p[h * TC + tt]);
      m_chunk = WarpMax(m_chunk);
      const float m_old = s_m[h];  // every lane keeps the old max in a register
      const float m_new = fmaxf(m_old, m_chunk);
      float sum = 0.0f;
      for (int tt = lane; tt < TC; tt += 32) {
        const float e = expf(s_p[h * TC + tt] - m_new);  // -inf -> 0
        s_p[h * TC + tt] = e;
        sum += e;
      }
      sum = WarpSum(sum);
      // Every lane has read s_m[h] (above) before lane 0 overwrites it: an explicit barrier, not
      // the shuffles' implicit one, so compute-sanitizer's racecheck sees the ordering.
      __syncwarp();
      if (lane == 0) {
        const float alpha = expf(m_old - m_new);  // m_old = -inf on the first chunk -> 0
        s_alpha[h] = alpha;
        s_l[h] = s_l[h] * alpha + sum;
        s_m[h] = m_new;
      }
    }
    __syncthreads();
    // acc[h][c] = acc[h][c] * alpha[h] + sum_t p[h][t] * c_kv[t][c].
#pragma unroll
    for (int j = 0; j < kMaxCols; ++j) {
      const int c = threadIdx.x + j * kThreads;
      if (c >= R) break;
#pragma unroll
      for (int h = 0; h < kMlaMaxHeadsPerCta; ++h) {
        if (h < HC) acc[h][j] *= s_alpha[h];
      }
      for (int tt = 0; tt < n; ++tt) {
        const float kv = Bf16Bits(s_kv[tt * D + c]);  // read once, used by every head
#pragma unroll
        for (int h = 0; h < kMlaMaxHeadsPerCta; ++h) {
          if (h < HC) acc[h][j] += s_p[h * TC + tt] * kv;
        }
      }
    }
    __syncthreads();
  }

  const int64_t out_base = (static_cast<int64_t>(seq) * p.num_heads + head0);
#pragma unroll
  for (int h = 0; h < kMlaMaxHeadsPerCta; ++h) {
    if (h >= HC) break;
    const float inv_l = s_l[h] > 0.0f ? 1.0f / s_l[h] : 0.0f;  // empty sequence -> zeros
#pragma unroll
    for (int j = 0; j < kMaxCols; ++j) {
      const int c = threadIdx.x + j * kThreads;
      if (c >= R) break;
      p.out[(out_base + h) * R + c] = acc[h][j] * inv_l;
    }
    if (p.lse != nullptr && threadIdx.x == 0) {
      p.lse[out_base + h] = s_l[h] > 0.0f ? s_m[h] + logf(s_l[h]) : -INFINITY;
    }
  }
}

}  // namespace

cudaError_t LaunchMlaDecode(const MlaDecodeParams& p, int heads_per_cta, int tokens_per_chunk,
                            int smem_bytes, cudaStream_t stream) {
  if (p.n_seqs == 0) return cudaSuccess;
  if (heads_per_cta <= 0 || heads_per_cta > kMlaMaxHeadsPerCta ||
      p.num_heads % heads_per_cta != 0 || tokens_per_chunk <= 0 || tokens_per_chunk > 32 ||
      p.kv_lora_rank > kMlaMaxLoraRank || p.kv_lora_rank % 2 != 0 || p.qk_rope_head_dim % 2 != 0) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaFuncSetAttribute(MlaDecodeKernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  MlaDecodeKernel<<<dim3(p.num_heads / heads_per_cta, p.n_seqs), kThreads, smem_bytes, stream>>>(
      p, heads_per_cta, tokens_per_chunk);
  return cudaGetLastError();
}

cudaError_t MlaDecodeStaticSmemBytes(int64_t* bytes) {
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, MlaDecodeKernel);
  if (err == cudaSuccess) *bytes = static_cast<int64_t>(attr.sharedSizeBytes);
  return err;
}

}  // namespace expertmesh::cuda
