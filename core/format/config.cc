// config.json parsing, validation and writing for model_type deepseek_v3.
//
// NOTES:
// - Both spellings of the files in the wild are read: DeepSeek's own (rope_scaling with
//   "type", torch_dtype) and what transformers 5 writes (rope_parameters with "rope_type" and
//   rope_theta inside, dtype, num_mtp_layers). JSON null counts as absent, as transformers
//   writes None as null.
// - The fields that decide the model's shape or routing are required: transformers would
//   silently fill DeepSeek-V3's 671B values in for a missing one, which is never what a
//   smaller checkpoint means. q_lora_rank is required but may be null (no q compression).
// - ModelConfigToJson writes DeepSeek's spelling, which transformers also reads.
#include "core/format/config.h"

#include <charconv>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "boost/json.hpp"
#include "core/base/file.h"
#include "core/base/json.h"
#include "core/base/status.h"

namespace expertmesh {
namespace {

namespace json = boost::json;

std::string_view View(const json::string& s) { return {s.data(), s.size()}; }
// Abseil here keeps its own string_view type; StrCat needs it.
absl::string_view A(std::string_view s) { return {s.data(), s.size()}; }

// Reads typed fields of one JSON object; the first error sticks and names the field by its
// dotted path ("rope_scaling.factor").
class FieldReader {
 public:
  FieldReader(const json::object& obj, std::string prefix)
      : obj_(obj), prefix_(std::move(prefix)) {}

  const absl::Status& status() const { return status_; }
  std::string Path(std::string_view key) const { return absl::StrCat(prefix_, A(key)); }

  // The value of `key`, or nullptr when absent or null (an error when required).
  const json::value* Get(std::string_view key, bool required) {
    const json::value* v = json_field::Find(obj_, key);
    if (v == nullptr && required) Fail(absl::StrCat("missing required field '", Path(key), "'"));
    return v;
  }

  void Int(std::string_view key, int64_t& out, bool required) {
    Read(key, out, required, json_field::AsInt64, "an integer");
  }
  void Double(std::string_view key, double& out, bool required) {
    Read(key, out, required, json_field::AsNumber, "a number");
  }
  void Bool(std::string_view key, bool& out, bool required) {
    Read(key, out, required, json_field::AsBool, "true or false");
  }
  void String(std::string_view key, std::string& out, bool required) {
    Read(key, out, required, json_field::AsString, "a string");
  }
  const json::object* Object(std::string_view key) {
    const json::value* v = Get(key, false);
    if (v == nullptr) return nullptr;
    if (!v->is_object()) TypeError(key, "an object");
    return v->if_object();
  }

  void Fail(std::string message) {
    if (status_.ok()) status_ = absl::InvalidArgumentError(std::move(message));
  }
  void TypeError(std::string_view key, std::string_view expected) {
    Fail(absl::StrCat("field '", Path(key), "' must be ", A(expected)));
  }

 private:
  template <typename T, typename Convert>
  void Read(std::string_view key, T& out, bool required, Convert convert,
            std::string_view expected) {
    const json::value* v = Get(key, required);
    if (v == nullptr) return;
    if (auto value = convert(*v)) {
      out = *std::move(value);
    } else {
      TypeError(key, expected);
    }
  }

