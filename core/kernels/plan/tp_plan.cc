#include "core/kernels/plan/tp_plan.h"

#include <algorithm>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace expertmesh {

namespace {

constexpr int64_t kQuantGroup = 128;  // activation quantization group (core/numerics/quant.h)

Range Scaled(Range r, int64_t k) { return {r.begin * k, r.end * k}; }
Range Whole(int64_t n) { return {0, n}; }

}  // namespace

Range SplitRange(int64_t total, int64_t unit, int tp_size, int rank) {
  const int64_t pieces = (total + unit - 1) / unit;
  const int64_t b = pieces * rank / tp_size;
  const int64_t e = pieces * (rank + 1) / tp_size;
  return {std::min(total, b * unit), std::min(total, e * unit)};
}

absl::StatusOr<TpPlan> PlanTensorParallel(const ModelConfig& c, int tp_size, bool quantized_fp8) {
  if (tp_size < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("tensor parallel size %d < 1", tp_size));
  }
  if (c.num_attention_heads % tp_size != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor parallelism: num_attention_heads (%d) is not divisible by the %d devices",
        c.num_attention_heads, tp_size));
  }
  TpPlan plan;
  plan.tp_size = tp_size;
  plan.mlp_unit = quantized_fp8 ? kQuantGroup : 1;
  const int64_t heads_per_rank = c.num_attention_heads / tp_size;
  const bool o_aligned = (heads_per_rank * c.v_head_dim) % kQuantGroup == 0;
  plan.o_proj =
      (!quantized_fp8 || o_aligned) ? OProjMode::kColumnParallel : OProjMode::kGatherReplicated;
  const int64_t shared_inter = c.n_shared_experts * c.moe_intermediate_size;
  for (int r = 0; r < tp_size; ++r) {
    RankShard s;
    s.rank = r;
    s.heads = {r * heads_per_rank, (r + 1) * heads_per_rank};
    s.q_rows = Scaled(s.heads, c.qk_head_dim());
    s.kv_b_rows = Scaled(s.heads, c.qk_nope_head_dim + c.v_head_dim);
    s.o_cols = plan.o_proj == OProjMode::kColumnParallel
                   ? Scaled(s.heads, c.v_head_dim)
                   : Whole(c.num_attention_heads * c.v_head_dim);
    s.mlp_inter = SplitRange(c.intermediate_size, plan.mlp_unit, tp_size, r);
    s.shared_inter = SplitRange(shared_inter, plan.mlp_unit, tp_size, r);
    plan.ranks.push_back(s);
  }
  return plan;
}

std::vector<TensorShard> ShardsOfRank(const Model& model, const TpPlan& plan, int rank) {
  const ModelConfig& c = model.config();
  const RankShard& s = plan.ranks[rank];
  const int64_t D = c.hidden_size;
  std::vector<TensorShard> out;
  auto whole = [&](const std::string& name, int64_t rows, int64_t cols) {
    out.push_back({name, Whole(rows), Whole(cols), true});
  };
  auto part = [&](const Linear& w, Range rows, Range cols) {
    const bool all = rows == Whole(w.out_features) && cols == Whole(w.in_features);
    out.push_back({w.name, rows, cols, all});
  };
  auto mlp = [&](const MlpWeights& m, Range inter) {
    part(m.gate_proj, inter, Whole(D));
    part(m.up_proj, inter, Whole(D));
    part(m.down_proj, Whole(D), inter);
  };
  auto block = [&](const DecoderLayerWeights& w, const std::string& p) {
    const MlaWeights& a = w.self_attn;
    whole(p + "input_layernorm.weight", D, 1);
    whole(p + "post_attention_layernorm.weight", D, 1);
    if (a.q_proj) {
      part(*a.q_proj, s.q_rows, Whole(D));
    } else {
      part(*a.q_a_proj, Whole(c.q_lora_rank), Whole(D));
      whole(p + "self_attn.q_a_layernorm.weight", c.q_lora_rank, 1);
      part(*a.q_b_proj, s.q_rows, Whole(c.q_lora_rank));
    }
    part(a.kv_a_proj_with_mqa, Whole(a.kv_a_proj_with_mqa.out_features), Whole(D));
    whole(p + "self_attn.kv_a_layernorm.weight", c.kv_lora_rank, 1);
    part(a.kv_b_proj, s.kv_b_rows, Whole(c.kv_lora_rank));
    part(a.o_proj, Whole(D), s.o_cols);
    if (w.mlp) mlp(*w.mlp, s.mlp_inter);
    if (w.is_moe) whole(p + "mlp.gate.weight", c.n_routed_experts, D);
    if (w.shared_experts) mlp(*w.shared_experts, s.shared_inter);
  };
  part(model.embed_tokens(), Whole(c.vocab_size), Whole(D));
  for (const DecoderLayerWeights& w : model.layers()) {
    block(w, absl::StrCat("model.layers.", w.layer, "."));
  }
  whole("model.norm.weight", D, 1);
  part(model.lm_head(), Whole(c.vocab_size), Whole(D));
  for (const MtpWeights& m : model.mtp()) {
    const std::string p = absl::StrCat("model.layers.", m.layer, ".");
    whole(p + "enorm.weight", D, 1);
    whole(p + "hnorm.weight", D, 1);
    part(m.eh_proj, Whole(D), Whole(2 * D));
    block(m.block, p);
    whole(p + "shared_head.norm.weight", D, 1);
  }
  return out;
}

