#include "core/model/model.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/base/status.h"
#include "core/numerics/numerics.h"

namespace expertmesh {

namespace {

// Fixed-order dot product: 8 interleaved partial sums, combined pairwise. The order depends
// only on n, never on what else is computed, so every caller gets identical bits.
float Dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (; i < n; ++i) acc[i % 8] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

}  // namespace

void Linear::DequantizeRow(int64_t r, float* out) const {
  const int64_t n = in_features;
  switch (dtype) {
    case DType::kF8E4M3: {
      const uint8_t* w = weight.as<uint8_t>() + r * n;
      const float* scales = scale_inv.as<float>() + (r / block.rows) * NumBlocks(n, block.cols);
      const float* table = Fp8E4M3Table();
      for (int64_t c0 = 0, b = 0; c0 < n; c0 += block.cols, ++b) {
        const int64_t c1 = std::min<int64_t>(n, c0 + block.cols);
        for (int64_t c = c0; c < c1; ++c) out[c] = table[w[c]] * scales[b];
      }
      break;
    }
    case DType::kBF16: {
      // BF16 is the top half of a float32: exact, inlined.
      const uint16_t* w = weight.as<uint16_t>() + r * n;
      for (int64_t c = 0; c < n; ++c) out[c] = std::bit_cast<float>(uint32_t{w[c]} << 16);
      break;
    }
    case DType::kF16: {
      const uint16_t* w = weight.as<uint16_t>() + r * n;
      for (int64_t c = 0; c < n; ++c) out[c] = Fp16ToFloat(w[c]);
      break;
    }
    default:  // kF32 (LoadLinear admits nothing else)
      std::memcpy(out, weight.as<float>() + r * n, n * sizeof(float));
      break;
  }
}

void Linear::DequantizeRowSimd(int64_t r, float* out) const {
  const int64_t n = in_features;
  switch (dtype) {
    case DType::kF8E4M3:
      simd::DequantFp8Row(weight.as<uint8_t>() + r * n,
                          scale_inv.as<float>() + (r / block.rows) * NumBlocks(n, block.cols), n,
                          block.cols, out);
      break;
    case DType::kBF16:
      simd::DequantBf16Row(weight.as<uint16_t>() + r * n, n, out);
      break;
    case DType::kF16:
      simd::DequantF16Row(weight.as<uint16_t>() + r * n, n, out);
      break;
    default:
      DequantizeRow(r, out);
      break;
  }
}

void Linear::Pack() {
  const bool fp8 = dtype == DType::kF8E4M3;
  if (fp8 && (block.rows % simd::kTileRows != 0 || block.cols % 4 != 0)) return;
  if (!fp8 && dtype != DType::kBF16 && dtype != DType::kF16) return;
  if (fp8) {  // TiledLinear's FP8 preconditions; weights that fail them stay row-wise
    const uint8_t* w = weight.data;
    for (int64_t i = 0; i < out_features * in_features; ++i) {
      if ((w[i] & 0x7F) == 0x7F) return;  // NaN
    }
    const float* s = scale_inv.as<float>();
    for (uint64_t i = 0; i < scale_inv.size / sizeof(float); ++i) {
      if (!(std::abs(s[i]) < 0x1p7f)) return;
    }
  }
  const int64_t bytes = fp8 ? 1 : 2, T = simd::kTileRows;
  const int64_t n_tiles = (out_features + T - 1) / T;
  auto packed = std::make_shared<std::vector<uint8_t>>(n_tiles * T * in_features * bytes, 0);
  const uint8_t* w = weight.data;
  for (int64_t o = 0; o < out_features; ++o) {
    uint8_t* tile = packed->data() + (o / T) * T * in_features * bytes;
    const uint8_t* row = w + o * in_features * bytes;
    for (int64_t k = 0; k < in_features; ++k) {
      std::memcpy(tile + (k * T + o % T) * bytes, row + k * bytes, bytes);
    }
  }
  tiles = std::move(packed);
  tiles_of = weight.data;
  ReleaseWeightPages();
}

void Linear::ReleaseWeightPages() const {
  if (weight.data == nullptr || weight.size == 0) return;
  // MADV_PAGEOUT reclaims clean file pages at once and leaves anonymous memory as it is (a
  // view of a heap buffer keeps its bytes); a later read of the view faults the pages back in
  // from the file. Kernels before 5.4 refuse it (EINVAL): the pages then stay mapped.
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(weight.data);
  const uintptr_t first = begin & ~(page - 1);
  // Inside the view's mapping, which covers exactly the pages holding the tensor.
  const uintptr_t last = (begin + weight.size + page - 1) & ~(page - 1);
#ifdef MADV_PAGEOUT
  ::madvise(reinterpret_cast<void*>(first), last - first, MADV_PAGEOUT);
#else
  (void)first;
  (void)last;
#endif
}

void Linear::Forward(const float* x, int64_t n, float* y, bool quantize_activations,
                     LinearKernel kernel) const {
  std::vector<float> xq;
  if (is_fp8() && quantize_activations) {
    xq.assign(x, x + n * in_features);
    FakeQuantizeActivations(xq, n, in_features);
    x = xq.data();
  }
  if (kernel == LinearKernel::kSimd && tiles != nullptr && tiles_of == weight.data) {
    const simd::TileType type = dtype == DType::kF8E4M3 ? simd::TileType::kF8E4M3
                                : dtype == DType::kBF16 ? simd::TileType::kBF16
                                                        : simd::TileType::kF16;
    simd::TiledLinear(type, tiles->data(), is_fp8() ? scale_inv.as<float>() : nullptr, block.rows,
                      block.cols, out_features, in_features, x, n, y);
    return;
  }
  std::vector<float> w_row(in_features);
  if (kernel == LinearKernel::kSimd) {
    // F32 weights are read in place; the others are widened one row at a time (in L1).
    for (int64_t o = 0; o < out_features; ++o) {
      const float* w = dtype == DType::kF32 ? weight.as<float>() + o * in_features : w_row.data();
      if (dtype != DType::kF32) DequantizeRowSimd(o, w_row.data());
      simd::DotRows(w, x, n, in_features, in_features, y + o, out_features);
    }
    return;
  }
  for (int64_t o = 0; o < out_features; ++o) {
    DequantizeRow(o, w_row.data());
    for (int64_t t = 0; t < n; ++t) {
      y[t * out_features + o] = Dot(x + t * in_features, w_row.data(), in_features);
    }
  }
}

absl::StatusOr<Linear> LoadLinear(const Checkpoint& ckpt, const std::string& name,
                                  int64_t expected_out, int64_t expected_in, BlockShape block) {
  const TensorInfo* info = ckpt.Info(name);
  if (info == nullptr) return absl::NotFoundError(absl::StrCat("checkpoint lacks ", name));
  if (info->shape.size() != 2 || info->shape[0] != expected_out || info->shape[1] != expected_in) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: shape [%s], expected [%d, %d]", name,
                                                      absl::StrJoin(info->shape, ", "),
                                                      expected_out, expected_in));
  }
  Linear linear;
  linear.name = name;
  linear.dtype = info->dtype;
  linear.out_features = expected_out;
  linear.in_features = expected_in;
  linear.block = block;
  const std::string scale_name = name + "_scale_inv";
  const bool has_scale = ckpt.Has(scale_name);
  if (has_scale != (info->dtype == DType::kF8E4M3)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: dtype %s %s a weight_scale_inv beside it", name,
                        DTypeName(info->dtype), has_scale ? "but has" : "and lacks"));
  }
  if (info->dtype != DType::kF8E4M3 && info->dtype != DType::kBF16 && info->dtype != DType::kF16 &&
      info->dtype != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: unsupported dtype %s", name, DTypeName(info->dtype)));
  }
  EM_ASSIGN_OR_RETURN(linear.weight, ckpt.Get(name));
  if (has_scale) {
    const TensorInfo* s = ckpt.Info(scale_name);
    const int64_t rows = NumBlocks(expected_out, block.rows);
    const int64_t cols = NumBlocks(expected_in, block.cols);
    if (s->dtype != DType::kF32 || s->shape.size() != 2 || s->shape[0] != rows ||
        s->shape[1] != cols) {
      return absl::InvalidArgumentError(absl::StrFormat("%s: %s [%s], expected F32 [%d, %d]",
                                                        scale_name, DTypeName(s->dtype),
                                                        absl::StrJoin(s->shape, ", "), rows, cols));
    }
    EM_ASSIGN_OR_RETURN(linear.scale_inv, ckpt.Get(scale_name));
  }
  return linear;
}

