// Parameters of MLA decode attention over the paged latent cache (absorbed form, as FlashMLA):
// each cached token holds [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)] in BF16; the query of
// head h is [q_nope_h W_UK (kv_lora_rank) | q_pe_h (qk_rope_head_dim)], so
//   score(h, t) = softmax_scale * q_h . cache[t]          over all D = kv_lora_rank + rope dims
//   out_h       = sum_t softmax(score)(h, t) * c_kv[t]     (latent; the caller applies W_UV)
// One query token per sequence (decode). Launch shape from core/kernels/plan/kernel_plan.h
// PlanMlaDecode. Dimension legend: S = sequences, Hq = heads on this GPU, D = kv_lora_rank +
// qk_rope_head_dim.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace expertmesh::cuda {

inline constexpr int kMlaMaxHeadsPerCta = 16;
inline constexpr int kMlaMaxLoraRank = 1024;

struct MlaDecodeParams {
  int32_t n_seqs = 0;        // S
  int32_t num_heads = 0;     // Hq
  int32_t kv_lora_rank = 0;  // <= kMlaMaxLoraRank, even
  int32_t qk_rope_head_dim = 0;
  int32_t page_size = 0;          // tokens per cache page
  int32_t max_pages_per_seq = 0;  // columns of block_table
  float softmax_scale = 1.0f;
  const float* q = nullptr;              // [S, Hq, D]
  const uint16_t* kv_cache = nullptr;    // [n_pages, page_size, D] bf16 (one layer)
  const int32_t* block_table = nullptr;  // [S, max_pages_per_seq] page ids
  const int32_t* seq_lens = nullptr;     // [S] cached tokens (>= 0)
  float* out = nullptr;                  // [S, Hq, kv_lora_rank]
  float* lse = nullptr;                  // [S, Hq] log-sum-exp of the scaled scores, or null
};

// heads_per_cta divides num_heads and is <= kMlaMaxHeadsPerCta; smem_bytes from the plan.
cudaError_t LaunchMlaDecode(const MlaDecodeParams& p, int heads_per_cta, int tokens_per_chunk,
                            int smem_bytes, cudaStream_t stream);

// Static (__shared__ array) bytes of the decode kernel on the current device, as
// cudaFuncGetAttributes reports them; the plan adds them to its dynamic bytes.
cudaError_t MlaDecodeStaticSmemBytes(int64_t* bytes);

}  // namespace expertmesh::cuda
