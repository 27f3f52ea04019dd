#include "core/model/gate.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_format.h"

namespace expertmesh {

absl::StatusOr<GateParams> GateParams::FromConfig(const ModelConfig& config) {
  GateParams p;
  p.n_routed_experts = config.n_routed_experts;
  p.n_group = config.n_group;
  p.topk_group = config.topk_group;
  p.num_experts_per_tok = config.num_experts_per_tok;
  p.norm_topk_prob = config.norm_topk_prob;
  p.routed_scaling_factor = config.routed_scaling_factor;
  if (p.n_routed_experts <= 0 || p.n_group <= 0 || p.n_routed_experts % p.n_group != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("gate: n_routed_experts (%d) must be a positive multiple of n_group (%d)",
                        p.n_routed_experts, p.n_group));
  }
  if (p.topk_group <= 0 || p.topk_group > p.n_group) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "gate: topk_group (%d) must lie in [1, n_group=%d]", p.topk_group, p.n_group));
  }
  const int64_t selectable = p.topk_group * (p.n_routed_experts / p.n_group);
  if (p.num_experts_per_tok <= 0 || p.num_experts_per_tok > selectable) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "gate: num_experts_per_tok (%d) must lie in [1, %d] (experts in topk_group groups)",
        p.num_experts_per_tok, selectable));
  }
  if (config.scoring_func != "sigmoid" || config.topk_method != "noaux_tc") {
    return absl::InvalidArgumentError(
        absl::StrFormat("gate: only scoring_func sigmoid with topk_method noaux_tc is supported, "
                        "got %s / %s",
                        config.scoring_func, config.topk_method));
  }
  return p;
}

namespace {

// Indices of the k largest values, larger first, equal values by lower index first.
std::vector<int32_t> TopK(std::span<const float> v, int64_t k) {
  std::vector<int32_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  idx.resize(k);
  return idx;
}

}  // namespace

ExpertRoutes SelectExperts(const GateParams& p, std::span<const float> scores,
                           std::span<const float> e_score_correction_bias, int64_t n_tokens) {
  const int64_t n_experts = p.n_routed_experts;
  const int64_t group_size = n_experts / p.n_group;
  assert(static_cast<int64_t>(scores.size()) == n_tokens * n_experts);
  ExpertRoutes routes;
  std::vector<float> biased(n_experts), group_scores(p.n_group), weights;
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* s = scores.data() + t * n_experts;
    for (int64_t e = 0; e < n_experts; ++e) biased[e] = s[e] + e_score_correction_bias[e];
    // Group score: the sum of the two largest biased scores in the group.
    for (int64_t g = 0; g < p.n_group; ++g) {
      std::span<const float> group(biased.data() + g * group_size, group_size);
      std::vector<int32_t> top2 = TopK(group, std::min<int64_t>(2, group_size));
      float sum = 0.0f;
      for (int32_t i : top2) sum += group[i];
      group_scores[g] = sum;
    }
    std::vector<int32_t> kept_groups = TopK(group_scores, p.topk_group);
    std::vector<float> masked(n_experts, -std::numeric_limits<float>::infinity());
    for (int32_t g : kept_groups) {
      for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) masked[e] = biased[e];
    }
    std::vector<int32_t> chosen = TopK(masked, p.num_experts_per_tok);
    std::sort(chosen.begin(), chosen.end());
    weights.assign(chosen.size(), 0.0f);
    float sum = 0.0f;
    for (size_t i = 0; i < chosen.size(); ++i) {
      weights[i] = s[chosen[i]];
      sum += weights[i];
    }
    for (float& w : weights) {
      if (p.norm_topk_prob) w /= sum + 1e-20f;
      w *= static_cast<float>(p.routed_scaling_factor);
    }
    routes.AddRow(chosen, weights);
  }
  return routes;
}

ExpertRoutes RunGate(const GateParams& p, const GateWeights& gate, std::span<const float> x,
                     int64_t n_tokens, int64_t hidden_size) {
  std::vector<float> scores(n_tokens * p.n_routed_experts);
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* xt = x.data() + t * hidden_size;
    for (int64_t e = 0; e < p.n_routed_experts; ++e) {
      const float* w = gate.weight.data() + e * hidden_size;
      float logit = 0.0f;
      for (int64_t i = 0; i < hidden_size; ++i) logit += xt[i] * w[i];
      scores[t * p.n_routed_experts + e] = 1.0f / (1.0f + std::exp(-logit));
    }
  }
  return SelectExperts(p, scores, gate.e_score_correction_bias, n_tokens);
}

}  // namespace expertmesh