absl::StatusOr<std::vector<float>> LoadFloatTensor(const Checkpoint& ckpt, const std::string& name,
                                                   int64_t expected_numel) {
  const TensorInfo* info = ckpt.Info(name);
  if (info == nullptr) return absl::NotFoundError(absl::StrCat("checkpoint lacks ", name));
  if (info->numel() != expected_numel) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: %d elements, expected %d", name, info->numel(), expected_numel));
  }
  EM_ASSIGN_OR_RETURN(auto view, ckpt.Get(name));
  std::vector<float> out(expected_numel);
  switch (info->dtype) {
    case DType::kF32:
      std::memcpy(out.data(), view.data, expected_numel * sizeof(float));
      break;
    case DType::kBF16:
      for (int64_t i = 0; i < expected_numel; ++i) out[i] = Bf16ToFloat(view.as<uint16_t>()[i]);
      break;
    case DType::kF16:
      for (int64_t i = 0; i < expected_numel; ++i) out[i] = Fp16ToFloat(view.as<uint16_t>()[i]);
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: unsupported dtype %s", name, DTypeName(info->dtype)));
  }
  return out;
}

BlockShape WeightBlockShape(const ModelConfig& config) {
  const auto& b = config.quantization_config.weight_block_size;
  if (b.size() == 2 && b[0] > 0 && b[1] > 0) return BlockShape{b[0], b[1]};
  return BlockShape{};
}

