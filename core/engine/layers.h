// The blocks of a DeepSeek-V3 decoder layer as plain functions over float rows, so the
// reference engine, the attention service and the tests all run the same code:
// RMSNorm, rotary embedding (adjacent pairs, YaRN), MLA attention in its naive and absorbed
// forms over an MlaKvCache, the SwiGLU MLP, the MoE block (gate, routed experts through a
// RoutedExperts, shared experts) and the whole decoder layer.
//
// Legend: T = tokens in the batch (all sequences, concatenated), n = new tokens of one
// sequence, L = cached length, H = num_attention_heads, D = hidden_size.
// Every function computes each row the same way whatever else is in the batch.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "core/engine/kv_cache.h"
#include "core/format/config.h"
#include "core/model/experts.h"
#include "core/model/gate.h"
#include "core/model/model.h"

namespace expertmesh {

enum class AttentionForm {
  kAbsorbed,  // kv_b_proj folded into the query and the output; attends over c_kv, k_pe
  kNaive,     // kv_b_proj expands every cached c_kv into per-head keys and values
};

struct LayerOptions {
  // FP8 weights see per-token, per-128-channel quantized inputs (as DeepSeek serves); off:
  // plain float inputs (what transformers does).
  bool quantize_activations = true;
  AttentionForm attention = AttentionForm::kAbsorbed;
  LinearKernel kernel = LinearKernel::kSimd;
};

// y: [n, dim] = x / rms(x) * weight, rms with eps; in place allowed (y == x).
void RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, double eps, float* y);

// Rotary embedding on qk_rope_head_dim channels, as adjacent pairs (2i, 2i+1), with YaRN
// frequency interpolation and cos/sin scaling when rope_scaling.type == "yarn".
class Rope {
 public:
  explicit Rope(const ModelConfig& config);
  // x: [qk_rope_head_dim], rotated in place for position pos.
  void Apply(float* x, int64_t pos) const;
  // qk_head_dim^-0.5, times mscale^2 (mscale from mscale_all_dim) under YaRN.
  float softmax_scale() const { return softmax_scale_; }
  float attention_factor() const { return attention_factor_; }
  const std::vector<float>& inv_freq() const { return inv_freq_; }

 private:
  std::vector<float> inv_freq_;  // [qk_rope_head_dim / 2]
  float attention_factor_ = 1.0f;
  float softmax_scale_ = 1.0f;
};

// One sequence's part of a batch: rows [row_begin, row_begin + n) of the batch are its new
// tokens, at positions [start, start + n); the cache already holds start + n slots.
struct SequenceSlice {
  MlaKvCache* cache = nullptr;
  int64_t start = 0;
  int64_t row_begin = 0;
  int64_t n = 0;
};

// MLA for one sequence. x: [n, D] (after input_layernorm); out: [n, D]. Writes c_kv and k_pe
// of the new tokens to cache layer `cache_layer` at positions [start, start + n).
void MlaForward(const ModelConfig& c, const MlaWeights& w, const Rope& rope, int cache_layer,
                MlaKvCache& cache, int64_t start, const float* x, int64_t n, float* out,
                const LayerOptions& opt);
// The same over a batch: x, out: [T, D]; slice s owns rows [row_begin, row_begin + n) and its
// cache. The projections run once over all rows; each row's result equals MlaForward's.
// last_rows_only: every row's cache entry is written, but only the last row of each slice is
// attended and projected (out is zero elsewhere): what a forward that only needs its last
// position's output (the MTP module drafting) has to compute.
void MlaForwardBatch(const ModelConfig& c, const MlaWeights& w, const Rope& rope, int cache_layer,
                     std::span<const SequenceSlice> seqs, const float* x, int64_t T, float* out,
                     const LayerOptions& opt, bool last_rows_only = false);

// out: [T, D] = down_proj(silu(gate_proj(x)) * up_proj(x)), x: [T, D].
void MlpForward(const MlpWeights& w, const float* x, int64_t T, float* out, bool quantize,
                LinearKernel kernel = LinearKernel::kSimd);

// MoE: out: [T, D] = routed experts (via `experts`) + shared experts; x: [T, D].
absl::Status MoeForward(const ModelConfig& c, const GateParams& gate_params,
                        const DecoderLayerWeights& w, RoutedExperts& experts, const float* x,
                        int64_t T, float* out, const LayerOptions& opt);

// One decoder layer over the batch, in place on h: [T, D] (the residual stream). With
// last_rows_only, only the last row of each slice is carried through (the others only leave
// their KV cache entries; their rows of h are then meaningless).
// cache_layer indexes the caches of `seqs`; the routed experts are asked for layer w.layer.
absl::Status DecoderLayerForward(const ModelConfig& c, const GateParams& gate_params,
                                 const DecoderLayerWeights& w, const Rope& rope, int cache_layer,
                                 std::span<const SequenceSlice> seqs, RoutedExperts* experts,
                                 float* h, int64_t T, const LayerOptions& opt,
                                 bool last_rows_only = false);

}  // namespace expertmesh
