// The small FP8 DeepSeek-V3 config.json the cluster, shard and gateway tests write random
// checkpoints of (tools/make-checkpoint): one config; each suite sets the shape fields it needs
// (the defaults are the cluster tests').
#pragma once

#include <cstdint>
#include <string>

#include "absl/strings/str_format.h"

namespace expertmesh::testing {

struct TinyConfigShape {
  int64_t vocab_size = 320;
  int64_t hidden_size = 256;
  int64_t moe_intermediate_size = 64;
  int64_t num_hidden_layers = 4;
  int64_t num_nextn_predict_layers = 1;
  int64_t num_attention_heads = 4;  // = num_key_value_heads
  int64_t kv_lora_rank = 96;
  int64_t q_lora_rank = 128;
  int64_t topk_group = 1;
  int64_t num_experts_per_tok = 2;
  int64_t max_position_embeddings = 256;
};

inline std::string TinyConfigJson(const TinyConfigShape& s) {
  return absl::StrFormat(R"({
  "architectures": ["DeepseekV3ForCausalLM"],
  "model_type": "deepseek_v3",
  "vocab_size": %d,
  "hidden_size": %d,
  "intermediate_size": 192,
  "moe_intermediate_size": %d,
  "num_hidden_layers": %d,
  "num_nextn_predict_layers": %d,
  "num_attention_heads": %d,
  "num_key_value_heads": %d,
  "n_shared_experts": 1,
  "n_routed_experts": 8,
  "routed_scaling_factor": 2.5,
  "kv_lora_rank": %d,
  "q_lora_rank": %d,
  "qk_rope_head_dim": 16,
  "v_head_dim": 32,
  "qk_nope_head_dim": 32,
  "topk_method": "noaux_tc",
  "n_group": 2,
  "topk_group": %d,
  "num_experts_per_tok": %d,
  "moe_layer_freq": 1,
  "first_k_dense_replace": 1,
  "norm_topk_prob": true,
  "scoring_func": "sigmoid",
  "hidden_act": "silu",
  "max_position_embeddings": %d,
  "initializer_range": 0.02,
  "rms_norm_eps": 1e-06,
  "use_cache": true,
  "rope_theta": 10000,
  "rope_scaling": null,
  "attention_bias": false,
  "attention_dropout": 0.0,
  "tie_word_embeddings": false,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "torch_dtype": "bfloat16",
  "quantization_config": {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128]
  }
}
)",
                         s.vocab_size, s.hidden_size, s.moe_intermediate_size, s.num_hidden_layers,
                         s.num_nextn_predict_layers, s.num_attention_heads, s.num_attention_heads,
                         s.kv_lora_rank, s.q_lora_rank, s.topk_group, s.num_experts_per_tok,
                         s.max_position_embeddings);
}

}  // namespace expertmesh::testing
