// The MoE gate of DeepSeek-V3 (topk_method noaux_tc, scoring_func sigmoid), shared by the
// reference engine (core/engine/layers.cc) and the GPU engine (core/kernels/cuda/gating.h).
//   s = sigmoid(x . gate.weight^T)                      [n_tokens, n_routed_experts], float32
//   biased = s + e_score_correction_bias                 (selection only)
//   group score = sum of the 2 largest biased scores of each of the n_group groups;
//   the topk_group best groups are kept, the experts of the others get -inf;
//   the num_experts_per_tok largest biased scores are chosen;
//   weights = s at the chosen experts, / their sum when norm_topk_prob, x routed_scaling_factor.
// Ties (equal scores) go to the lowest index, for groups and experts alike. Each row's experts
// are listed in ascending id order (the order RoutedExperts sums them in).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/format/config.h"
#include "core/model/experts.h"

namespace expertmesh {

struct GateParams {
  int64_t n_routed_experts = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  int64_t num_experts_per_tok = 0;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  static absl::StatusOr<GateParams> FromConfig(const ModelConfig& config);
};

struct GateWeights {
  std::vector<float> weight;                   // [n_routed_experts, hidden_size]
  std::vector<float> e_score_correction_bias;  // [n_routed_experts]
};

// Routes from sigmoid scores s: [n_tokens, n_routed_experts].
ExpertRoutes SelectExperts(const GateParams& params, std::span<const float> scores,
                           std::span<const float> e_score_correction_bias, int64_t n_tokens);

// The whole gate: x: [n_tokens, hidden_size] (after post_attention_layernorm).
ExpertRoutes RunGate(const GateParams& params, const GateWeights& gate, std::span<const float> x,
                     int64_t n_tokens, int64_t hidden_size);

}  // namespace expertmesh
