#include "core/engine/layers.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/engine/mla_attention.h"
#include "core/kernels/cpu/cpu_kernels.h"
#include "core/numerics/quant.h"

namespace expertmesh {

namespace {

float Silu(float x) { return x / (1.0f + std::exp(-x)); }

// Fixed-order dot product (sequential), used where the operands are activations.
float DotSeq(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// YaRN's m(s) = 0.1 * mscale * ln(s) + 1 for s > 1.
double YarnMscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

}  // namespace

void Softmax(float* p, int64_t len) {
  float max = p[0];
  for (int64_t j = 1; j < len; ++j) max = std::max(max, p[j]);
  float sum = 0.0f;
  for (int64_t j = 0; j < len; ++j) {
    p[j] = std::exp(p[j] - max);
    sum += p[j];
  }
  for (int64_t j = 0; j < len; ++j) p[j] /= sum;
}

void RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, double eps, float* y) {
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * dim;
    float* yt = y + t * dim;
    double sum_sq = 0.0;
    for (int64_t i = 0; i < dim; ++i) sum_sq += static_cast<double>(xt[i]) * xt[i];
    const float variance = static_cast<float>(sum_sq / dim);
    const float r = 1.0f / std::sqrt(variance + static_cast<float>(eps));
    for (int64_t i = 0; i < dim; ++i) yt[i] = weight[i] * (xt[i] * r);
  }
}

Rope::Rope(const ModelConfig& c) {
  const int64_t dim = c.qk_rope_head_dim;
  const double base = c.rope_theta;
  const RopeScaling& rs = c.rope_scaling;
  inv_freq_.resize(dim / 2);
  double softmax_scale = 1.0 / std::sqrt(static_cast<double>(c.qk_head_dim()));
  if (rs.type != "yarn") {
    for (int64_t i = 0; i < dim / 2; ++i) {
      inv_freq_[i] = 1.0f / std::pow(static_cast<float>(base), static_cast<float>(2 * i) / dim);
    }
    softmax_scale_ = static_cast<float>(softmax_scale);
    return;
  }
  // YaRN: frequencies below the beta_slow rotation count are interpolated (divided by
  // factor), those above beta_fast kept, with a linear ramp between the two correction dims.
  const double factor = rs.factor;
  auto correction_dim = [&](double rotations) {
    return dim *
           std::log(rs.original_max_position_embeddings / (rotations * 2 * std::numbers::pi)) /
           (2 * std::log(base));
  };
  double low = std::max(std::floor(correction_dim(rs.beta_fast)), 0.0);
  double high = std::min(std::ceil(correction_dim(rs.beta_slow)), static_cast<double>(dim - 1));
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float pos_freq = std::pow(static_cast<float>(base), static_cast<float>(2 * i) / dim);
    const float extrapolation = 1.0f / pos_freq;
    const float interpolation = 1.0f / (static_cast<float>(factor) * pos_freq);
    const float ramp = std::clamp(static_cast<float>((i - low) / (high - low)), 0.0f, 1.0f);
    const float extrapolation_factor = 1.0f - ramp;
    inv_freq_[i] =
        interpolation * (1.0f - extrapolation_factor) + extrapolation * extrapolation_factor;
  }
  // cos/sin scaling as transformers computes it: m(mscale) / m(mscale_all_dim) when both are
  // set, m(1) otherwise (1.0 for DeepSeek-V3, whose two fields are equal).
  if (rs.mscale != 0.0 && rs.mscale_all_dim != 0.0) {
    attention_factor_ =
        static_cast<float>(YarnMscale(factor, rs.mscale) / YarnMscale(factor, rs.mscale_all_dim));
  } else {
    attention_factor_ = static_cast<float>(YarnMscale(factor, 1.0));
  }
  if (rs.mscale_all_dim != 0.0) {
    const double m = YarnMscale(factor, rs.mscale_all_dim);
    softmax_scale *= m * m;
  }
  softmax_scale_ = static_cast<float>(softmax_scale);
}

void Rope::Apply(float* x, int64_t pos) const {
  for (size_t i = 0; i < inv_freq_.size(); ++i) {
    const float angle = static_cast<float>(pos) * inv_freq_[i];
    const float cos = std::cos(angle) * attention_factor_;
    const float sin = std::sin(angle) * attention_factor_;
    const float x0 = x[2 * i];
    const float x1 = x[2 * i + 1];
    x[2 * i] = x0 * cos - x1 * sin;
    x[2 * i + 1] = x1 * cos + x0 * sin;
  }
}

