#include "tools/make-checkpoint/random_checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/decode/sampling.h"
#include "core/format/safetensors.h"
#include "core/numerics/numerics.h"
#include "core/numerics/quant.h"

namespace expertmesh {

namespace {

class Writer {
 public:
  Writer(const ModelConfig& c, uint64_t seed, double gate_skew)
      : c_(c), rng_(seed), gate_skew_(gate_skew) {
    const auto& b = c.quantization_config.weight_block_size;
    if (b.size() == 2) block_ = BlockShape{b[0], b[1]};
  }

  double Normal() {  // Box-Muller on the fixed Rng
    const double u1 = 1.0 - rng_.Uniform();
    const double u2 = rng_.Uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }

  std::vector<float> Gaussian(int64_t n, double mean, double std) {
    std::vector<float> v(n);
    for (float& x : v) x = static_cast<float>(mean + std * Normal());
    return v;
  }

  void Bf16(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
    std::vector<uint16_t> bits(v.size());
    FloatToBf16(v, bits);
    Add(name, DType::kBF16, std::move(shape), bits.data(), bits.size() * 2);
  }

  void F32(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
    Add(name, DType::kF32, std::move(shape), v.data(), v.size() * 4);
  }

  void Norm(const std::string& name, int64_t dim) { Bf16(name, {dim}, Gaussian(dim, 1.0, 0.1)); }

  // FP8 projection [out, in]: N(0, 1/in) scaled per 128x128 block by a random gain in
  // [0.5, 2], so every block has its own weight_scale_inv.
  void Fp8(const std::string& name, int64_t out, int64_t in) {
    std::vector<float> w = Gaussian(out * in, 0.0, 1.0 / std::sqrt(static_cast<double>(in)));
    const int64_t nbr = NumBlocks(out, block_.rows), nbc = NumBlocks(in, block_.cols);
    std::vector<float> gain(nbr * nbc);
    for (float& g : gain) g = static_cast<float>(std::exp2(2.0 * rng_.Uniform() - 1.0));
    for (int64_t r = 0; r < out; ++r) {
      for (int64_t col = 0; col < in; ++col) {
        w[r * in + col] *= gain[(r / block_.rows) * nbc + col / block_.cols];
      }
    }
    std::vector<uint8_t> fp8(out * in);
    std::vector<float> scale_inv(nbr * nbc);
    QuantizeWeightBlocks(w, out, in, block_, fp8, scale_inv);
    Add(name, DType::kF8E4M3, {out, in}, fp8.data(), fp8.size());
    F32(name + "_scale_inv", {nbr, nbc}, scale_inv);
  }

  void Mlp(const std::string& p, int64_t inter) {
    Fp8(p + "gate_proj.weight", inter, c_.hidden_size);
    Fp8(p + "up_proj.weight", inter, c_.hidden_size);
    Fp8(p + "down_proj.weight", c_.hidden_size, inter);
  }

