// The weights of a DeepSeek-V3 model, loaded from a Checkpoint: everything except the routed
// experts (those live in LocalExperts, or in expert shards). Projection weights stay mapped in
// their checkpoint dtype -- FP8 E4M3 blocks plus weight_scale_inv, or BF16/F32 -- so a model
// takes its FP8 size in memory; a Linear dequantizes one row (128-column blocks) at a time.
// Norm vectors and the gate are small and are copied to float.
// A weight is FP8 exactly when a `<name>_scale_inv` tensor stands beside it in the index.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/base/status.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/kernels/cpu/cpu_kernels.h"
#include "core/model/gate.h"
#include "core/numerics/quant.h"

namespace expertmesh {

// y = x W^T with W: [out_features, in_features].
struct Linear {
  std::string name;  // e.g. model.layers.3.self_attn.q_a_proj.weight
  DType dtype = DType::kF32;
  int64_t out_features = 0;
  int64_t in_features = 0;
  TensorView weight;     // [out_features, in_features]
  TensorView scale_inv;  // FP8 only: [ceil(out/block.rows), ceil(in/block.cols)] float32
  BlockShape block;

  // The SIMD kernels' copy of the weight in 16-row tiles (core/kernels/cpu/cpu_kernels.h
  // TiledLinear), built by Pack(); used while tiles_of == weight.data (a copy whose view was
  // changed, e.g. sliced, falls back to the row-wise kernels).
  std::shared_ptr<const std::vector<uint8_t>> tiles;
  const uint8_t* tiles_of = nullptr;