  const json::object& obj_;
  std::string prefix_;
  absl::Status status_;
};

void ReadRopeScaling(FieldReader& top, ModelConfig& c) {
  // DeepSeek: "rope_scaling": {"type": "yarn", ...}; transformers 5: "rope_parameters":
  // {"rope_type": "yarn", "rope_theta": ..., ...}.
  std::string name = "rope_scaling";
  const json::object* rope = top.Object(name);
  if (rope == nullptr) {
    name = "rope_parameters";
    rope = top.Object(name);
  }
  if (rope == nullptr) return;
  FieldReader r(*rope, name + ".");
  std::string type;
  std::string type_key =
      rope->contains("type") && !rope->at("type").is_null() ? "type" : "rope_type";
  r.String(type_key, type, true);
  if (name == "rope_parameters") r.Double("rope_theta", c.rope_theta, false);
  if (r.status().ok() && type == "default") type.clear();  // transformers 5: no scaling
  if (r.status().ok() && !type.empty()) {
    c.rope_scaling.type = type;
    if (type != "yarn") {
      r.Fail(absl::StrCat("field '", r.Path(type_key), "' is '", type,
                          "'; ExpertMesh serves only 'yarn' (or no rope scaling)"));
    }
    RopeScaling& y = c.rope_scaling;
    r.Double("factor", y.factor, true);
    r.Double("beta_fast", y.beta_fast, false);
    r.Double("beta_slow", y.beta_slow, false);
    r.Double("mscale", y.mscale, false);
    r.Double("mscale_all_dim", y.mscale_all_dim, false);
    r.Int("original_max_position_embeddings", y.original_max_position_embeddings, true);
  }
  if (!r.status().ok()) top.Fail(std::string(r.status().message()));
}

void ReadQuantization(FieldReader& top, ModelConfig& c) {
  const json::object* quant = top.Object("quantization_config");
  if (quant == nullptr) return;
  FieldReader r(*quant, "quantization_config.");
  QuantizationConfig& q = c.quantization_config;
  q.present = true;
  r.String("quant_method", q.quant_method, true);
  r.String("fmt", q.fmt, false);
  if (q.fmt.empty()) q.fmt = "e4m3";
  r.String("activation_scheme", q.activation_scheme, false);
  if (q.activation_scheme.empty()) q.activation_scheme = "dynamic";
  std::string scale_fmt;
  r.String("scale_fmt", scale_fmt, false);
  if (const json::value* bs = r.Get("weight_block_size", true); bs != nullptr) {
    const json::array* arr = bs->if_array();
    auto in_range = [](const json::value& v) {
      return v.is_int64() && v.get_int64() > 0 && v.get_int64() <= (int64_t{1} << 16);
    };
    if (arr == nullptr || arr->size() != 2 || !(*arr)[0].is_int64() || !(*arr)[1].is_int64()) {
      r.TypeError("weight_block_size", "an array of two integers");
    } else if (!in_range((*arr)[0]) || !in_range((*arr)[1])) {
      r.Fail("field 'quantization_config.weight_block_size' must hold two sizes in [1, 65536]");
    } else {
      q.weight_block_size = {static_cast<int>((*arr)[0].get_int64()),
                             static_cast<int>((*arr)[1].get_int64())};
    }
  }
  if (r.status().ok()) {
    if (q.quant_method != "fp8") {
      r.Fail(absl::StrCat("field 'quantization_config.quant_method' is '", q.quant_method,
                          "'; ExpertMesh serves only 'fp8'"));
    } else if (q.fmt != "e4m3") {
      r.Fail(absl::StrCat("field 'quantization_config.fmt' is '", q.fmt,
                          "'; ExpertMesh serves only 'e4m3'"));
    } else if (q.activation_scheme != "dynamic") {
      r.Fail(absl::StrCat("field 'quantization_config.activation_scheme' is '", q.activation_scheme,
                          "'; ExpertMesh serves only 'dynamic'"));
    } else if (!scale_fmt.empty() && scale_fmt != "float") {
      r.Fail(absl::StrCat("field 'quantization_config.scale_fmt' is '", scale_fmt,
                          "'; ExpertMesh serves only float32 scales"));
    }
  }
  if (!r.status().ok()) top.Fail(std::string(r.status().message()));
}

void ReadTokenId(FieldReader& r, std::string_view key, std::optional<int64_t>& out) {
  const json::value* v = r.Get(key, false);
  if (v == nullptr) return;
  if (v->is_int64()) {
    out = v->get_int64();
  } else if (v->is_array() && !v->get_array().empty() && v->get_array()[0].is_int64()) {
    out = v->get_array()[0].get_int64();  // a list of ids: the first is the model's own
  } else {
    r.TypeError(key, "an integer or a list of integers");
  }
}

// JSON text with two-space indentation, one member per line (as config.json files are written).
void WritePretty(const json::value& v, int indent, std::string& out) {
  const std::string pad(indent + 2, ' ');
  if (const json::object* o = v.if_object(); o != nullptr && !o->empty()) {
    out += "{\n";
    size_t i = 0;
    for (const auto& [key, value] : *o) {
      out += pad + json::serialize(json::string(key)) + ": ";
      WritePretty(value, indent + 2, out);
      out += ++i < o->size() ? ",\n" : "\n";
    }
    out += std::string(indent, ' ') + "}";
  } else if (const json::array* a = v.if_array(); a != nullptr && !a->empty()) {
    out += "[\n";
    for (size_t i = 0; i < a->size(); ++i) {
      out += pad;
      WritePretty((*a)[i], indent + 2, out);
      out += i + 1 < a->size() ? ",\n" : "\n";
    }
    out += std::string(indent, ' ') + "]";
  } else if (v.is_double()) {
    // Shortest text that reads back to the same double ("2.5", "1e-06", "40"), as Python
    // writes; Boost.JSON's own form ("2.5E0") is valid but unlike any real config.json.
    char buf[32];
    const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v.get_double());
    out.append(buf, ec == std::errc() ? end : buf);
  } else {
    out += json::serialize(v);
  }
}

// Checks the values the engine can serve; the message names the field.
absl::Status Validate(const ModelConfig& c) {
  auto bad = [](std::string_view field, auto value, std::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", A(field), "' = ", value, ": ", A(why)));
  };
  if (c.model_type != "deepseek_v3") {
    return bad("model_type", c.model_type, "ExpertMesh serves only 'deepseek_v3'");
  }
  const std::pair<const char*, int64_t> positive[] = {
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"moe_intermediate_size", c.moe_intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"n_routed_experts", c.n_routed_experts},
      {"kv_lora_rank", c.kv_lora_rank},
      {"qk_rope_head_dim", c.qk_rope_head_dim},
      {"qk_nope_head_dim", c.qk_nope_head_dim},
      {"v_head_dim", c.v_head_dim},
      {"n_group", c.n_group},
      {"topk_group", c.topk_group},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"moe_layer_freq", c.moe_layer_freq},
      {"max_position_embeddings", c.max_position_embeddings},
  };
  for (const auto& [field, value] : positive) {
    if (value <= 0) return bad(field, value, "must be positive");
  }
  const std::pair<const char*, int64_t> non_negative[] = {
      {"n_shared_experts", c.n_shared_experts},
      {"q_lora_rank", c.q_lora_rank},
      {"first_k_dense_replace", c.first_k_dense_replace},
      {"num_nextn_predict_layers", c.num_nextn_predict_layers},
  };
  for (const auto& [field, value] : non_negative) {
    if (value < 0) return bad(field, value, "must not be negative");
  }
  if (c.qk_rope_head_dim % 2 != 0) {
    return bad("qk_rope_head_dim", c.qk_rope_head_dim, "RoPE rotates pairs, so it must be even");
  }
  if (c.first_k_dense_replace > c.num_hidden_layers) {
    return bad("first_k_dense_replace", c.first_k_dense_replace, "exceeds num_hidden_layers");
  }
  if (c.scoring_func != "sigmoid") {
    return bad("scoring_func", c.scoring_func, "ExpertMesh serves only 'sigmoid'");
  }
  if (c.topk_method != "noaux_tc") {
    return bad("topk_method", c.topk_method, "ExpertMesh serves only 'noaux_tc'");
  }
  if (c.hidden_act != "silu")
    return bad("hidden_act", c.hidden_act, "ExpertMesh serves only 'silu'");
  if (c.attention_bias) return bad("attention_bias", "true", "MLA projections have no bias here");
  if (c.n_routed_experts % c.n_group != 0) {
    return bad("n_group", c.n_group,
               absl::StrCat("does not divide n_routed_experts (", c.n_routed_experts, ")"));
  }
  if (c.topk_group > c.n_group) {
    return bad("topk_group", c.topk_group, absl::StrCat("exceeds n_group (", c.n_group, ")"));
  }
  const int64_t selectable = (c.n_routed_experts / c.n_group) * c.topk_group;
  if (c.num_experts_per_tok > selectable) {
    return bad("num_experts_per_tok", c.num_experts_per_tok,
               absl::StrCat("exceeds the ", selectable,
                            " experts of topk_group groups ((n_routed_experts / n_group) * "
                            "topk_group)"));
  }
  if (c.n_group > 1 && c.n_routed_experts / c.n_group < 2) {
    return bad("n_group", c.n_group, "group scores sum the top two experts of each group");
  }
  if (!(c.routed_scaling_factor > 0)) {
    return bad("routed_scaling_factor", c.routed_scaling_factor, "must be positive");
  }
  if (!(c.rms_norm_eps > 0)) return bad("rms_norm_eps", c.rms_norm_eps, "must be positive");
  if (!(c.rope_theta > 0)) return bad("rope_theta", c.rope_theta, "must be positive");
  if (c.rope_scaling.type == "yarn") {
    const RopeScaling& y = c.rope_scaling;
    if (!(y.factor >= 1)) return bad("rope_scaling.factor", y.factor, "must be at least 1");
    if (!(y.beta_fast > y.beta_slow && y.beta_slow > 0)) {
      return bad("rope_scaling.beta_fast", y.beta_fast, "must exceed beta_slow > 0");
    }
    if (y.original_max_position_embeddings <= 0) {
      return bad("rope_scaling.original_max_position_embeddings",
                 y.original_max_position_embeddings, "must be positive");
    }
  }
  return absl::OkStatus();
}

}  // namespace