  void DecoderLayer(int layer) {
    const std::string p = absl::StrCat("model.layers.", layer, ".");
    const int64_t h = c_.hidden_size, heads = c_.num_attention_heads;
    Norm(p + "input_layernorm.weight", h);
    const std::string a = p + "self_attn.";
    if (c_.q_lora_rank > 0) {
      Fp8(a + "q_a_proj.weight", c_.q_lora_rank, h);
      Norm(a + "q_a_layernorm.weight", c_.q_lora_rank);
      Fp8(a + "q_b_proj.weight", heads * c_.qk_head_dim(), c_.q_lora_rank);
    } else {
      Fp8(a + "q_proj.weight", heads * c_.qk_head_dim(), h);
    }
    Fp8(a + "kv_a_proj_with_mqa.weight", c_.kv_lora_rank + c_.qk_rope_head_dim, h);
    Norm(a + "kv_a_layernorm.weight", c_.kv_lora_rank);
    Fp8(a + "kv_b_proj.weight", heads * (c_.qk_nope_head_dim + c_.v_head_dim), c_.kv_lora_rank);
    Fp8(a + "o_proj.weight", h, heads * c_.v_head_dim);
    Norm(p + "post_attention_layernorm.weight", h);
    if (!c_.IsMoeLayer(layer)) {
      Mlp(p + "mlp.", c_.intermediate_size);
      return;
    }
    // Gate logits of std ~2 so the sigmoid scores spread; a small correction bias.
    Bf16(p + "mlp.gate.weight", {c_.n_routed_experts, h},
         Gaussian(c_.n_routed_experts * h, 0.0, 2.0 / std::sqrt(static_cast<double>(h))));
    std::vector<float> bias = Gaussian(c_.n_routed_experts, 0.0, 0.1);
    // A skewed load on purpose (gate_skew > 0): the first quarter of the experts, which the
    // even placement puts together on the first shard groups, get a larger correction bias,
    // falling linearly from gate_skew to 0, so the gate picks them more often.
    const int64_t hot = std::max<int64_t>(1, c_.n_routed_experts / 4);
    for (int64_t e = 0; e < hot && gate_skew_ > 0; ++e) {
      bias[e] += static_cast<float>(gate_skew_ * (1.0 - static_cast<double>(e) / hot));
    }
    F32(p + "mlp.gate.e_score_correction_bias", {c_.n_routed_experts}, bias);
    for (int e = 0; e < c_.n_routed_experts; ++e) {
      Mlp(absl::StrCat(p, "mlp.experts.", e, "."), c_.moe_intermediate_size);
    }
    if (c_.n_shared_experts > 0) {
      Mlp(p + "mlp.shared_experts.", c_.moe_intermediate_size * c_.n_shared_experts);
    }
  }

  std::vector<TensorToWrite> Build() {
    const int64_t h = c_.hidden_size, vocab = c_.vocab_size;
    std::vector<float> embed = Gaussian(vocab * h, 0.0, 1.0);
    // Logits of std ~3 after the final norm: peaked enough that greedy decoding is decisive.
    std::vector<float> head = Gaussian(vocab * h, 0.0, 3.0 / std::sqrt(static_cast<double>(h)));
    Bf16("model.embed_tokens.weight", {vocab, h}, embed);
    for (int layer = 0; layer < c_.num_hidden_layers; ++layer) DecoderLayer(layer);
    Norm("model.norm.weight", h);
    Bf16("lm_head.weight", {vocab, h}, head);
    for (int k = 0; k < c_.num_nextn_predict_layers; ++k) {
      const int layer = static_cast<int>(c_.num_hidden_layers + k);
      const std::string p = absl::StrCat("model.layers.", layer, ".");
      // As released: the MTP layer carries copies of the embedding and the LM head.
      Bf16(p + "embed_tokens.weight", {vocab, h}, embed);
      Norm(p + "enorm.weight", h);
      Norm(p + "hnorm.weight", h);
      Bf16(p + "eh_proj.weight", {h, 2 * h},
           Gaussian(h * 2 * h, 0.0, 1.0 / std::sqrt(2.0 * static_cast<double>(h))));
      DecoderLayer(layer);
      Norm(p + "shared_head.norm.weight", h);
      Bf16(p + "shared_head.head.weight", {vocab, h}, head);
    }
    return std::move(tensors_);
  }

 private:
  void Add(const std::string& name, DType dtype, std::vector<int64_t> shape, const void* data,
           size_t bytes) {
    TensorToWrite t{name, dtype, std::move(shape), std::vector<uint8_t>(bytes)};
    std::memcpy(t.data.data(), data, bytes);
    tensors_.push_back(std::move(t));
  }

  const ModelConfig& c_;
  Rng rng_;
  double gate_skew_;
  BlockShape block_;
  std::vector<TensorToWrite> tensors_;
};

}  // namespace

absl::Status WriteRandomCheckpoint(const ModelConfig& config, const std::string& config_json,
                                   const std::string& dir, uint64_t seed, int min_shards,
                                   double gate_skew) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  {
    std::ofstream f(dir + "/config.json", std::ios::binary);
    f << config_json;
    if (!f) return absl::InternalError(absl::StrCat("cannot write ", dir, "/config.json"));
  }
  Writer w(config, seed, gate_skew);
  return WriteShardedCheckpoint(dir, w.Build(), min_shards);
}

}  // namespace expertmesh
