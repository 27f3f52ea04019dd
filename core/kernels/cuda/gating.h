// Parameters of the MoE gate's top-k on the GPU: DeepSeek-V3 noaux_tc selection from sigmoid
// scores, exactly as core/model/gate.h SelectExperts (same tie rule, same weight arithmetic), so
// ids are compared bitwise with the CPU and weights to the last bit. Dimension legend: T = tokens,
// E = n_routed_experts, k = num_experts_per_tok.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace expertmesh::cuda {

inline constexpr int kGateMaxExperts = 1024;

struct GateTopkParams {
  int32_t n_tokens = 0;          // T
  int32_t n_routed_experts = 0;  // E <= kGateMaxExperts, divisible by n_group
  int32_t n_group = 1;
  int32_t topk_group = 1;
  int32_t num_experts_per_tok = 0;  // k
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
  const float* scores = nullptr;           // [T, E] sigmoid(x . gate^T)
  const float* correction_bias = nullptr;  // [E] e_score_correction_bias
  int32_t* topk_ids = nullptr;             // [T, k], ascending expert id per row
  float* topk_weights = nullptr;           // [T, k]
};

cudaError_t LaunchGateTopk(const GateTopkParams& p, cudaStream_t stream);

}  // namespace expertmesh::cuda
