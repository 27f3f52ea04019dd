// The config of the memory tests of expert loading (tests/core/expert_memory_test.cc,
// tests/cluster/live_placement_test.cc): hidden 1024, 32 experts of width 512 per MoE layer,
// two MoE layers, so the experts' bytes dwarf everything else a process holds.
#pragma once

namespace expertmesh::testing {

inline constexpr char kExpertMemoryTestConfig[] = R"({
  "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
  "vocab_size": 1024, "hidden_size": 1024, "intermediate_size": 2048,
  "moe_intermediate_size": 512, "num_hidden_layers": 3, "num_nextn_predict_layers": 0,
  "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
  "n_routed_experts": 32, "routed_scaling_factor": 2.5, "kv_lora_rank": 128,
  "q_lora_rank": 256, "qk_rope_head_dim": 32, "v_head_dim": 64, "qk_nope_head_dim": 64,
  "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
  "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": true,
  "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 512,
  "rms_norm_eps": 1e-06, "rope_theta": 10000, "attention_bias": false,
  "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1,
  "torch_dtype": "bfloat16",
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                          "quant_method": "fp8", "weight_block_size": [128, 128]}
})";

}  // namespace expertmesh::testing
