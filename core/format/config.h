// config.json of model_type deepseek_v3 (DeepSeek-V3, R1 and models of the same shape).
// Every field DeepSeek-V3/R1 use is parsed; a value this engine cannot serve is rejected
// with a message naming the field. Both DeepSeek's spelling (rope_scaling.type, torch_dtype)
// and transformers 5's (rope_parameters.rope_type, dtype, num_mtp_layers) are read. The
// fields that fix the model's shape and routing are required (q_lora_rank may be null: no q
// compression); the rest default as below. JSON null counts as absent.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh {

struct RopeScaling {  // rope_scaling, type "yarn"
  std::string type;   // "yarn" (or empty when rope_scaling is null)
  double factor = 1.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  int64_t original_max_position_embeddings = 4096;
};

struct QuantizationConfig {  // quantization_config
  bool present = false;
  std::string quant_method;       // "fp8"
  std::string fmt;                // "e4m3"
  std::string activation_scheme;  // "dynamic"
  std::vector<int> weight_block_size{128, 128};
};

struct ModelConfig {
  std::string model_type;  // "deepseek_v3"
  std::vector<std::string> architectures;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense FFN
  int64_t moe_intermediate_size = 0;  // each routed / shared expert
  int64_t num_hidden_layers = 0;
  int64_t num_nextn_predict_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t n_shared_experts = 0;
  int64_t n_routed_experts = 0;
  double routed_scaling_factor = 1.0;
  int64_t kv_lora_rank = 0;
  int64_t q_lora_rank = 0;  // 0 = no q compression (q_proj)
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int64_t qk_nope_head_dim = 0;
  std::string topk_method = "noaux_tc";
  int64_t n_group = 1;
  int64_t topk_group = 1;
  int64_t num_experts_per_tok = 0;
  int64_t moe_layer_freq = 1;
  int64_t first_k_dense_replace = 0;
  bool norm_topk_prob = true;
  std::string scoring_func = "sigmoid";
  std::string hidden_act = "silu";
  int64_t max_position_embeddings = 0;
  double initializer_range = 0.02;
  double rms_norm_eps = 1e-6;
  bool use_cache = true;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool attention_bias = false;
  double attention_dropout = 0.0;
  bool tie_word_embeddings = false;
  std::optional<int64_t> bos_token_id;
  std::optional<int64_t> eos_token_id;
  std::string torch_dtype;
  QuantizationConfig quantization_config;

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Layer l is MoE when l >= first_k_dense_replace and l % moe_layer_freq == 0 (DeepSeek's rule).
  bool IsMoeLayer(int64_t layer) const;
};

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text);
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path);  // names the file on error
// The config.json text of a config (round-trips through ParseModelConfig).
std::string ModelConfigToJson(const ModelConfig& config);

}  // namespace expertmesh