namespace {}  // namespace

void MlaForward(const ModelConfig& c, const MlaWeights& w, const Rope& rope, int cache_layer,
                MlaKvCache& cache, int64_t start, const float* x, int64_t n, float* out,
                const LayerOptions& opt) {
  const SequenceSlice seq{&cache, start, 0, n};
  MlaForwardBatch(c, w, rope, cache_layer, {&seq, 1}, x, n, out, opt, false);
}

namespace {

// Which rows of a batch are queried: every row, or with last_rows_only the last of each
// slice. Slice k's queries are query rows q_first[k] .. and cover its rows [first_i[k], n).
struct QueryRows {
  std::vector<int64_t> q_first, first_i;
  int64_t Tq = 0;
};

QueryRows PlanQueryRows(std::span<const SequenceSlice> seqs, bool last_rows_only) {
  QueryRows r;
  r.q_first.resize(seqs.size());
  r.first_i.resize(seqs.size());
  for (size_t k = 0; k < seqs.size(); ++k) {
    r.first_i[k] = last_rows_only ? seqs[k].n - 1 : 0;
    r.q_first[k] = r.Tq;
    r.Tq += seqs[k].n - r.first_i[k];
  }
  return r;
}

// q: [Tq, H * qk_head_dim], per head [q_nope | q_pe] (RoPE not yet applied).
std::vector<float> ProjectQueries(const ModelConfig& c, const MlaWeights& w, const float* xq,
                                  int64_t Tq, const LayerOptions& opt) {
  const bool quant = opt.quantize_activations;
  std::vector<float> q(Tq * c.num_attention_heads * c.qk_head_dim());
  if (w.q_proj) {
    w.q_proj->Forward(xq, Tq, q.data(), quant, opt.kernel);
  } else {
    std::vector<float> q_a(Tq * c.q_lora_rank);
    w.q_a_proj->Forward(xq, Tq, q_a.data(), quant, opt.kernel);
    RmsNorm(q_a.data(), w.q_a_layernorm.data(), Tq, c.q_lora_rank, c.rms_norm_eps, q_a.data());
    w.q_b_proj->Forward(q_a.data(), Tq, q.data(), quant, opt.kernel);
  }
  return q;
}

// Every row's cache entry [c_kv (normed) | k_pe (rotated)] at its position, and RoPE on the
// queried rows' q_pe. x: [T, D].
void WriteLatentCache(const ModelConfig& c, const MlaWeights& w, const Rope& rope, int cache_layer,
                      std::span<const SequenceSlice> seqs, const float* x, int64_t T,
                      const QueryRows& rows, std::span<float> q, const LayerOptions& opt) {
  const int64_t rank = c.kv_lora_rank, rope_dim = c.qk_rope_head_dim;
  const int64_t H = c.num_attention_heads, qk_head_dim = c.qk_head_dim();
  std::vector<float> kv(T * (rank + rope_dim));
  w.kv_a_proj_with_mqa.Forward(x, T, kv.data(), opt.quantize_activations, opt.kernel);
  for (size_t k = 0; k < seqs.size(); ++k) {
    const SequenceSlice& s = seqs[k];
    for (int64_t i = 0; i < s.n; ++i) {
      const int64_t pos = s.start + i;
      const float* row = kv.data() + (s.row_begin + i) * (rank + rope_dim);
      float* slot = s.cache->Slot(cache_layer, pos);
      RmsNorm(row, w.kv_a_layernorm.data(), 1, rank, c.rms_norm_eps, slot);
      std::copy(row + rank, row + rank + rope_dim, slot + rank);
      rope.Apply(slot + rank, pos);
      if (i < rows.first_i[k]) continue;
      const int64_t qr = rows.q_first[k] + i - rows.first_i[k];
      for (int64_t h = 0; h < H; ++h) {
        rope.Apply(q.data() + (qr * H + h) * qk_head_dim + c.qk_nope_head_dim, pos);
      }
    }
  }
}

// The naive form: kv_b_proj expands every cached c_kv into per-head keys and values.
void NaiveAttention(const ModelConfig& c, const MlaWeights& w, int cache_layer,
                    std::span<const SequenceSlice> seqs, const QueryRows& rows, const float* q,
                    float scale, const LayerOptions& opt, float* attn) {
  const int64_t H = c.num_attention_heads, nope = c.qk_nope_head_dim;
  const int64_t rope_dim = c.qk_rope_head_dim, v_dim = c.v_head_dim, rank = c.kv_lora_rank;
  const int64_t qk_head_dim = c.qk_head_dim(), kvb_dim = H * (nope + v_dim);
  std::vector<float> scores;
  for (size_t k = 0; k < seqs.size(); ++k) {
    const SequenceSlice& s = seqs[k];
    MlaKvCache& cache = *s.cache;
    const int64_t L = s.start + s.n;  // cached length visible to the last new token
    scores.resize(L);
    // kv_b_proj(c_kv) for every cached token: [L, H * (nope + v_dim)].
    std::vector<float> c_kv(L * rank);
    for (int64_t j = 0; j < L; ++j) {
      const float* slot = cache.Slot(cache_layer, j);
      std::copy(slot, slot + rank, c_kv.data() + j * rank);
    }
    std::vector<float> kvb(L * kvb_dim);
    w.kv_b_proj.Forward(c_kv.data(), L, kvb.data(), opt.quantize_activations, opt.kernel);
    for (int64_t i = rows.first_i[k]; i < s.n; ++i) {
      const int64_t visible = s.start + i + 1, row_i = rows.q_first[k] + i - rows.first_i[k];
      for (int64_t h = 0; h < H; ++h) {
        const float* qh = q + (row_i * H + h) * qk_head_dim;
        for (int64_t j = 0; j < visible; ++j) {
          const float* k_nope = kvb.data() + j * kvb_dim + h * (nope + v_dim);
          const float* k_pe = cache.Slot(cache_layer, j) + rank;
          scores[j] = (DotSeq(qh, k_nope, nope) + DotSeq(qh + nope, k_pe, rope_dim)) * scale;
        }
        Softmax(scores.data(), visible);
        float* o = attn + (row_i * H + h) * v_dim;
        std::fill(o, o + v_dim, 0.0f);
        for (int64_t j = 0; j < visible; ++j) {
          const float* v = kvb.data() + j * kvb_dim + h * (nope + v_dim) + nope;
          for (int64_t d = 0; d < v_dim; ++d) o[d] += scores[j] * v[d];
        }
      }
    }
  }
}

// kv_b_proj as float [H * (nope + v_dim), kv_lora_rank] (both dequantizations are bitwise
// equal).
std::vector<float> DequantizeKvB(const ModelConfig& c, const MlaWeights& w, LinearKernel kernel) {
  const int64_t rank = c.kv_lora_rank;
  const int64_t kvb_rows = c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim);
  std::vector<float> wkv_b(kvb_rows * rank);
  for (int64_t r = 0; r < kvb_rows; ++r) {
    if (kernel == LinearKernel::kSimd) {
      w.kv_b_proj.DequantizeRowSimd(r, wkv_b.data() + r * rank);
    } else {
      w.kv_b_proj.DequantizeRow(r, wkv_b.data() + r * rank);
    }
  }
  return wkv_b;
}

}  // namespace

