// config.json parsing: the real DeepSeek-V3 and R1 configs, the spelling transformers 5 writes
// (tests/golden/config, from tools/golden/make_config_golden.py), the round trip through
// ModelConfigToJson, and one rejection per value the engine cannot serve, each naming its field.
#include "core/format/config.h"

#include <string>
#include <vector>

#include "boost/json.hpp"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/core/golden_json.h"

namespace expertmesh {
namespace {

using ::testing::HasSubstr;
namespace json = boost::json;

const std::string kSource = EXPERTMESH_SOURCE_DIR;
const std::string kV3 = kSource + "/tests/data/reference/deepseek-v3/config.json";
const std::string kR1 = kSource + "/tests/data/reference/deepseek-r1/config.json";

void ExpectDeepSeekV3Shape(const ModelConfig& c) {
  EXPECT_EQ(c.model_type, "deepseek_v3");
  EXPECT_EQ(c.architectures, std::vector<std::string>{"DeepseekV3ForCausalLM"});
  EXPECT_EQ(c.vocab_size, 129280);
  EXPECT_EQ(c.hidden_size, 7168);
  EXPECT_EQ(c.intermediate_size, 18432);
  EXPECT_EQ(c.moe_intermediate_size, 2048);
  EXPECT_EQ(c.num_hidden_layers, 61);
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
  EXPECT_EQ(c.num_attention_heads, 128);
  EXPECT_EQ(c.num_key_value_heads, 128);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.n_routed_experts, 256);
  EXPECT_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_EQ(c.kv_lora_rank, 512);
  EXPECT_EQ(c.q_lora_rank, 1536);
  EXPECT_EQ(c.qk_rope_head_dim, 64);
  EXPECT_EQ(c.qk_nope_head_dim, 128);
  EXPECT_EQ(c.qk_head_dim(), 192);
  EXPECT_EQ(c.v_head_dim, 128);
  EXPECT_EQ(c.topk_method, "noaux_tc");
  EXPECT_EQ(c.n_group, 8);
  EXPECT_EQ(c.topk_group, 4);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.moe_layer_freq, 1);
  EXPECT_EQ(c.first_k_dense_replace, 3);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.scoring_func, "sigmoid");
  EXPECT_EQ(c.hidden_act, "silu");
  EXPECT_EQ(c.max_position_embeddings, 163840);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, "yarn");
  EXPECT_EQ(c.rope_scaling.factor, 40.0);
  EXPECT_EQ(c.rope_scaling.beta_fast, 32.0);
  EXPECT_EQ(c.rope_scaling.beta_slow, 1.0);
  EXPECT_EQ(c.rope_scaling.mscale, 1.0);
  EXPECT_EQ(c.rope_scaling.mscale_all_dim, 1.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 4096);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 0);
  EXPECT_EQ(c.eos_token_id, 1);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  EXPECT_TRUE(c.quantization_config.present);
  EXPECT_EQ(c.quantization_config.quant_method, "fp8");
  EXPECT_EQ(c.quantization_config.fmt, "e4m3");
  EXPECT_EQ(c.quantization_config.activation_scheme, "dynamic");
  EXPECT_EQ(c.quantization_config.weight_block_size, (std::vector<int>{128, 128}));
  // Layers 0..2 dense, 3..60 MoE.
  EXPECT_FALSE(c.IsMoeLayer(0));
  EXPECT_FALSE(c.IsMoeLayer(2));
  EXPECT_TRUE(c.IsMoeLayer(3));
  EXPECT_TRUE(c.IsMoeLayer(60));
}

TEST(ModelConfig, ParsesRealDeepSeekV3Config) {
  auto c = LoadModelConfig(kV3);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectDeepSeekV3Shape(*c);
}

TEST(ModelConfig, ParsesRealDeepSeekR1Config) {
  auto c = LoadModelConfig(kR1);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectDeepSeekV3Shape(*c);
}

TEST(ModelConfig, ParsesV3AsTransformersWritesIt) {
  auto c = LoadModelConfig(kSource + "/tests/golden/config/deepseek_v3_transformers.json");
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectDeepSeekV3Shape(*c);
}

