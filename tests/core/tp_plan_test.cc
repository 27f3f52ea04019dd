// The tensor-parallel sharding plan (core/kernels/plan/tp_plan.h): its ranges for DeepSeek-V3 and
// the bundled model, and its arithmetic run on the CPU -- split matrices, partial results summed in
// rank order -- against the unsplit layers. The GPU engine (core/kernels/cuda/cuda_engine.cc)
// follows the same plan; this is the CPU twin of its tensor parallelism.
#include "core/kernels/plan/tp_plan.h"

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "core/engine/kv_cache.h"
#include "core/engine/layers.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/model/model.h"
#include "core/numerics/quant.h"
#include "gtest/gtest.h"

namespace expertmesh {
namespace {

ModelConfig DeepSeekV3Shape() {
  ModelConfig c;
  c.vocab_size = 129280;
  c.hidden_size = 7168;
  c.intermediate_size = 18432;
  c.moe_intermediate_size = 2048;
  c.num_attention_heads = 128;
  c.n_shared_experts = 1;
  c.kv_lora_rank = 512;
  c.q_lora_rank = 1536;
  c.qk_rope_head_dim = 64;
  c.qk_nope_head_dim = 128;
  c.v_head_dim = 128;
  return c;
}

float MaxAbs(const std::vector<float>& v) {
  float m = 0.0f;
  for (float x : v) m = std::max(m, std::abs(x));
  return m;
}
float MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0.0f;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

TEST(TpPlan, DeepSeekV3OverEightGpus) {
  auto plan = PlanTensorParallel(DeepSeekV3Shape(), 8, /*quantized_fp8=*/true);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->o_proj, OProjMode::kColumnParallel);  // 16 heads x 128 = 2048 columns
  EXPECT_EQ(plan->mlp_unit, 128);
  for (int r = 0; r < 8; ++r) {
    const RankShard& s = plan->ranks[r];
    EXPECT_EQ(s.heads, (Range{16 * r, 16 * (r + 1)}));
    EXPECT_EQ(s.q_rows, (Range{16 * r * 192, 16 * (r + 1) * 192}));
    EXPECT_EQ(s.kv_b_rows, (Range{16 * r * 256, 16 * (r + 1) * 256}));
    EXPECT_EQ(s.o_cols, (Range{16 * r * 128, 16 * (r + 1) * 128}));
    EXPECT_EQ(s.mlp_inter, (Range{2304 * r, 2304 * (r + 1)}));  // 144 units of 128 / 8
    EXPECT_EQ(s.shared_inter, (Range{256 * r, 256 * (r + 1)}));
  }
}

TEST(TpPlan, RejectsHeadsNotDivisible) {
  ModelConfig c = DeepSeekV3Shape();
  c.num_attention_heads = 4;
  auto plan = PlanTensorParallel(c, 3, true);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(plan.status().message().find("not divisible"), std::string::npos);
  EXPECT_FALSE(PlanTensorParallel(c, 0, true).ok());
}

TEST(TpPlan, SplitRangeCoversInOrder) {
  // 640 = 5 units of 128 over 2 ranks: 2 + 3 units; 128 over 2 ranks: one rank empty.
  EXPECT_EQ(SplitRange(640, 128, 2, 0), (Range{0, 256}));
  EXPECT_EQ(SplitRange(640, 128, 2, 1), (Range{256, 640}));
  EXPECT_EQ(SplitRange(128, 128, 2, 0), (Range{0, 0}));
  EXPECT_EQ(SplitRange(128, 128, 2, 1), (Range{0, 128}));
  EXPECT_EQ(SplitRange(300, 128, 2, 1), (Range{128, 300}));  // ragged last unit
  for (int tp : {1, 2, 3, 4, 7}) {
    int64_t next = 0;
    for (int r = 0; r < tp; ++r) {
      const Range g = SplitRange(1000, 16, tp, r);
      EXPECT_EQ(g.begin, next);
      next = g.end;
    }
    EXPECT_EQ(next, 1000);
  }
}

// A random FP8 Linear [N, K] with DeepSeek block scales, owning its storage.
Linear RandomFp8Linear(int64_t N, int64_t K, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  std::vector<float> w(N * K);
  for (float& v : w) v = dist(rng);
  const BlockShape block{128, 128};
  auto fp8 = std::make_shared<std::vector<uint8_t>>(N * K);
  auto scales = std::make_shared<std::vector<float>>(NumBlocks(N, 128) * NumBlocks(K, 128));
  QuantizeWeightBlocks(w, N, K, block, *fp8, *scales);
  Linear l;
  l.name = "random";
  l.dtype = DType::kF8E4M3;
  l.out_features = N;
  l.in_features = K;
  l.block = block;
  l.weight.data = fp8->data();
  l.weight.size = fp8->size();
  l.weight.owner = fp8;
  l.scale_inv.data = reinterpret_cast<const uint8_t*>(scales->data());
  l.scale_inv.size = scales->size() * 4;
  l.scale_inv.owner = scales;
  return l;
}

std::vector<float> RandomRows(int64_t n, int64_t dim, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(n * dim);
  for (float& v : x) v = dist(rng);
  return x;
}

std::vector<float> Columns(const std::vector<float>& x, int64_t n, int64_t dim, Range cols) {
  std::vector<float> out(n * cols.size());
  for (int64_t t = 0; t < n; ++t) {
    std::copy_n(x.data() + t * dim + cols.begin, cols.size(), out.data() + t * cols.size());
  }
  return out;
}

TEST(TpPlanMath, RowSplitIsBitwiseAndAlignedColumnSplitSumsToWhole) {
  const int64_t N = 256, K = 640, n = 5;
  const Linear w = RandomFp8Linear(N, K, 7);
  const std::vector<float> x = RandomRows(n, K, 8);
  std::vector<float> full(n * N);
  w.Forward(x.data(), n, full.data(), /*quantize_activations=*/true);

  // Row split (as q_b_proj / gate_proj): each row is computed alone, so bitwise equal.
  for (int tp : {2, 3}) {
    std::vector<float> joined(n * N, 0.0f);
    for (int r = 0; r < tp; ++r) {
      const Range rows = SplitRange(N, 128, tp, r);
      if (rows.empty()) continue;
      auto part = SliceLinear(w, rows, {0, K});
      ASSERT_TRUE(part.ok()) << part.status();
      std::vector<float> y(n * rows.size());
      part->Forward(x.data(), n, y.data(), true);
      for (int64_t t = 0; t < n; ++t) {
        std::copy_n(y.data() + t * rows.size(), rows.size(), joined.data() + t * N + rows.begin);
      }
    }
    EXPECT_EQ(joined, full) << "tp " << tp;
  }
  // FP8 slices keep whole scale blocks: a part starting inside a block is refused (the GPU
  // engine runs such parts dequantized).
  EXPECT_FALSE(SliceLinear(w, {96, 192}, {0, K}).ok());
  EXPECT_FALSE(SliceLinear(w, {0, N}, {64, K}).ok());
  // DequantizeSlice of any rows equals the dequantized rows.
  const std::vector<float> d = DequantizeSlice(w, {96, 192}, {0, K});
  std::vector<float> row(K);
  w.DequantizeRow(150, row.data());
  for (int64_t c = 0; c < K; ++c) EXPECT_EQ(d[(150 - 96) * K + c], row[c]);

  // Column split in 128-channel units (as down_proj / o_proj): local quantization groups equal
  // the global ones, so only the summation order changes. Tolerance: float32 reassociation of
  // 640-term sums, well under 1e-6 of max|y| (the bundled-model tests below measure 1.5e-7).
  for (int tp : {2, 3, 5}) {
    std::vector<float> sum(n * N, 0.0f);
    for (int r = 0; r < tp; ++r) {
      const Range cols = SplitRange(K, 128, tp, r);
      if (cols.empty()) continue;
      auto part = SliceLinear(w, {0, N}, cols);
      ASSERT_TRUE(part.ok()) << part.status();
      const std::vector<float> xs = Columns(x, n, K, cols);
      std::vector<float> y(n * N);
      part->Forward(xs.data(), n, y.data(), true);
      for (size_t i = 0; i < y.size(); ++i) sum[i] += y[i];
    }
    EXPECT_LE(MaxAbsDiff(sum, full), 1e-5f * MaxAbs(full)) << "tp " << tp;
  }
}

struct TinyModel {
  std::unique_ptr<Checkpoint> ckpt;
  ModelConfig config;
  std::unique_ptr<Model> model;
};

TinyModel LoadTiny(const std::string& name) {
  TinyModel m;
  const std::string dir = std::string(EXPERTMESH_SOURCE_DIR) + "/models/" + name;
  auto ckpt = Checkpoint::Open(dir);
  EXPECT_TRUE(ckpt.ok()) << ckpt.status();
  m.ckpt = *std::move(ckpt);
  auto config = LoadModelConfig(dir + "/config.json");
  EXPECT_TRUE(config.ok()) << config.status();
  m.config = *config;
  ModelLoadOptions lo;
  lo.load_mtp = false;
  auto model = Model::Create(*m.ckpt, m.config, lo);
  EXPECT_TRUE(model.ok()) << model.status();
  m.model = *std::move(model);
  return m;
}

// A rank's MLP: sliced gate/up rows and down columns; an empty range contributes nothing.
std::optional<MlpWeights> SliceMlp(const MlpWeights& m, Range inter, int64_t D) {
  if (inter.empty()) return std::nullopt;
  MlpWeights s{*SliceLinear(m.gate_proj, inter, {0, D}), *SliceLinear(m.up_proj, inter, {0, D}),
               *SliceLinear(m.down_proj, {0, D}, inter)};
  return s;
}

// A rank's part of W: SliceLinear where the slice keeps whole FP8 blocks (or W is not FP8), else
// the dequantized rows as an F32 Linear -- the same numbers whenever activations are not
// quantized, which is the only case the tests below use it in.
Linear DequantizedOrSliced(const Linear& w, Range rows, Range cols) {
  absl::StatusOr<Linear> s = SliceLinear(w, rows, cols);
  if (s.ok()) return *std::move(s);
  auto data = std::make_shared<std::vector<float>>(DequantizeSlice(w, rows, cols));
  Linear l;
  l.name = w.name + " (dequantized part)";
  l.dtype = DType::kF32;
  l.out_features = rows.size();
  l.in_features = cols.size();
  l.block = w.block;
  l.weight.data = reinterpret_cast<const uint8_t*>(data->data());
  l.weight.size = data->size() * sizeof(float);
  l.weight.owner = data;
  return l;
}

class TpPlanModelTest : public ::testing::TestWithParam<std::string> {};

// Dense MLP and shared expert of the bundled model: partial sums over ranks equal the whole
// layer. Both sides run on sliced copies (the whole one is the TP 1 plan's single part), so they
// use the same CPU kernels: what is compared is the plan's arithmetic alone. Tolerance:
// reassociation only; measured at most 1.5e-7 of max|y|, 1e-5 allowed.
TEST_P(TpPlanModelTest, MlpPartialsSumToWhole) {
  TinyModel m = LoadTiny(GetParam());
  const ModelConfig& c = m.config;
  const int64_t D = c.hidden_size, n = 6;
  const std::vector<float> x = RandomRows(n, D, 11);
  const bool fp8 = m.model->layers()[0].mlp->gate_proj.is_fp8();
  auto whole_plan = PlanTensorParallel(c, 1, fp8);
  ASSERT_TRUE(whole_plan.ok()) << whole_plan.status();
  for (int tp : {2, 4}) {
    auto plan = PlanTensorParallel(c, tp, fp8);
    ASSERT_TRUE(plan.ok()) << plan.status();
    for (const DecoderLayerWeights& layer : m.model->layers()) {
      const MlpWeights& w = layer.mlp ? *layer.mlp : *layer.shared_experts;
      auto inter = [&](const RankShard& s) { return layer.mlp ? s.mlp_inter : s.shared_inter; };
      std::vector<float> full(n * D), sum(n * D, 0.0f), part(n * D);
      MlpForward(*SliceMlp(w, inter(whole_plan->ranks[0]), D), x.data(), n, full.data(), true);
      for (const RankShard& s : plan->ranks) {
        auto sliced = SliceMlp(w, inter(s), D);
        if (!sliced) continue;
        MlpForward(*sliced, x.data(), n, part.data(), true);
        for (int64_t i = 0; i < n * D; ++i) sum[i] += part[i];
      }
      EXPECT_LE(MaxAbsDiff(sum, full), 1e-5f * MaxAbs(full))
          << GetParam() << " layer " << layer.layer << " tp " << tp;
    }
  }
}

// Attention split by heads with column-parallel o_proj: every rank computes the whole latent
// cache and its heads' queries; o_proj partials summed equal MlaForward of all heads.
// Tolerance: reassociation of the o_proj sum only; measured at most 1.1e-7 of max|y|, 1e-5
// allowed.
TEST_P(TpPlanModelTest, AttentionHeadPartialsSumToWhole) {
  TinyModel m = LoadTiny(GetParam());
  const ModelConfig& c = m.config;
  const int64_t D = c.hidden_size, n = 5;
  const Rope rope(c);
  const std::vector<float> x = RandomRows(n, D, 12);
  const MlaWeights& w = m.model->layers()[1].self_attn;
  // One rank's attention output (its heads, its o_proj columns), on sliced copies.
  auto rank_forward = [&](const RankShard& s, const LayerOptions& opt, float* out) {
    ModelConfig rc = c;
    rc.num_attention_heads = s.heads.size();
    MlaWeights rw;
    rw.q_a_proj = w.q_a_proj;
    rw.q_a_layernorm = w.q_a_layernorm;
    rw.q_b_proj = DequantizedOrSliced(*w.q_b_proj, s.q_rows, {0, c.q_lora_rank});
    rw.kv_a_proj_with_mqa = w.kv_a_proj_with_mqa;
    rw.kv_a_layernorm = w.kv_a_layernorm;
    rw.kv_b_proj = DequantizedOrSliced(w.kv_b_proj, s.kv_b_rows, {0, c.kv_lora_rank});
    rw.o_proj = DequantizedOrSliced(w.o_proj, {0, D}, s.o_cols);
    auto cache = ContiguousKvCache::Create(1, c.kv_lora_rank, c.qk_rope_head_dim);
    ASSERT_TRUE((*cache)->Extend(n).ok());
    MlaForward(rc, rw, rope, 0, **cache, 0, x.data(), n, out, opt);
  };
  // FP8 with quantized activations switches to gather mode at tp 2 (64-column head groups);
  // float activations keep o_proj column-parallel, which is what this test exercises.
  for (bool quant : {false, true}) {
    const LayerOptions opt{quant, AttentionForm::kAbsorbed};
    const bool q8 = quant && w.o_proj.is_fp8();
    auto whole_plan = PlanTensorParallel(c, 1, q8);
    ASSERT_TRUE(whole_plan.ok()) << whole_plan.status();
    std::vector<float> full(n * D);
    rank_forward(whole_plan->ranks[0], opt, full.data());
    for (int tp : {2, 4}) {
      auto plan = PlanTensorParallel(c, tp, q8);
      ASSERT_TRUE(plan.ok()) << plan.status();
      if (plan->o_proj != OProjMode::kColumnParallel) continue;
      std::vector<float> sum(n * D, 0.0f), part(n * D);
      for (const RankShard& s : plan->ranks) {
        rank_forward(s, opt, part.data());
        for (int64_t i = 0; i < n * D; ++i) sum[i] += part[i];
      }
      EXPECT_LE(MaxAbsDiff(sum, full), 1e-5f * MaxAbs(full))
          << GetParam() << " tp " << tp << " quant " << quant;
    }
    // The TP 1 path on sliced copies is the layer itself, up to the CPU kernels' choice (packed
    // tiles for the model's weights, rows for copies): measured 1.9e-7 of max|y| with these
    // seeds; one o_proj input quantized one FP8 step apart would move it by up to ~1e-2.
    auto cache = ContiguousKvCache::Create(1, c.kv_lora_rank, c.qk_rope_head_dim);
    ASSERT_TRUE((*cache)->Extend(n).ok());
    std::vector<float> layer(n * D);
    MlaForward(c, w, rope, 0, **cache, 0, x.data(), n, layer.data(), opt);
    EXPECT_LE(MaxAbsDiff(full, layer), 1e-2f * MaxAbs(layer)) << GetParam() << " quant " << quant;
  }
}

TEST_P(TpPlanModelTest, ShardsOfRankPartitionEverySplitTensor) {
  TinyModel m = LoadTiny(GetParam());
  auto plan = PlanTensorParallel(m.config, 2, false);
  ASSERT_TRUE(plan.ok());
  std::vector<TensorShard> r0 = ShardsOfRank(*m.model, *plan, 0);
  std::vector<TensorShard> r1 = ShardsOfRank(*m.model, *plan, 1);
  ASSERT_EQ(r0.size(), r1.size());
  int split = 0;
  for (size_t i = 0; i < r0.size(); ++i) {
    ASSERT_EQ(r0[i].name, r1[i].name);
    if (r0[i].replicated) {
      EXPECT_TRUE(r1[i].replicated) << r0[i].name;
      continue;
    }
    ++split;
    // Split along exactly one dimension, rank 0's part first, then rank 1's.
    if (r0[i].rows == r1[i].rows) {
      EXPECT_EQ(r0[i].cols.end, r1[i].cols.begin) << r0[i].name;
    } else {
      EXPECT_EQ(r0[i].cols, r1[i].cols) << r0[i].name;
      EXPECT_EQ(r0[i].rows.end, r1[i].rows.begin) << r0[i].name;
    }
  }
  // Per layer: q_b, kv_b, o_proj and three MLP (or shared expert) projections.
  EXPECT_EQ(split, 6 * m.config.num_hidden_layers);
}

INSTANTIATE_TEST_SUITE_P(Bundled, TpPlanModelTest,
                         ::testing::Values("expertmesh-tiny", "expertmesh-tiny-bf16"));

}  // namespace
}  // namespace expertmesh