void AbsorbedAttentionReference(const AbsorbedAttentionArgs& a, float* attn) {
  const ModelConfig& c = a.config;
  const int64_t H = c.num_attention_heads, nope = c.qk_nope_head_dim;
  const int64_t rope_dim = c.qk_rope_head_dim, v_dim = c.v_head_dim, rank = c.kv_lora_rank;
  const int64_t qk_head_dim = c.qk_head_dim();
  std::vector<float> q_lat(rank), ctx(rank), scores;
  for (size_t k = 0; k < a.seqs.size(); ++k) {
    const SequenceSlice& s = a.seqs[k];
    const MlaKvCache& cache = *s.cache;
    scores.resize(s.start + s.n);
    for (int64_t i = a.first_i[k]; i < s.n; ++i) {
      const int64_t visible = s.start + i + 1, row_i = a.q_first[k] + i - a.first_i[k];
      for (int64_t h = 0; h < H; ++h) {
        const float* qh = a.q + (row_i * H + h) * qk_head_dim;
        const float* w_uk = a.wkv_b + h * (nope + v_dim) * rank;
        const float* w_uv = w_uk + nope * rank;
        std::fill(q_lat.begin(), q_lat.end(), 0.0f);
        for (int64_t d = 0; d < nope; ++d) {
          for (int64_t r = 0; r < rank; ++r) q_lat[r] += qh[d] * w_uk[d * rank + r];
        }
        for (int64_t j = 0; j < visible; ++j) {
          const float* slot = cache.Slot(a.cache_layer, j);
          scores[j] =
              (DotSeq(q_lat.data(), slot, rank) + DotSeq(qh + nope, slot + rank, rope_dim)) *
              a.scale;
        }
        Softmax(scores.data(), visible);
        std::fill(ctx.begin(), ctx.end(), 0.0f);
        for (int64_t j = 0; j < visible; ++j) {
          const float* slot = cache.Slot(a.cache_layer, j);
          for (int64_t r = 0; r < rank; ++r) ctx[r] += scores[j] * slot[r];
        }
        float* o = attn + (row_i * H + h) * v_dim;
        for (int64_t d = 0; d < v_dim; ++d) o[d] = DotSeq(w_uv + d * rank, ctx.data(), rank);
      }
    }
  }
}

