#include <algorithm>
#include <vector>

#include "core/engine/mla_attention.h"
#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/cpu/thread_pool.h"

namespace expertmesh {

// The absorbed attention core with the SIMD kernels (core/engine/mla_attention.h). The batch's
// query rows (all slices, in q's order) go in blocks of rows; per block:
//  1. per head, its W_UK read once for the block's rows: query (t, h) = [W_UK^T q_nope | q_pe],
//     one cache row long;
//  2. per slice in the block, in sub-blocks of queries: every cached row scored against all the
//     sub-block's queries in one pass over that row (simd::DotRows), softmax per query, and the
//     context sums reading each cached row once for all the sub-block's queries;
//  3. per head, its W_UV read once for the block's rows: o = W_UV ctx.
// Heads (1, 3), cached rows (scores) and queries (softmax, sums) are split over the kernel
// threads (core/kernels/cpu/thread_pool.h); each value is computed by the same operations in the
// same order whatever the split or the blocks, so the result does not depend on either.
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
  // Query row t (a row of q and of attn): its slice, and how many cached rows it sees.
  int64_t Tq = 0;
  for (size_t k = 0; k < seqs.size(); ++k) Tq += seqs[k].n - first_i[k];
  if (Tq == 0) return;
  std::vector<int32_t> row_seq(Tq);
  std::vector<int64_t> row_visible(Tq);
  for (size_t k = 0; k < seqs.size(); ++k) {
    for (int64_t i = first_i[k]; i < seqs[k].n; ++i) {
      const int64_t t = q_first[k] + i - first_i[k];
      row_seq[t] = static_cast<int32_t>(k);
      row_visible[t] = seqs[k].start + i + 1;
    }
  }
  const int64_t budget = std::max<int64_t>(a.workspace_floats, 1);
  const int64_t rows_per_block = std::clamp<int64_t>(budget / (H * (R + rank)), 1, Tq);
  std::vector<float> queries, ctx, scores;
  for (int64_t t0 = 0; t0 < Tq; t0 += rows_per_block) {
    const int64_t nb = std::min(rows_per_block, Tq - t0);
    queries.assign(nb * H * R, 0.0f);  // query (t0 + t, h) at row t * H + h
    ctx.assign(nb * H * rank, 0.0f);
    // 1. Absorbed queries.
    cpu::ParallelFor(H, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        const float* w_uk = wkv_b + h * (nope + v_dim) * rank;
        for (int64_t t = 0; t < nb; ++t) {
          const float* qh = q + ((t0 + t) * H + h) * qk_head_dim;
          float* ql = queries.data() + (t * H + h) * R;
          for (int64_t d = 0; d < nope; ++d) {
            for (int64_t r = 0; r < rank; ++r) ql[r] += qh[d] * w_uk[d * rank + r];
          }
          std::copy(qh + nope, qh + nope + rope_dim, ql + rank);
        }
      }
    });
    // 2. Each slice's queries in the block: queries [qa, qb) of the block's buffer.
    for (int64_t t = t0; t < t0 + nb;) {
      const int32_t k = row_seq[t];
      const MlaKvCache& cache = *seqs[k].cache;
      const int64_t seg_end = std::min(t0 + nb, q_first[k] + seqs[k].n - first_i[k]);
      const int64_t qa = (t - t0) * H, qb = (seg_end - t0) * H;
      const int64_t per_sub = std::clamp<int64_t>(budget / row_visible[seg_end - 1], 1, qb - qa);
      for (int64_t q0 = qa; q0 < qb; q0 += per_sub) {
        const int64_t q1 = std::min(q0 + per_sub, qb), nq = q1 - q0;
        auto visible = [&](int64_t qi) { return row_visible[t0 + (q0 + qi) / H]; };
        // scores: [nq, Ls]; query qi sees cached rows < visible(qi) (the rest: computed, unused).
        const int64_t Ls = visible(nq - 1);
        scores.resize(nq * Ls);
        const float* qs = queries.data() + q0 * R;
        cpu::ParallelFor(Ls, 16, [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) {
            simd::DotRows(cache.Slot(cache_layer, j), qs, nq, R, R, scores.data() + j, Ls);
          }
        });
        cpu::ParallelFor(nq, 8, [&](int64_t i0, int64_t i1) {
          for (int64_t qi = i0; qi < i1; ++qi) {
            float* row = scores.data() + qi * Ls;
            const int64_t vis = visible(qi);
            for (int64_t j = 0; j < vis; ++j) row[j] *= scale;
            Softmax(row, vis);
          }
        });
        cpu::ParallelFor(nq, 8, [&](int64_t i0, int64_t i1) {
          for (int64_t j = 0; j < Ls; ++j) {
            const float* slot = cache.Slot(cache_layer, j);
            for (int64_t qi = i0; qi < i1; ++qi) {
              if (j >= visible(qi)) continue;  // masked
              const float p = scores[qi * Ls + j];
              float* cq = ctx.data() + (q0 + qi) * rank;
              for (int64_t r = 0; r < rank; ++r) cq[r] += p * slot[r];
            }
          }
        });
      }
      t = seg_end;
    }
    // 3. Outputs.
    cpu::ParallelFor(H, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        const float* w_uv = wkv_b + (h * (nope + v_dim) + nope) * rank;
        for (int64_t t = 0; t < nb; ++t) {
          simd::DotRows(ctx.data() + (t * H + h) * rank, w_uv, v_dim, rank, rank,
                        attn + ((t0 + t) * H + h) * v_dim, 1);
        }
      }
    });
  }
}

}  // namespace expertmesh
