#include <algorithm>
#include <vector>

#include "core/engine/mla_attention.h"
#include "core/kernels/cpu/cpu_kernels.h"

namespace expertmesh {

// The absorbed attention core with the SIMD kernels (core/engine/mla_attention.h), one sequence at
// a time: every query of the sequence (its new rows x heads, each [W_uk^T q_nope | q_pe], one cache
// row long) is scored against each cached row in one pass over that row (simd::DotRows), and the
// context sums read each cached row once for all queries. wkv_b: kv_b_proj dequantized [H * (nope +
// v_dim), rank]; slice k's query rows first_i[k] .. n - 1 are rows q_first[k] .. of q: [Tq, H *
// qk_head_dim] (RoPE applied) and of attn: [Tq, H * v_dim].
void AbsorbedAttentionSimd(const AbsorbedAttentionArgs& a, float* attn) {
  const ModelConfig& c = a.config;
  const float *wkv_b = a.wkv_b, *q = a.q;
  const float scale = a.scale;
  const int cache_layer = a.cache_layer;
  const std::span<const SequenceSlice> seqs = a.seqs;
  const std::span<const int64_t> q_first = a.q_first, first_i = a.first_i;
  const int64_t H = c.num_attention_heads, nope = c.qk_nope_head_dim;
  const int64_t rope_dim = c.qk_rope_head_dim, v_dim = c.v_head_dim;
  const int64_t rank = c.kv_lora_rank, R = rank + rope_dim, qk_head_dim = c.qk_head_dim();
  std::vector<float> queries, scores, ctx;
  for (size_t k = 0; k < seqs.size(); ++k) {
    const SequenceSlice& s = seqs[k];
    const MlaKvCache& cache = *s.cache;
    const int64_t i0 = first_i[k], n = s.n - i0;  // query rows i0 .. s.n - 1
    const int64_t Q = n * H, L = s.start + s.n;
    queries.assign(Q * R, 0.0f);  // query (i, h) at row (i - i0) * H + h
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < H; ++h) {
        const float* qh = q + ((q_first[k] + i) * H + h) * qk_head_dim;
        const float* w_uk = wkv_b + h * (nope + v_dim) * rank;
        float* ql = queries.data() + (i * H + h) * R;
        for (int64_t d = 0; d < nope; ++d) {
          for (int64_t r = 0; r < rank; ++r) ql[r] += qh[d] * w_uk[d * rank + r];
        }
        std::copy(qh + nope, qh + nope + rope_dim, ql + rank);
      }
    }
    // scores: [Q, L]; row i sees positions < start + i0 + i + 1 (the rest: computed, unused).
    scores.resize(Q * L);
    for (int64_t j = 0; j < L; ++j) {
      simd::DotRows(cache.Slot(cache_layer, j), queries.data(), Q, R, R, scores.data() + j, L);
    }
    for (int64_t qi = 0; qi < Q; ++qi) {
      float* row = scores.data() + qi * L;
      const int64_t visible = s.start + i0 + qi / H + 1;
      for (int64_t j = 0; j < visible; ++j) row[j] *= scale;
      Softmax(row, visible);
    }
    ctx.assign(Q * rank, 0.0f);
    for (int64_t j = 0; j < L; ++j) {
      const float* slot = cache.Slot(cache_layer, j);
      for (int64_t qi = 0; qi < Q; ++qi) {
        if (j >= s.start + i0 + qi / H + 1) continue;  // masked
        const float p = scores[qi * L + j];
        float* cq = ctx.data() + qi * rank;
        for (int64_t r = 0; r < rank; ++r) cq[r] += p * slot[r];
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < H; ++h) {
        const float* w_uv = wkv_b + (h * (nope + v_dim) + nope) * rank;
        float* o = attn + ((q_first[k] + i) * H + h) * v_dim;
        simd::DotRows(ctx.data() + (i * H + h) * rank, w_uv, v_dim, rank, rank, o, 1);
      }
    }
  }
}

}  // namespace expertmesh