absl::StatusOr<Linear> SliceLinear(const Linear& w, Range rows, Range cols) {
  if (rows.begin < 0 || rows.end > w.out_features || rows.empty() || cols.begin < 0 ||
      cols.end > w.in_features || cols.empty()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: slice rows [%d, %d) cols [%d, %d) outside [%d, %d]", w.name,
                        rows.begin, rows.end, cols.begin, cols.end, w.out_features, w.in_features));
  }
  if (w.is_fp8() && (rows.begin % w.block.rows != 0 || cols.begin % w.block.cols != 0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: FP8 slice rows [%d, %d) cols [%d, %d) do not start on %dx%d block boundaries", w.name,
        rows.begin, rows.end, cols.begin, cols.end, w.block.rows, w.block.cols));
  }
  const int64_t es = DTypeSize(w.dtype);
  auto weight = std::make_shared<std::vector<uint8_t>>(rows.size() * cols.size() * es);
  for (int64_t r = 0; r < rows.size(); ++r) {
    std::memcpy(weight->data() + r * cols.size() * es,
                w.weight.data + ((rows.begin + r) * w.in_features + cols.begin) * es,
                cols.size() * es);
  }
  Linear s;
  s.name =
      absl::StrCat(w.name, "[", rows.begin, ":", rows.end, ", ", cols.begin, ":", cols.end, "]");
  s.dtype = w.dtype;
  s.out_features = rows.size();
  s.in_features = cols.size();
  s.block = w.block;
  s.weight.data = weight->data();
  s.weight.size = weight->size();
  s.weight.owner = weight;
  if (w.is_fp8()) {
    const int64_t full_cb = NumBlocks(w.in_features, w.block.cols);
    const int64_t rb0 = rows.begin / w.block.rows, cb0 = cols.begin / w.block.cols;
    const int64_t nrb = NumBlocks(rows.size(), w.block.rows);
    const int64_t ncb = NumBlocks(cols.size(), w.block.cols);
    auto scales = std::make_shared<std::vector<float>>(nrb * ncb);
    for (int64_t rb = 0; rb < nrb; ++rb) {
      std::memcpy(scales->data() + rb * ncb, w.scale_inv.as<float>() + (rb0 + rb) * full_cb + cb0,
                  ncb * sizeof(float));
    }
    s.scale_inv.data = reinterpret_cast<const uint8_t*>(scales->data());
    s.scale_inv.size = scales->size() * sizeof(float);
    s.scale_inv.owner = scales;
  }
  return s;
}

std::vector<float> DequantizeSlice(const Linear& w, Range rows, Range cols) {
  std::vector<float> out(rows.size() * cols.size()), row(w.in_features);
  for (int64_t r = 0; r < rows.size(); ++r) {
    w.DequantizeRow(rows.begin + r, row.data());
    std::copy_n(row.data() + cols.begin, cols.size(), out.data() + r * cols.size());
  }
  return out;
}

}  // namespace expertmesh
