// Tensor-parallel sharding plan of the attention side of a DeepSeek-V3 model over the GPUs of
// one process: which rows / columns of every non-expert tensor each rank holds, and how the
// partial results are combined. Plain host code, so the plan and its arithmetic are tested on
// the CPU (tests/core/tp_plan_test.cc); core/kernels/cuda/cuda_engine.cc only follows it.
//
//   attention  heads split evenly (num_attention_heads % tp_size == 0): rank r holds heads
//              [r * H / tp, (r + 1) * H / tp): the rows of q_b_proj (or q_proj) and kv_b_proj of
//              those heads, and the matching o_proj columns -> partial sums, all-reduced.
//              q_a_proj, kv_a_proj_with_mqa and the norms are replicated: every rank computes
//              and caches the whole MLA latent (it is shared by all heads).
//   dense MLP  intermediate split: gate_proj / up_proj rows and down_proj columns -> partial
//   shared     sums, all-reduced (a rank may get an empty range: it contributes zero).
//   replicated embed_tokens, every norm, the gate, lm_head, eh_proj, enorm / hnorm.
//
// Column splits and FP8: with quantized activations an FP8 weight sees its input quantized per
// 128 channels over the whole row. A column range starting at a multiple of 128 quantizes the
// same groups locally, so the split stays exact; so MLP ranges are cut in 128-channel units, and
// when the heads' o_proj columns do not start at multiples of 128 (small models) o_proj switches
// to kGatherReplicated: the attention outputs are all-gathered and every rank runs o_proj whole.
// Legend: H = num_attention_heads, tp = tensor-parallel size.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/format/config.h"
#include "core/model/model.h"

namespace expertmesh {

struct Range {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
  bool empty() const { return end <= begin; }
  bool operator==(const Range&) const = default;
};

enum class OProjMode {
  kColumnParallel,    // o_proj columns of the rank's heads; partial sums all-reduced
  kGatherReplicated,  // attention outputs all-gathered; o_proj whole on every rank
};

struct RankShard {
  int rank = 0;
  Range heads;         // [h0, h1)
  Range q_rows;        // q_b_proj / q_proj rows: heads * qk_head_dim
  Range kv_b_rows;     // kv_b_proj rows: heads * (qk_nope_head_dim + v_head_dim)
  Range o_cols;        // o_proj columns: heads * v_head_dim (kColumnParallel)
  Range mlp_inter;     // dense MLP intermediate_size range (gate/up rows, down columns)
  Range shared_inter;  // shared experts' range of n_shared_experts * moe_intermediate_size
};

struct TpPlan {
  int tp_size = 1;
  int64_t mlp_unit = 1;  // granularity of the intermediate ranges (128 with FP8 activations)
  OProjMode o_proj = OProjMode::kColumnParallel;
  std::vector<RankShard> ranks;  // [tp_size]
};

// quantized_fp8: the model's projections are FP8 and activations are quantized (engine option
// quantize_activations); that is what makes column splits care about 128-channel groups.
// InvalidArgument when num_attention_heads is not divisible by tp_size (or tp_size < 1).
absl::StatusOr<TpPlan> PlanTensorParallel(const ModelConfig& config, int tp_size,
                                          bool quantized_fp8);

// Rank `rank`'s part of `total` cut into `unit`-sized pieces, balanced, lower ranks first
// (ranks past the pieces get an empty range).
Range SplitRange(int64_t total, int64_t unit, int tp_size, int rank);

// Every non-expert tensor of the model and the part a rank holds of it ([out, in] weights:
// rows and columns; 1-D tensors: rows), for logs and tests. Names as in the checkpoint.
struct TensorShard {
  std::string name;
  Range rows;
  Range cols;
  bool replicated = true;
};
std::vector<TensorShard> ShardsOfRank(const Model& model, const TpPlan& plan, int rank);

// A standalone host copy of W[rows, cols] (keeps the dtype; FP8 keeps its block scales, so both
// ranges must start at block boundaries, or cover the whole dimension). The result owns its
// storage (through TensorView::owner).
absl::StatusOr<Linear> SliceLinear(const Linear& w, Range rows, Range cols);
// W[rows, cols] dequantized to float: [rows.size(), cols.size()], any alignment.
std::vector<float> DequantizeSlice(const Linear& w, Range rows, Range cols);

}  // namespace expertmesh