void MlaForwardBatch(const ModelConfig& c, const MlaWeights& w, const Rope& rope, int cache_layer,
                     std::span<const SequenceSlice> seqs, const float* x, int64_t T, float* out,
                     const LayerOptions& opt, bool last_rows_only) {
  const int64_t D = c.hidden_size;
  const QueryRows rows = PlanQueryRows(seqs, last_rows_only);
  const int64_t Tq = rows.Tq;
  std::vector<float> xq_rows;  // with last_rows_only: the queried rows of x
  if (last_rows_only) {
    xq_rows.resize(Tq * D);
    for (size_t k = 0; k < seqs.size(); ++k) {
      std::copy_n(x + (seqs[k].row_begin + seqs[k].n - 1) * D, D,
                  xq_rows.data() + rows.q_first[k] * D);
    }
  }
  // 1. Projections over all rows at once (each weight row is read once per step).
  std::vector<float> q = ProjectQueries(c, w, last_rows_only ? xq_rows.data() : x, Tq, opt);
  // 2. The new rows' latent cache entries; RoPE on the queries.
  WriteLatentCache(c, w, rope, cache_layer, seqs, x, T, rows, q, opt);
  // 3. Attention: [Tq, H * v_head_dim].
  std::vector<float> attn(Tq * c.num_attention_heads * c.v_head_dim);
  if (opt.attention == AttentionForm::kNaive) {
    NaiveAttention(c, w, cache_layer, seqs, rows, q.data(), rope.softmax_scale(), opt, attn.data());
  } else {
    // Absorbed: per head, W_uk: rows [h*(nope+v), +nope) and W_uv: the next v_dim rows of
    // kv_b_proj. score_j = (W_uk^T q_nope) . c_j + q_pe . k_pe_j; o = W_uv (sum_j p_j c_j).
    // The matrices precomputed at load when the weights have them (the same floats as
    // dequantizing here), else kv_b_proj dequantized for this forward.
    const int64_t kvb_numel =
        c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank;
    std::vector<float> dequantized;
    const float* wkv_b = nullptr;
    if (w.kv_b_absorbed != nullptr && std::ssize(*w.kv_b_absorbed) == kvb_numel) {
      wkv_b = w.kv_b_absorbed->data();
    } else {
      dequantized = DequantizeKvB(c, w, opt.kernel);
      wkv_b = dequantized.data();
    }
    const AbsorbedAttentionArgs args{c,           wkv_b, q.data(),     rope.softmax_scale(),
                                     cache_layer, seqs,  rows.q_first, rows.first_i};
    // The one signature, two implementations: the loops above, or the SIMD kernel.
    (opt.kernel == LinearKernel::kSimd ? AbsorbedAttentionSimd : AbsorbedAttentionReference)(
        args, attn.data());
  }
  // 4. The output projection (with last_rows_only: scattered back to the slices' last rows).
  if (!last_rows_only) {
    w.o_proj.Forward(attn.data(), T, out, opt.quantize_activations, opt.kernel);
    return;
  }
  std::vector<float> out_q(Tq * D);
  w.o_proj.Forward(attn.data(), Tq, out_q.data(), opt.quantize_activations, opt.kernel);
  std::fill(out, out + T * D, 0.0f);
  for (size_t k = 0; k < seqs.size(); ++k) {
    std::copy_n(out_q.data() + rows.q_first[k] * D, D,
                out + (seqs[k].row_begin + seqs[k].n - 1) * D);
  }
}