  bool is_fp8() const { return dtype == DType::kF8E4M3; }
  // Builds `tiles` (FP8 with block.rows % 16 == 0 and block.cols % 4 == 0, BF16, F16; F32
  // weights are read in place), then releases the weight's mapped pages
  // (ReleaseWeightPages): a packed weight is held once, in its tiles, and the file's pages come
  // back only if the row-wise kernels read the view again.
  void Pack();
  // Drops the resident pages of `weight` from this process (madvise MADV_PAGEOUT: clean file
  // pages go, anonymous memory is left alone); the view stays valid.
  void ReleaseWeightPages() const;
  // Row r of W as float: out [in_features].
  void DequantizeRow(int64_t r, float* out) const;
  // The same in SIMD: bitwise equal.
  void DequantizeRowSimd(int64_t r, float* out) const;
  // y: [n, out_features] = x: [n, in_features] . W^T. With quantize_activations and an FP8
  // weight, each row of x is first quantized per 128 channels (what DeepSeek's FP8 GEMM sees).
  // Every row is computed alone, in a fixed order (batch invariant). `kernel` picks the
  // SIMD kernels (core/kernels/cpu/cpu_kernels.h) or the plain reference loops.
  void Forward(const float* x, int64_t n, float* y, bool quantize_activations,
               LinearKernel kernel = LinearKernel::kSimd) const;
};

// Loads `name` as a Linear: FP8 when `<name>_scale_inv` exists, else BF16/F16/F32.
// expected_out/in check the shape (the error names the tensor).
absl::StatusOr<Linear> LoadLinear(const Checkpoint& ckpt, const std::string& name,
                                  int64_t expected_out, int64_t expected_in, BlockShape block);
// A 1-D or 2-D tensor of any float dtype copied to float, shape checked against numel.
absl::StatusOr<std::vector<float>> LoadFloatTensor(const Checkpoint& ckpt, const std::string& name,
                                                   int64_t expected_numel);

struct MlaWeights {
  std::optional<Linear> q_proj;       // when q_lora_rank == 0: [n_heads * qk_head_dim, hidden]
  std::optional<Linear> q_a_proj;     // [q_lora_rank, hidden_size]
  std::vector<float> q_a_layernorm;   // [q_lora_rank]
  std::optional<Linear> q_b_proj;     // [num_attention_heads * qk_head_dim, q_lora_rank]
  Linear kv_a_proj_with_mqa;          // [kv_lora_rank + qk_rope_head_dim, hidden_size]
  std::vector<float> kv_a_layernorm;  // [kv_lora_rank]
  Linear kv_b_proj;  // [num_attention_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]
  Linear o_proj;     // [hidden_size, num_attention_heads * v_head_dim]
  // The absorbed attention's matrices, kv_b_proj dequantized to float once at load
  // (PrecomputeAbsorbed): [num_attention_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank],
  // per head its W_UK rows [qk_nope_head_dim, kv_lora_rank] (the query absorption) then its W_UV
  // rows [v_head_dim, kv_lora_rank] (the output), the layout the attention core reads. Float and
  // not BF16: an FP8 code times its block scale is exact in float (one rounding, the same bits
  // as dequantizing in every forward) and not in BF16. 4 bytes per weight, 4x the FP8 kv_b_proj
  // (DeepSeek-V3: 67.1 MB per layer against 16.8 MB). Null (weights assembled by hand, a load
  // with ModelLoadOptions::absorbed_attention off): the forward dequantizes kv_b_proj itself.
  std::shared_ptr<const std::vector<float>> kv_b_absorbed;
};

// Fills w->kv_b_absorbed from w->kv_b_proj (heads, head dims and rank from c), then drops
// kv_b_proj's mapped pages again when it is packed (the naive form reads its tiles).
void PrecomputeAbsorbed(const ModelConfig& c, MlaWeights* w);

struct MlpWeights {  // SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))
  Linear gate_proj;  // [intermediate, hidden_size]
  Linear up_proj;    // [intermediate, hidden_size]
  Linear down_proj;  // [hidden_size, intermediate]
};

struct DecoderLayerWeights {
  int layer = 0;
  bool is_moe = false;
  std::vector<float> input_layernorm;           // [hidden_size]
  std::vector<float> post_attention_layernorm;  // [hidden_size]
  MlaWeights self_attn;
  std::optional<MlpWeights> mlp;             // dense layers
  GateWeights gate;                          // MoE layers
  std::optional<MlpWeights> shared_experts;  // MoE layers with n_shared_experts > 0
};

// Multi-token prediction module model.layers.{num_hidden_layers + k}.
struct MtpWeights {
  int layer = 0;
  std::vector<float> enorm;  // [hidden_size]
  std::vector<float> hnorm;  // [hidden_size]
  Linear eh_proj;            // [hidden_size, 2 * hidden_size]
  DecoderLayerWeights block;
  std::vector<float> shared_head_norm;  // [hidden_size]
  Linear shared_head_head;              // [vocab_size, hidden_size] (the main lm_head if absent)
  Linear embed_tokens;                  // [vocab_size, hidden_size] (the main one if absent)
};

struct ModelLoadOptions {
  bool load_mtp = true;  // the model.layers.{num_hidden_layers..} modules, when the config has them
  // MlaWeights::kv_b_absorbed for every layer (the absorbed attention's float matrices); off
  // for the naive form only, or to save their memory at the cost of a dequantization per step.
  bool absorbed_attention = true;
  // Called after each tensor: (tensors done, tensors total).
  std::function<void(int64_t done, int64_t total)> progress;
};

class Model {
 public:
  static absl::StatusOr<std::unique_ptr<Model>> Create(const Checkpoint& ckpt,
                                                       const ModelConfig& config,
                                                       const ModelLoadOptions& options = {});
  const ModelConfig& config() const { return config_; }
  const Linear& embed_tokens() const { return embed_tokens_; }  // [vocab_size, hidden_size]
  const std::vector<DecoderLayerWeights>& layers() const { return layers_; }
  const std::vector<float>& norm() const { return norm_; }
  const Linear& lm_head() const { return lm_head_; }
  const std::vector<MtpWeights>& mtp() const { return mtp_; }
  const GateParams& gate_params() const { return gate_params_; }

 private:
  Model() = default;
  ModelConfig config_;
  GateParams gate_params_;
  Linear embed_tokens_;
  std::vector<DecoderLayerWeights> layers_;
  std::vector<float> norm_;
  Linear lm_head_;
  std::vector<MtpWeights> mtp_;
};

// Validates the fields this engine depends on (heads, ranks, vocab); shared by every loader.
absl::Status ValidateModelConfig(const ModelConfig& config);
BlockShape WeightBlockShape(const ModelConfig& config);

}  // namespace expertmesh