TEST(ModelConfig, ParsesSmallConfigBuiltByTransformers) {
  auto c = LoadModelConfig(kSource + "/tests/golden/config/tiny_transformers.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 64);
  EXPECT_EQ(c->q_lora_rank, 0) << "null q_lora_rank: no q compression";
  EXPECT_EQ(c->rope_scaling.type, "yarn");
  EXPECT_EQ(c->rope_scaling.factor, 4.0);
  EXPECT_EQ(c->rope_scaling.mscale, 0.707);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 512);
  EXPECT_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->n_group, 4);
  EXPECT_EQ(c->topk_method, "noaux_tc") << "absent: the deepseek_v3 architecture's own";
  EXPECT_EQ(c->scoring_func, "sigmoid");
  EXPECT_FALSE(c->quantization_config.present);
}

TEST(ModelConfig, RoundTripsThroughJson) {
  for (const std::string& path : {kV3, kSource + "/tests/golden/config/tiny_transformers.json"}) {
    auto c = LoadModelConfig(path);
    ASSERT_TRUE(c.ok()) << c.status();
    const std::string text = ModelConfigToJson(*c);
    auto again = ParseModelConfig(text);
    ASSERT_TRUE(again.ok()) << again.status() << "\n" << text;
    EXPECT_EQ(ModelConfigToJson(*again), text);
    EXPECT_EQ(again->q_lora_rank, c->q_lora_rank);
    EXPECT_EQ(again->rope_scaling.mscale_all_dim, c->rope_scaling.mscale_all_dim);
    EXPECT_EQ(again->rms_norm_eps, c->rms_norm_eps);
    EXPECT_EQ(again->quantization_config.present, c->quantization_config.present);
    EXPECT_EQ(again->eos_token_id, c->eos_token_id);
  }
}

TEST(ModelConfig, AcceptsOptionalSpellings) {
  json::value v = testing::ReadGoldenJson("tests/data/reference/deepseek-v3/config.json");
  json::object& o = v.as_object();
  o["rope_scaling"] = nullptr;
  o["eos_token_id"] = json::array{1, 2};
  o.erase("num_key_value_heads");
  o.erase("quantization_config");
  o.erase("torch_dtype");
  o["dtype"] = "bfloat16";
  auto c = ParseModelConfig(json::serialize(v));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->rope_scaling.type.empty());
  EXPECT_EQ(c->eos_token_id, 1);
  EXPECT_EQ(c->num_key_value_heads, 128);
  EXPECT_FALSE(c->quantization_config.present);
  EXPECT_EQ(c->torch_dtype, "bfloat16");
}

struct Rejection {
  const char* name;
  const char* json_path;  // "a" or "a.b"; the field to change
  json::value value;      // the new value; a missing value removes the field
  bool remove;
  const char* expected;  // what the message must name
};

void Apply(json::object& root, const Rejection& r) {
  std::string path = r.json_path;
  json::object* obj = &root;
  if (size_t dot = path.find('.'); dot != std::string::npos) {
    obj = &root[path.substr(0, dot)].as_object();
    path = path.substr(dot + 1);
  }
  if (r.remove) {
    obj->erase(path);
  } else {
    (*obj)[path] = r.value;
  }
}