absl::Status ValidateModelConfig(const ModelConfig& c) {
  auto positive = [](std::string_view field, int64_t v) -> absl::Status {
    if (v > 0) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrFormat("config: %s must be > 0, got %d", field, v));
  };
  for (auto [field, v] : {std::pair<std::string_view, int64_t>{"vocab_size", c.vocab_size},
                          {"hidden_size", c.hidden_size},
                          {"num_hidden_layers", c.num_hidden_layers},
                          {"num_attention_heads", c.num_attention_heads},
                          {"kv_lora_rank", c.kv_lora_rank},
                          {"qk_nope_head_dim", c.qk_nope_head_dim},
                          {"qk_rope_head_dim", c.qk_rope_head_dim},
                          {"v_head_dim", c.v_head_dim}}) {
    EM_RETURN_IF_ERROR(positive(field, v));
  }
  if (c.qk_rope_head_dim % 2 != 0) {
    return absl::InvalidArgumentError("config: qk_rope_head_dim must be even (RoPE pairs)");
  }
  if (c.hidden_act != "silu") {
    return absl::InvalidArgumentError(
        absl::StrCat("config: hidden_act must be silu, got ", c.hidden_act));
  }
  if (c.attention_bias) return absl::InvalidArgumentError("config: attention_bias is unsupported");
  return absl::OkStatus();
}

void PrecomputeAbsorbed(const ModelConfig& c, MlaWeights* w) {
  const Linear& kvb = w->kv_b_proj;
  const int64_t rank = c.kv_lora_rank;
  const int64_t rows = c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim);
  auto m = std::make_shared<std::vector<float>>(rows * rank);
  // Exact either way: DequantizeRowSimd gives DequantizeRow's bits.
  for (int64_t r = 0; r < rows; ++r) kvb.DequantizeRowSimd(r, m->data() + r * rank);
  w->kv_b_absorbed = std::move(m);
  if (kvb.tiles != nullptr && kvb.tiles_of == kvb.weight.data) kvb.ReleaseWeightPages();
}

namespace {

// Counts loaded tensors for the progress callback.
class Loader {
 public:
  Loader(const Checkpoint& ckpt, BlockShape block, int64_t total,
         const std::function<void(int64_t, int64_t)>& progress)
      : ckpt_(ckpt), block_(block), total_(total), progress_(progress) {}

