// Random checkpoints of any deepseek_v3 config, in the exact Hugging Face layout of
// DeepSeek-V3: config.json, >= 2 safetensors shards and model.safetensors.index.json; FP8 E4M3
// weights with a weight_scale_inv beside them for the *_proj weights of attention, dense MLPs,
// shared and routed experts; BF16 embeddings, norms, gate weight, lm_head and MTP eh_proj /
// shared_head; F32 e_score_correction_bias; the MTP layers model.layers.{num_hidden_layers..}.
// Scales are chosen so activations stay O(1) and logits are spread (greedy is not all ties).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "core/format/config.h"

namespace expertmesh {

// config_json is written verbatim as dir/config.json; config is its parsed form.
// gate_skew > 0 adds up to that much to the gate's correction bias of the first quarter of
// each MoE layer's experts (a skewed expert load for the rebalancing benchmark and tests).
absl::Status WriteRandomCheckpoint(const ModelConfig& config, const std::string& config_json,
                                   const std::string& dir, uint64_t seed, int min_shards = 2,
                                   double gate_skew = 0.0);

}  // namespace expertmesh
