// Highway compiles the kernel below once per SIMD target (foreach_target.h); the core is
// compiled once (HWY_ONCE).
#include <algorithm>
#include <vector>

#include "core/engine/mla_attention.h"
#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/cpu/thread_pool.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "core/engine/mla_attention_simd.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace expertmesh::mla {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// out[a * out_stride + r] += p[a * p_stride + j] * rows[j][r] for j = 0 .. count[a] - 1 in
// turn, r < width, a < n. Each element is a chain of separately rounded products and sums (Mul,
// then Add: no FMA), exactly the scalar loop `o[r] += p * row[r]`. Four outputs' 4 vectors stay
// in registers while the rows stream by, so each row is loaded once per four outputs.
void AccumulateRowsImpl(const float* const* rows, const float* p, int64_t p_stride,
                        const int64_t* count, int64_t n, int64_t width, float* out,
                        int64_t out_stride) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t a = 0;
  for (; a + 4 <= n; a += 4) {
    float* o0 = out + a * out_stride;
    float* o1 = o0 + out_stride;
    float* o2 = o1 + out_stride;
    float* o3 = o2 + out_stride;
    const float* p0 = p + a * p_stride;
    const float* p1 = p0 + p_stride;
    const float* p2 = p1 + p_stride;
    const float* p3 = p2 + p_stride;
    const int64_t n0 = count[a], n1 = count[a + 1], n2 = count[a + 2], n3 = count[a + 3];
    const int64_t jmax = std::max(std::max(n0, n1), std::max(n2, n3));
    int64_t r = 0;
    for (; r + 2 * N <= width; r += 2 * N) {
      auto a00 = hn::LoadU(d, o0 + r), a01 = hn::LoadU(d, o0 + r + N);
      auto a10 = hn::LoadU(d, o1 + r), a11 = hn::LoadU(d, o1 + r + N);
      auto a20 = hn::LoadU(d, o2 + r), a21 = hn::LoadU(d, o2 + r + N);
      auto a30 = hn::LoadU(d, o3 + r), a31 = hn::LoadU(d, o3 + r + N);
      for (int64_t j = 0; j < jmax; ++j) {
        const auto s0 = hn::LoadU(d, rows[j] + r), s1 = hn::LoadU(d, rows[j] + r + N);
        if (j < n0) {
          const auto v = hn::Set(d, p0[j]);
          a00 = hn::Add(a00, hn::Mul(v, s0));
          a01 = hn::Add(a01, hn::Mul(v, s1));
        }
        if (j < n1) {
          const auto v = hn::Set(d, p1[j]);
          a10 = hn::Add(a10, hn::Mul(v, s0));
          a11 = hn::Add(a11, hn::Mul(v, s1));
        }
        if (j < n2) {
          const auto v = hn::Set(d, p2[j]);
          a20 = hn::Add(a20, hn::Mul(v, s0));
          a21 = hn::Add(a21, hn::Mul(v, s1));
        }
        if (j < n3) {
          const auto v = hn::Set(d, p3[j]);
          a30 = hn::Add(a30, hn::Mul(v, s0));
          a31 = hn::Add(a31, hn::Mul(v, s1));
        }
      }
      hn::StoreU(a00, d, o0 + r);
      hn::StoreU(a01, d, o0 + r + N);
      hn::StoreU(a10, d, o1 + r);
      hn::StoreU(a11, d, o1 + r + N);
      hn::StoreU(a20, d, o2 + r);
      hn::StoreU(a21, d, o2 + r + N);
      hn::StoreU(a30, d, o3 + r);
      hn::StoreU(a31, d, o3 + r + N);
    }
    for (; r < width; ++r) {  // the columns past the last two-vector step
      for (int64_t k = 0; k < 4; ++k) {
        float acc = out[(a + k) * out_stride + r];
        const float* pk = p + (a + k) * p_stride;
        for (int64_t j = 0; j < count[a + k]; ++j) acc += pk[j] * rows[j][r];
        out[(a + k) * out_stride + r] = acc;
      }
    }
  }
  for (; a < n; ++a) {  // the last n % 4 outputs, one at a time
    float* o = out + a * out_stride;
    const float* pa = p + a * p_stride;
    int64_t r = 0;
    for (; r + N <= width; r += N) {
      auto acc = hn::LoadU(d, o + r);
      for (int64_t j = 0; j < count[a]; ++j) {
        acc = hn::Add(acc, hn::Mul(hn::Set(d, pa[j]), hn::LoadU(d, rows[j] + r)));
      }
      hn::StoreU(acc, d, o + r);
    }
    for (; r < width; ++r) {
      float acc = o[r];
      for (int64_t j = 0; j < count[a]; ++j) acc += pa[j] * rows[j][r];
      o[r] = acc;
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace expertmesh::mla
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace expertmesh {
namespace mla {
HWY_EXPORT(AccumulateRowsImpl);
}  // namespace mla

namespace {
void AccumulateRows(const float* const* rows, const float* p, int64_t p_stride,
                    const int64_t* count, int64_t n, int64_t width, float* out,
                    int64_t out_stride) {
  HWY_DYNAMIC_DISPATCH(mla::AccumulateRowsImpl)
  (rows, p, p_stride, count, n, width, out, out_stride);
}
}  // namespace

// The absorbed attention core with the SIMD kernels (core/engine/mla_attention.h). The batch's
// query rows (all slices, in q's order) go in blocks of rows; per block:
//  1. per head, its W_UK read once for the block's rows: query (t, h) = [W_UK^T q_nope | q_pe],
//     one cache row long;
//  2. per slice in the block, in sub-blocks of queries (their scores under the working-set
//     bound, scored only over the cached rows the sub-block's last query sees): the scores in
//     tiles of cached rows x queries (simd::DotRows), softmax per query, and the context sums
//     (AccumulateRows) passing over the cached rows in tiles, each tile once per thread;
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
  std::vector<const float*> slots;
  std::vector<int64_t> vis;
  for (int64_t t0 = 0; t0 < Tq; t0 += rows_per_block) {
    const int64_t nb = std::min(rows_per_block, Tq - t0);
    queries.assign(nb * H * R, 0.0f);  // query (t0 + t, h) at row t * H + h
    ctx.assign(nb * H * rank, 0.0f);
    // 1. Absorbed queries.
    const std::vector<int64_t> all_nope(nb, nope);
    cpu::ParallelFor(H, 1, [&](int64_t h0, int64_t h1) {
      std::vector<const float*> w_uk(nope);
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t d = 0; d < nope; ++d) w_uk[d] = wkv_b + (h * (nope + v_dim) + d) * rank;
        // ql[r] = sum over d in turn of q_nope[d] * W_UK[d, r], for the block's rows.
        AccumulateRows(w_uk.data(), q + (t0 * H + h) * qk_head_dim, H * qk_head_dim,
                       all_nope.data(), nb, rank, queries.data() + h * R, H * R);
        for (int64_t t = 0; t < nb; ++t) {
          const float* qh = q + ((t0 + t) * H + h) * qk_head_dim;
          std::copy(qh + nope, qh + nope + rope_dim, queries.data() + (t * H + h) * R + rank);
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
        // In tiles of 64 cached rows x 64 queries, both in the L2 cache while they meet.
        cpu::ParallelFor(Ls, 16, [&](int64_t j0, int64_t j1) {
          constexpr int64_t kTile = 64;
          for (int64_t jt = j0; jt < j1; jt += kTile) {
            const int64_t jt_end = std::min(jt + kTile, j1);
            for (int64_t qt = 0; qt < nq; qt += kTile) {
              const int64_t nqt = std::min(kTile, nq - qt);
              for (int64_t j = jt; j < jt_end; ++j) {
                simd::DotRows(cache.Slot(cache_layer, j), qs + qt * R, nqt, R, R,
                              scores.data() + qt * Ls + j, Ls);
              }
            }
          }
        });
        cpu::ParallelFor(nq, 8, [&](int64_t i0, int64_t i1) {
          for (int64_t qi = i0; qi < i1; ++qi) {
            float* row = scores.data() + qi * Ls;
            const int64_t seen = visible(qi);
            for (int64_t j = 0; j < seen; ++j) row[j] *= scale;
            Softmax(row, seen);
          }
        });
        // ctx[qi] = sum over the visible cached rows j in turn of p[qi, j] * c_kv[j].
        slots.resize(Ls);
        for (int64_t j = 0; j < Ls; ++j) slots[j] = cache.Slot(cache_layer, j);
        vis.resize(nq);
        for (int64_t qi = 0; qi < nq; ++qi) vis[qi] = visible(qi);
        // In tiles of 128 cached rows (in the L2 cache while every query of the range passes
        // over them), in increasing order: each sum still adds its rows in turn.
        cpu::ParallelFor(nq, 8, [&](int64_t i0, int64_t i1) {
          constexpr int64_t kTile = 128;
          std::vector<int64_t> count(i1 - i0);
          for (int64_t jt = 0; jt < Ls; jt += kTile) {
            for (int64_t qi = i0; qi < i1; ++qi) {
              count[qi - i0] = std::clamp<int64_t>(vis[qi] - jt, 0, std::min(kTile, Ls - jt));
            }
            AccumulateRows(slots.data() + jt, scores.data() + i0 * Ls + jt, Ls, count.data(),
                           i1 - i0, rank, ctx.data() + (q0 + i0) * rank, rank);
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
#endif  // HWY_ONCE