  absl::Status Lin(const std::string& name, int64_t out, int64_t in, Linear* dst) {
    auto l = LoadLinear(ckpt_, name, out, in, block_);
    // Embedding tables are read a row at a time, never multiplied: no tiles for them.
    if (l.ok() && !name.ends_with("embed_tokens.weight")) l->Pack();
    if (!l.ok()) return l.status();
    *dst = *std::move(l);
    Tick(dst->is_fp8() ? 2 : 1);
    return absl::OkStatus();
  }
  absl::Status Vec(const std::string& name, int64_t numel, std::vector<float>* dst) {
    EM_ASSIGN_OR_RETURN(*dst, LoadFloatTensor(ckpt_, name, numel));
    Tick(1);
    return absl::OkStatus();
  }
  void Finish() {
    if (progress_) progress_(total_, total_);
  }
  const Checkpoint& ckpt() const { return ckpt_; }

 private:
  void Tick(int64_t n) {
    done_ = std::min(done_ + n, total_);
    if (progress_) progress_(done_, total_);
  }
  const Checkpoint& ckpt_;
  BlockShape block_;
  int64_t total_;
  int64_t done_ = 0;
  const std::function<void(int64_t, int64_t)>& progress_;
};

absl::Status LoadMlp(Loader& ld, const std::string& prefix, int64_t hidden, int64_t inter,
                     MlpWeights* m) {
  EM_RETURN_IF_ERROR(ld.Lin(prefix + "gate_proj.weight", inter, hidden, &m->gate_proj));
  EM_RETURN_IF_ERROR(ld.Lin(prefix + "up_proj.weight", inter, hidden, &m->up_proj));
  return ld.Lin(prefix + "down_proj.weight", hidden, inter, &m->down_proj);
}

absl::Status LoadDecoderLayer(Loader& ld, const ModelConfig& c, int layer, bool absorbed,
                              DecoderLayerWeights* w) {
  const std::string p = absl::StrCat("model.layers.", layer, ".");
  const int64_t h = c.hidden_size;
  const int64_t heads = c.num_attention_heads;
  w->layer = layer;
  w->is_moe = c.IsMoeLayer(layer);
  EM_RETURN_IF_ERROR(ld.Vec(p + "input_layernorm.weight", h, &w->input_layernorm));
  EM_RETURN_IF_ERROR(
      ld.Vec(p + "post_attention_layernorm.weight", h, &w->post_attention_layernorm));
  MlaWeights& a = w->self_attn;
  const std::string ap = p + "self_attn.";
  if (c.q_lora_rank > 0) {
    a.q_a_proj.emplace();
    a.q_b_proj.emplace();
    EM_RETURN_IF_ERROR(ld.Lin(ap + "q_a_proj.weight", c.q_lora_rank, h, &*a.q_a_proj));
    EM_RETURN_IF_ERROR(ld.Vec(ap + "q_a_layernorm.weight", c.q_lora_rank, &a.q_a_layernorm));
    EM_RETURN_IF_ERROR(
        ld.Lin(ap + "q_b_proj.weight", heads * c.qk_head_dim(), c.q_lora_rank, &*a.q_b_proj));
  } else {
    a.q_proj.emplace();
    EM_RETURN_IF_ERROR(ld.Lin(ap + "q_proj.weight", heads * c.qk_head_dim(), h, &*a.q_proj));
  }
  EM_RETURN_IF_ERROR(ld.Lin(ap + "kv_a_proj_with_mqa.weight", c.kv_lora_rank + c.qk_rope_head_dim,
                            h, &a.kv_a_proj_with_mqa));
  EM_RETURN_IF_ERROR(ld.Vec(ap + "kv_a_layernorm.weight", c.kv_lora_rank, &a.kv_a_layernorm));
  EM_RETURN_IF_ERROR(ld.Lin(ap + "kv_b_proj.weight", heads * (c.qk_nope_head_dim + c.v_head_dim),
                            c.kv_lora_rank, &a.kv_b_proj));
  EM_RETURN_IF_ERROR(ld.Lin(ap + "o_proj.weight", h, heads * c.v_head_dim, &a.o_proj));
  if (absorbed) PrecomputeAbsorbed(c, &a);
  if (!w->is_moe) {
    w->mlp.emplace();
    return LoadMlp(ld, p + "mlp.", h, c.intermediate_size, &*w->mlp);
  }
  EM_RETURN_IF_ERROR(ld.Vec(p + "mlp.gate.weight", c.n_routed_experts * h, &w->gate.weight));
  EM_RETURN_IF_ERROR(ld.Vec(p + "mlp.gate.e_score_correction_bias", c.n_routed_experts,
                            &w->gate.e_score_correction_bias));
  if (c.n_shared_experts > 0) {
    w->shared_experts.emplace();
    EM_RETURN_IF_ERROR(LoadMlp(ld, p + "mlp.shared_experts.", h,
                               c.moe_intermediate_size * c.n_shared_experts, &*w->shared_experts));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> Model::Create(const Checkpoint& ckpt,
                                                     const ModelConfig& config,
                                                     const ModelLoadOptions& options) {
  EM_RETURN_IF_ERROR(ValidateModelConfig(config));
  EM_ASSIGN_OR_RETURN(auto gate_params, GateParams::FromConfig(config));
  const int64_t n_layers = config.num_hidden_layers;
  const int64_t n_mtp = options.load_mtp ? config.num_nextn_predict_layers : 0;
  // Progress total: every tensor of the loaded layers except routed experts.
  int64_t total = 0;
  for (const std::string& name : ckpt.TensorNames()) {
    if (name.find(".mlp.experts.") != std::string::npos) continue;
    int64_t layer = -1;
    if (name.rfind("model.layers.", 0) == 0) layer = std::atoll(name.c_str() + 13);
    if (layer >= n_layers + n_mtp) continue;
    ++total;
  }
  Loader ld(ckpt, WeightBlockShape(config), total, options.progress);
  std::unique_ptr<Model> m(new Model());
  m->config_ = config;
  m->gate_params_ = gate_params;
  const int64_t h = config.hidden_size;
  EM_RETURN_IF_ERROR(ld.Lin("model.embed_tokens.weight", config.vocab_size, h, &m->embed_tokens_));
  m->layers_.resize(n_layers);
  for (int layer = 0; layer < n_layers; ++layer) {
    EM_RETURN_IF_ERROR(
        LoadDecoderLayer(ld, config, layer, options.absorbed_attention, &m->layers_[layer]));
  }
  EM_RETURN_IF_ERROR(ld.Vec("model.norm.weight", h, &m->norm_));
  EM_RETURN_IF_ERROR(ld.Lin("lm_head.weight", config.vocab_size, h, &m->lm_head_));
  m->mtp_.resize(n_mtp);
  for (int k = 0; k < n_mtp; ++k) {
    MtpWeights& t = m->mtp_[k];
    t.layer = static_cast<int>(n_layers + k);
    const std::string p = absl::StrCat("model.layers.", t.layer, ".");
    EM_RETURN_IF_ERROR(ld.Vec(p + "enorm.weight", h, &t.enorm));
    EM_RETURN_IF_ERROR(ld.Vec(p + "hnorm.weight", h, &t.hnorm));
    EM_RETURN_IF_ERROR(ld.Lin(p + "eh_proj.weight", h, 2 * h, &t.eh_proj));
    EM_RETURN_IF_ERROR(LoadDecoderLayer(ld, config, t.layer, options.absorbed_attention, &t.block));
    EM_RETURN_IF_ERROR(ld.Vec(p + "shared_head.norm.weight", h, &t.shared_head_norm));
    if (ckpt.Has(p + "shared_head.head.weight")) {
      EM_RETURN_IF_ERROR(
          ld.Lin(p + "shared_head.head.weight", config.vocab_size, h, &t.shared_head_head));
    } else {
      t.shared_head_head = m->lm_head_;
    }
    if (ckpt.Has(p + "embed_tokens.weight")) {
      EM_RETURN_IF_ERROR(ld.Lin(p + "embed_tokens.weight", config.vocab_size, h, &t.embed_tokens));
    } else {
      t.embed_tokens = m->embed_tokens_;
    }
  }
  ld.Finish();
  return m;
}

}  // namespace expertmesh