bool ModelConfig::IsMoeLayer(int64_t layer) const {
  return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
}

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text) {
  std::error_code ec;
  json::value root = json::parse(json::string_view(json_text.data(), json_text.size()), ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("not valid JSON: ", ec.message()));
  if (!root.is_object()) return absl::InvalidArgumentError("config is not a JSON object");
  FieldReader r(root.get_object(), "");
  ModelConfig c;
  r.String("model_type", c.model_type, true);
  if (r.status().ok() && c.model_type != "deepseek_v3") {
    return absl::InvalidArgumentError(absl::StrCat("field 'model_type' = ", c.model_type,
                                                   ": ExpertMesh serves only 'deepseek_v3'"));
  }
  if (const json::value* arch = r.Get("architectures", false); arch != nullptr) {
    if (!arch->is_array()) r.TypeError("architectures", "a list of strings");
    for (const json::value& a : arch->is_array() ? arch->get_array() : json::array()) {
      if (!a.is_string()) {
        r.TypeError("architectures", "a list of strings");
        break;
      }
      c.architectures.emplace_back(View(a.get_string()));
    }
  }
  r.Int("vocab_size", c.vocab_size, true);
  r.Int("hidden_size", c.hidden_size, true);
  r.Int("intermediate_size", c.intermediate_size, true);
  r.Int("moe_intermediate_size", c.moe_intermediate_size, true);
  r.Int("num_hidden_layers", c.num_hidden_layers, true);
  if (r.Get("num_nextn_predict_layers", false) != nullptr) {
    r.Int("num_nextn_predict_layers", c.num_nextn_predict_layers, false);
  } else {
    r.Int("num_mtp_layers", c.num_nextn_predict_layers, false);
  }
  r.Int("num_attention_heads", c.num_attention_heads, true);
  c.num_key_value_heads = c.num_attention_heads;
  r.Int("num_key_value_heads", c.num_key_value_heads, false);
  r.Int("n_shared_experts", c.n_shared_experts, true);
  r.Int("n_routed_experts", c.n_routed_experts, true);
  r.Double("routed_scaling_factor", c.routed_scaling_factor, true);
  r.Int("kv_lora_rank", c.kv_lora_rank, true);
  if (!root.get_object().contains("q_lora_rank")) {
    r.Fail("missing required field 'q_lora_rank' (null for no q compression)");
  }
  r.Int("q_lora_rank", c.q_lora_rank, false);
  r.Int("qk_rope_head_dim", c.qk_rope_head_dim, true);
  r.Int("v_head_dim", c.v_head_dim, true);
  r.Int("qk_nope_head_dim", c.qk_nope_head_dim, true);
  r.String("topk_method", c.topk_method, false);
  r.Int("n_group", c.n_group, true);
  r.Int("topk_group", c.topk_group, true);
  r.Int("num_experts_per_tok", c.num_experts_per_tok, true);
  r.Int("moe_layer_freq", c.moe_layer_freq, false);
  r.Int("first_k_dense_replace", c.first_k_dense_replace, true);
  r.Bool("norm_topk_prob", c.norm_topk_prob, true);
  r.String("scoring_func", c.scoring_func, false);
  r.String("hidden_act", c.hidden_act, false);
  r.Int("max_position_embeddings", c.max_position_embeddings, true);
  r.Double("initializer_range", c.initializer_range, false);
  r.Double("rms_norm_eps", c.rms_norm_eps, true);
  r.Bool("use_cache", c.use_cache, false);
  r.Double("rope_theta", c.rope_theta, false);
  ReadRopeScaling(r, c);
  bool rope_interleave = true;  // transformers 5 writes it; DeepSeek rotates adjacent pairs
  r.Bool("rope_interleave", rope_interleave, false);
  if (r.status().ok() && !rope_interleave) {
    r.Fail("field 'rope_interleave' = false: ExpertMesh applies DeepSeek's interleaved RoPE only");
  }
  r.Bool("attention_bias", c.attention_bias, false);
  r.Double("attention_dropout", c.attention_dropout, false);
  r.Bool("tie_word_embeddings", c.tie_word_embeddings, false);
  ReadTokenId(r, "bos_token_id", c.bos_token_id);
  ReadTokenId(r, "eos_token_id", c.eos_token_id);
  r.String("torch_dtype", c.torch_dtype, false);
  if (c.torch_dtype.empty()) r.String("dtype", c.torch_dtype, false);
  ReadQuantization(r, c);
  if (!r.status().ok()) return r.status();
  EM_RETURN_IF_ERROR(Validate(c));
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path) {
  EM_ASSIGN_OR_RETURN(const std::string text, base::ReadFile(path));
  absl::StatusOr<ModelConfig> config = ParseModelConfig(text);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

std::string ModelConfigToJson(const ModelConfig& c) {
  json::object o;
  json::array arch;
  for (const std::string& a : c.architectures) arch.emplace_back(a);
  o["architectures"] = std::move(arch);
  o["attention_bias"] = c.attention_bias;
  o["attention_dropout"] = c.attention_dropout;
  if (c.bos_token_id) o["bos_token_id"] = *c.bos_token_id;
  if (c.eos_token_id) o["eos_token_id"] = *c.eos_token_id;
  o["first_k_dense_replace"] = c.first_k_dense_replace;
  o["hidden_act"] = c.hidden_act;
  o["hidden_size"] = c.hidden_size;
  o["initializer_range"] = c.initializer_range;
  o["intermediate_size"] = c.intermediate_size;
  o["kv_lora_rank"] = c.kv_lora_rank;
  o["max_position_embeddings"] = c.max_position_embeddings;
  o["model_type"] = c.model_type;
  o["moe_intermediate_size"] = c.moe_intermediate_size;
  o["moe_layer_freq"] = c.moe_layer_freq;
  o["n_group"] = c.n_group;
  o["n_routed_experts"] = c.n_routed_experts;
  o["n_shared_experts"] = c.n_shared_experts;
  o["norm_topk_prob"] = c.norm_topk_prob;
  o["num_attention_heads"] = c.num_attention_heads;
  o["num_experts_per_tok"] = c.num_experts_per_tok;
  o["num_hidden_layers"] = c.num_hidden_layers;
  o["num_key_value_heads"] = c.num_key_value_heads;
  o["num_nextn_predict_layers"] = c.num_nextn_predict_layers;
  if (c.q_lora_rank > 0) {
    o["q_lora_rank"] = c.q_lora_rank;
  } else {
    o["q_lora_rank"] = nullptr;
  }
  o["qk_nope_head_dim"] = c.qk_nope_head_dim;
  o["qk_rope_head_dim"] = c.qk_rope_head_dim;
  if (c.quantization_config.present) {
    const QuantizationConfig& q = c.quantization_config;
    o["quantization_config"] = json::object{
        {"activation_scheme", q.activation_scheme},
        {"fmt", q.fmt},
        {"quant_method", q.quant_method},
        {"weight_block_size", json::array{q.weight_block_size[0], q.weight_block_size[1]}}};
  }
  o["rms_norm_eps"] = c.rms_norm_eps;
  if (c.rope_scaling.type.empty()) {
    o["rope_scaling"] = nullptr;
  } else {
    const RopeScaling& y = c.rope_scaling;
    o["rope_scaling"] =
        json::object{{"beta_fast", y.beta_fast},
                     {"beta_slow", y.beta_slow},
                     {"factor", y.factor},
                     {"mscale", y.mscale},
                     {"mscale_all_dim", y.mscale_all_dim},
                     {"original_max_position_embeddings", y.original_max_position_embeddings},
                     {"type", y.type}};
  }
  o["rope_theta"] = c.rope_theta;
  o["routed_scaling_factor"] = c.routed_scaling_factor;
  o["scoring_func"] = c.scoring_func;
  o["tie_word_embeddings"] = c.tie_word_embeddings;
  o["topk_group"] = c.topk_group;
  o["topk_method"] = c.topk_method;
  if (!c.torch_dtype.empty()) o["torch_dtype"] = c.torch_dtype;
  o["use_cache"] = c.use_cache;
  o["v_head_dim"] = c.v_head_dim;
  o["vocab_size"] = c.vocab_size;
  std::string text;
  WritePretty(o, 0, text);
  return text + "\n";
}

}  // namespace expertmesh