void MlpForward(const MlpWeights& w, const float* x, int64_t T, float* out, bool quantize,
                LinearKernel kernel) {
  const int64_t inter = w.gate_proj.out_features;
  std::vector<float> gate(T * inter), up(T * inter);
  w.gate_proj.Forward(x, T, gate.data(), quantize, kernel);
  w.up_proj.Forward(x, T, up.data(), quantize, kernel);
  for (int64_t i = 0; i < T * inter; ++i) gate[i] = Silu(gate[i]) * up[i];
  w.down_proj.Forward(gate.data(), T, out, quantize, kernel);
}

absl::Status MoeForward(const ModelConfig& c, const GateParams& gate_params,
                        const DecoderLayerWeights& w, RoutedExperts& experts, const float* x,
                        int64_t T, float* out, const LayerOptions& opt) {
  const int64_t D = c.hidden_size;
  std::span<const float> xs(x, T * D);
  ExpertRoutes routes = RunGate(gate_params, w.gate, xs, T, D);
  std::span<float> routed(out, T * D);
  if (opt.quantize_activations) {
    // Quantized once per 128 channels per token, as the dispatcher sends them.
    QuantizedActivations q = QuantizeActivations(xs, T, D);
    EM_RETURN_IF_ERROR(experts.Run(w.layer, q, routes, routed));
  } else {
    EM_RETURN_IF_ERROR(experts.RunUnquantized(w.layer, xs, routes, routed));
  }
  if (w.shared_experts) {
    std::vector<float> shared(T * D);
    MlpForward(*w.shared_experts, x, T, shared.data(), opt.quantize_activations, opt.kernel);
    for (int64_t i = 0; i < T * D; ++i) out[i] += shared[i];
  }
  return absl::OkStatus();
}

absl::Status DecoderLayerForward(const ModelConfig& c, const GateParams& gate_params,
                                 const DecoderLayerWeights& w, const Rope& rope, int cache_layer,
                                 std::span<const SequenceSlice> seqs, RoutedExperts* experts,
                                 float* h, int64_t T, const LayerOptions& opt,
                                 bool last_rows_only) {
  const int64_t D = c.hidden_size;
  std::vector<float> xn(T * D), delta(T * D);
  RmsNorm(h, w.input_layernorm.data(), T, D, c.rms_norm_eps, xn.data());
  MlaForwardBatch(c, w.self_attn, rope, cache_layer, seqs, xn.data(), T, delta.data(), opt,
                  last_rows_only);
  // The feed-forward part over the rows that are wanted: [To, D] gathered from h.
  std::vector<int64_t> rows;
  for (const SequenceSlice& s : seqs) {
    for (int64_t i = last_rows_only ? s.n - 1 : 0; i < s.n; ++i) rows.push_back(s.row_begin + i);
  }
  const int64_t To = std::ssize(rows);
  std::vector<float> ho(To * D);
  for (int64_t r = 0; r < To; ++r) {
    for (int64_t d = 0; d < D; ++d) ho[r * D + d] = h[rows[r] * D + d] + delta[rows[r] * D + d];
  }
  RmsNorm(ho.data(), w.post_attention_layernorm.data(), To, D, c.rms_norm_eps, xn.data());
  if (w.is_moe) {
    if (experts == nullptr) {
      return absl::FailedPreconditionError("MoE layer without a RoutedExperts implementation");
    }
    EM_RETURN_IF_ERROR(MoeForward(c, gate_params, w, *experts, xn.data(), To, delta.data(), opt));
  } else {
    MlpForward(*w.mlp, xn.data(), To, delta.data(), opt.quantize_activations, opt.kernel);
  }
  for (int64_t r = 0; r < To; ++r) {
    for (int64_t d = 0; d < D; ++d) h[rows[r] * D + d] = ho[r * D + d] + delta[r * D + d];
  }
  return absl::OkStatus();
}

}  // namespace expertmesh