TEST(ModelConfig, RejectsWhatTheEngineCannotServeNamingTheField) {
  const std::vector<Rejection> cases = {
      {"wrong model_type", "model_type", "llama", false, "'model_type'"},
      {"softmax scoring", "scoring_func", "softmax", false, "'scoring_func'"},
      {"greedy top-k", "topk_method", "greedy", false, "'topk_method'"},
      {"gelu", "hidden_act", "gelu", false, "'hidden_act'"},
      {"linear rope", "rope_scaling.type", "linear", false, "'rope_scaling.type'"},
      {"rope factor missing", "rope_scaling.factor", nullptr, true, "'rope_scaling.factor'"},
      {"rope factor string", "rope_scaling.factor", "40", false, "'rope_scaling.factor'"},
      {"rope factor < 1", "rope_scaling.factor", 0.5, false, "'rope_scaling.factor'"},
      {"beta_slow > beta_fast", "rope_scaling.beta_slow", 64, false, "beta"},
      {"rope_scaling not an object", "rope_scaling", "yarn", false, "'rope_scaling'"},
      {"quant method", "quantization_config.quant_method", "bitsandbytes", false,
       "'quantization_config.quant_method'"},
      {"fp8 e5m2", "quantization_config.fmt", "e5m2", false, "'quantization_config.fmt'"},
      {"static activations", "quantization_config.activation_scheme", "static", false,
       "'quantization_config.activation_scheme'"},
      {"ue8m0 scales", "quantization_config.scale_fmt", "ue8m0", false,
       "'quantization_config.scale_fmt'"},
      {"one block dim", "quantization_config.weight_block_size", json::array{128}, false,
       "'quantization_config.weight_block_size'"},
      {"zero block", "quantization_config.weight_block_size", json::array{0, 128}, false,
       "'quantization_config.weight_block_size'"},
      {"quantization_config string", "quantization_config", "fp8", false, "'quantization_config'"},
      {"experts not divisible by groups", "n_routed_experts", 250, false, "n_routed_experts"},
      {"topk_group > n_group", "topk_group", 9, false, "'topk_group'"},
      {"too many experts per token", "num_experts_per_tok", 129, false, "'num_experts_per_tok'"},
      {"missing hidden_size", "hidden_size", nullptr, true, "'hidden_size'"},
      {"missing q_lora_rank", "q_lora_rank", nullptr, true, "'q_lora_rank'"},
      {"missing n_group", "n_group", nullptr, true, "'n_group'"},
      {"missing num_experts_per_tok", "num_experts_per_tok", nullptr, true,
       "'num_experts_per_tok'"},
      {"missing model_type", "model_type", nullptr, true, "'model_type'"},
      {"hidden_size string", "hidden_size", "7168", false, "'hidden_size'"},
      {"hidden_size fractional", "hidden_size", 7168.5, false, "'hidden_size'"},
      {"vocab_size zero", "vocab_size", 0, false, "'vocab_size'"},
      {"negative shared experts", "n_shared_experts", -1, false, "'n_shared_experts'"},
      {"norm_topk_prob int", "norm_topk_prob", 1, false, "'norm_topk_prob'"},
      {"routed_scaling_factor string", "routed_scaling_factor", "2.5", false,
       "'routed_scaling_factor'"},
      {"routed_scaling_factor zero", "routed_scaling_factor", 0, false, "'routed_scaling_factor'"},
      {"odd rope dim", "qk_rope_head_dim", 63, false, "'qk_rope_head_dim'"},
      {"too many dense layers", "first_k_dense_replace", 62, false, "'first_k_dense_replace'"},
      {"attention bias", "attention_bias", true, false, "'attention_bias'"},
      {"rope not interleaved", "rope_interleave", false, false, "'rope_interleave'"},
      {"architectures string", "architectures", "DeepseekV3ForCausalLM", false, "'architectures'"},
      {"eos string", "eos_token_id", "</s>", false, "'eos_token_id'"},
      {"rms_norm_eps zero", "rms_norm_eps", 0, false, "'rms_norm_eps'"},
  };
  const json::value base = testing::ReadGoldenJson("tests/data/reference/deepseek-v3/config.json");
  ASSERT_TRUE(ParseModelConfig(json::serialize(base)).ok());
  for (const Rejection& r : cases) {
    json::value v = base;
    Apply(v.as_object(), r);
    auto c = ParseModelConfig(json::serialize(v));
    ASSERT_FALSE(c.ok()) << r.name;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << r.name;
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(r.expected))
        << r.name << ": " << c.status().message();
  }
}

TEST(ModelConfig, RejectsNonObjectsAndBadJson) {
  EXPECT_FALSE(ParseModelConfig("[1, 2]").ok());
  EXPECT_FALSE(ParseModelConfig("{\"model_type\": ").ok());
  EXPECT_FALSE(ParseModelConfig("").ok());
}

TEST(ModelConfig, LoadNamesTheFile) {
  auto missing = LoadModelConfig(kSource + "/tests/data/reference/no-such/config.json");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("no-such/config.json"));
  // A file that exists but is not a config: the error names the file.
  auto wrong = LoadModelConfig(kSource + "/tests/golden/quant.json");
  ASSERT_FALSE(wrong.ok());
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr("tests/golden/quant.json"));
}

TEST(ModelConfig, MoeLayerFrequency) {
  ModelConfig c;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 2;
  EXPECT_FALSE(c.IsMoeLayer(0));
  EXPECT_FALSE(c.IsMoeLayer(1));
  EXPECT_TRUE(c.IsMoeLayer(2));
  EXPECT_FALSE(c.IsMoeLayer(3));
  EXPECT_TRUE(c.IsMoeLayer(4));
}

}  // namespace
}  // namespace expertmesh
