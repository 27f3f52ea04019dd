// The planner (planner/): memory per card equals the experts it holds, too-small pools are
// refused naming the shortfall, the written placement loads and covers every expert, and the
// cost model moves the right way (FP8 flag, more cards, a 1 GbE link).
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/format/config.h"
#include "gtest/gtest.h"
#include "placement/placement.h"
#include "planner/planner.h"
#include "planner/pool.h"
#include "planner/to_placement.h"

namespace expertmesh::planner {
namespace {

constexpr double kGib = 1024.0 * 1024.0 * 1024.0;

ModelConfig DeepSeekV3() {
  auto c = LoadModelConfig(std::string(EXPERTMESH_SOURCE_DIR) +
                           "/tests/data/reference/deepseek-v3/config.json");
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

ModelConfig Tiny() {
  auto c =
      LoadModelConfig(std::string(EXPERTMESH_SOURCE_DIR) + "/models/expertmesh-tiny/config.json");
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

// One node of `count` cards of `kind` (extra: JSON fields for the card entry).
// The attention node: a large CPU whose kernel reads its weights once per step at any batch
// (rows_per_pass 0), so that the expert cards decide what these tests compare.
Pool OneKind(const std::string& kind, int count, double link_gbps = 100,
             const std::string& extra = "", const std::string& batches = "[1, 32]") {
  const std::string json = absl::StrCat(
      R"({"nodes": [{"name": "n", "link_gbps": )", link_gbps,
      R"(, "latency_us": 10, "cards": [{"kind": ")", kind, R"(", "count": )", count, extra,
      R"(}]}], "attention": {"kind": "cpu", "memory_gib": 512, "bandwidth_gbs": 400, "gflops": 4000, "rows_per_pass": 0, "link_gbps": 400, "latency_us": 5}, "batch": )",
      batches, "}");
  auto pool = ParsePool(json);
  EXPECT_TRUE(pool.ok()) << pool.status() << "\n" << json;
  return *pool;
}

TEST(PlannerSizes, DeepSeekV3ExpertBytes) {
  const ModelSizes s = SizesOf(DeepSeekV3());
  // gate and up [2048, 7168], down [7168, 2048], FP8 + one float per 128x128 block.
  const int64_t blocks = (2048 / 128) * (7168 / 128);
  EXPECT_EQ(s.expert_bytes, 3 * (int64_t{2048} * 7168 + blocks * 4));
  EXPECT_EQ(s.moe_layers.size(), 59u);  // layers 3..60 and the MTP layer 61
  EXPECT_EQ(s.decode_moe_layers, 58);
  EXPECT_EQ(s.wire_out_bytes_per_row, 7168 + 56 * 4);
  EXPECT_EQ(s.wire_back_bytes_per_row, 7168 * 2);
}

TEST(Planner, MemoryPerCardSumsItsExperts) {
  const ModelConfig config = DeepSeekV3();
  auto pool =
      LoadPool(std::string(EXPERTMESH_SOURCE_DIR) + "/planner/examples/mixed-3090-4090-5090.json");
  ASSERT_TRUE(pool.ok()) << pool.status();
  auto plan = MakePlan(config, *pool);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const int64_t eb = plan->sizes.expert_bytes;
  size_t copies = 0;
  for (size_t c = 0; c < plan->cards.size(); ++c) {
    const CardPlan& card = plan->cards[c];
    EXPECT_DOUBLE_EQ(card.expert_gib, card.experts.size() * static_cast<double>(eb) / kGib);
    EXPECT_DOUBLE_EQ(card.used_gib, card.expert_gib + pool->cards[c].kind.overhead_gib);
    EXPECT_LE(card.used_gib, pool->cards[c].kind.memory_gib) << "card " << c;
    copies += card.experts.size();
  }
  EXPECT_EQ(copies, 59u * 256u + plan->redundant_copies);
  // Faster cards hold more of each layer (5090: 1792 GB/s against a 3090's 936).
  EXPECT_GT(plan->cards.back().experts.size(), plan->cards.front().experts.size());
}

TEST(Planner, TooSmallPoolIsRefusedNamingTheShortfall) {
  const ModelConfig config = DeepSeekV3();
  auto plan = MakePlan(config, OneKind("rtx4090", 4));
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string msg(plan.status().message());
  EXPECT_NE(msg.find("too small"), std::string::npos) << msg;
  EXPECT_NE(msg.find("short by"), std::string::npos) << msg;
  EXPECT_NE(msg.find("more rtx4090"), std::string::npos) << msg;
  // 59 x 256 experts of 42 MiB = ~620 GiB against 4 x 23 GiB: short by more than 500 GiB.
  EXPECT_NE(msg.find("short by 5"), std::string::npos) << msg;

  // An attention node too small for the non-expert weights is refused too.
  auto pool =
      ParsePool(R"({"nodes": [{"link_gbps": 25, "cards": [{"kind": "rtx5090", "count": 40}]}],
      "attention": {"kind": "rtx3090", "link_gbps": 25}, "batch": [1, 64]})");
  ASSERT_TRUE(pool.ok()) << pool.status();
  auto small_att = MakePlan(config, *pool);
  ASSERT_FALSE(small_att.ok());
  EXPECT_NE(std::string(small_att.status().message()).find("attention node"), std::string::npos)
      << small_att.status();
}

TEST(Planner, BadPoolsAreRefusedClearly) {
  EXPECT_NE(std::string(ParsePool("{}").status().message()).find("pool.nodes"), std::string::npos);
  auto unknown = ParsePool(R"({"nodes": [{"link_gbps": 1, "cards": [{"kind": "rtx9999"}]}],
      "attention": {"kind": "rtx5090", "link_gbps": 1}})");
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(std::string(unknown.status().message()).find("rtx9999"), std::string::npos);
  auto cpu = ParsePool(R"({"nodes": [{"link_gbps": 1, "cards": [{"kind": "cpu"}]}],
      "attention": {"kind": "rtx5090", "link_gbps": 1}})");
  ASSERT_FALSE(cpu.ok());
  EXPECT_NE(std::string(cpu.status().message()).find("memory_gib"), std::string::npos);
  auto nolink = ParsePool(R"({"nodes": [{"cards": [{"kind": "rtx3090"}]}],
      "attention": {"kind": "rtx5090", "link_gbps": 1}})");
  EXPECT_NE(std::string(nolink.status().message()).find("link_gbps"), std::string::npos);
}

// Writes the plan's placement as `expertmesh plan --placement-out` does, loads it as the router
// does, and checks it covers every MoE expert with exactly the plan's copies.
void CheckWrittenPlacement(const Plan& plan) {
  auto placement = ToPlacement(plan);
  ASSERT_TRUE(placement.ok()) << placement.status();
  const std::string path =
      (std::filesystem::temp_directory_path() / absl::StrCat("planner_test_", getpid(), ".json"))
          .string();
  {
    std::ofstream out(path);
    out << PlacementToJson(*placement);
  }
  auto loaded = LoadPlacementFile(path, plan.config);
  std::filesystem::remove(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->num_shards, static_cast<int32_t>(plan.pool.cards.size()));
  const int E = static_cast<int>(plan.config.n_routed_experts);
  for (int l : plan.sizes.moe_layers) {
    for (int e = 0; e < E; ++e) {
      auto shards = loaded->ShardsOf(l, e);
      ASSERT_FALSE(shards.empty()) << "layer " << l << " expert " << e;
      EXPECT_EQ(std::vector<int>(shards.begin(), shards.end()),
                plan.copies[static_cast<size_t>(l) * E + e]);
    }
  }
  for (size_t c = 0; c < plan.cards.size(); ++c) {
    EXPECT_EQ(loaded->ExpertsOf(static_cast<int32_t>(c)).size(), plan.cards[c].experts.size());
  }
}

TEST(Planner, WrittenPlacementLoadsAndCoversEveryExpert) {
  auto tiny = MakePlan(
      Tiny(), *LoadPool(std::string(EXPERTMESH_SOURCE_DIR) + "/planner/examples/local-cpu.json"));
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  CheckWrittenPlacement(*tiny);
  auto deepseek = MakePlan(DeepSeekV3(), *LoadPool(std::string(EXPERTMESH_SOURCE_DIR) +
                                                   "/planner/examples/mixed-3090-4090-5090.json"));
  ASSERT_TRUE(deepseek.ok()) << deepseek.status();
  CheckWrittenPlacement(*deepseek);
  // More cards than a layer has experts: each card holds experts of some layers only.
  auto many = MakePlan(Tiny(), OneKind("rtx4090", 20));
  ASSERT_TRUE(many.ok()) << many.status();
  CheckWrittenPlacement(*many);
}

TEST(Planner, A3090IsSlowerPerByteThanA4090AndTheFp8FlagMatters) {
  const ModelConfig config = DeepSeekV3();
  auto p3090 = MakePlan(config, OneKind("rtx3090", 32));
  auto p4090 = MakePlan(config, OneKind("rtx4090", 32));
  ASSERT_TRUE(p3090.ok() && p4090.ok());
  // Same placement shape, same link: only the cards differ.
  for (int b : {1, 32}) {
    const Prediction a = Predict(*p3090, b), c = Predict(*p4090, b);
    EXPECT_GT(a.expert_ms, c.expert_ms * 1.3) << "batch " << b;
    EXPECT_LT(a.tokens_per_s, c.tokens_per_s) << "batch " << b;
  }
  // Equal bandwidth, only the FP8 flag differs: widening costs time per byte.
  auto widened = MakePlan(config, OneKind("rtx4090", 32, 100, R"(, "fp8": false)"));
  ASSERT_TRUE(widened.ok()) << widened.status();
  EXPECT_LT(widened->pool.cards[0].kind.efficiency, p4090->pool.cards[0].kind.efficiency);
  EXPECT_GT(Predict(*widened, 1).expert_ms, Predict(*p4090, 1).expert_ms * 1.2);
  EXPECT_FALSE(p3090->pool.cards[0].kind.fp8);
  EXPECT_TRUE(p4090->pool.cards[0].kind.fp8);
}

TEST(Planner, MoreCardsAreNotSlower) {
  const ModelConfig config = DeepSeekV3();
  double last1 = 0, last32 = 0;
  for (int n : {28, 32, 48, 64}) {
    auto plan = MakePlan(config, OneKind("rtx4090", n));
    ASSERT_TRUE(plan.ok()) << n << ": " << plan.status();
    const double t1 = Predict(*plan, 1).tokens_per_s, t32 = Predict(*plan, 32).tokens_per_s;
    EXPECT_GE(t1, last1 * 0.999) << n << " cards";
    EXPECT_GE(t32, last32 * 0.999) << n << " cards";
    last1 = t1;
    last32 = t32;
  }
  // Larger batches give more tokens per second (experts are read once per step).
  auto plan = MakePlan(config, OneKind("rtx4090", 32));
  EXPECT_GT(Predict(*plan, 32).tokens_per_s, Predict(*plan, 1).tokens_per_s * 4);
}

// A CPU card's kernel takes rows_per_pass rows per pass over an expert's weights: at batch 1
// the setting changes nothing, at batch 64 (2 rows per expert on average, up to ~8) a pass per
// 2 rows costs more than a pass per 6, which costs more than one pass for any rows.
TEST(Planner, CpuRowsPerPassChargesAPassPerGroupOfRows) {
  const ModelConfig config = DeepSeekV3();
  auto cpu_pool = [](int rows_per_pass) {
    return absl::StrCat(
        R"({"nodes": [{"name": "n", "link_gbps": 100, "cards": [{"kind": "cpu", "count": 40, )",
        R"("memory_gib": 24, "bandwidth_gbs": 100, "gflops": 200, "rows_per_pass": )",
        rows_per_pass, R"(}]}], "attention": {"kind": "rtx5090", "link_gbps": 100}, )",
        R"("batch": [1, 64]})");
  };
  double t1[3], t64[3];
  int i = 0;
  for (int rows_per_pass : {2, 6, 0}) {
    auto pool = ParsePool(cpu_pool(rows_per_pass));
    ASSERT_TRUE(pool.ok()) << pool.status();
    EXPECT_EQ(pool->cards[0].kind.rows_per_pass, rows_per_pass);
    auto plan = MakePlan(config, *pool, {.redundant_copies = false});
    ASSERT_TRUE(plan.ok()) << plan.status();
    t1[i] = Predict(*plan, 1).expert_ms;
    t64[i] = Predict(*plan, 64).expert_ms;
    ++i;
  }
  EXPECT_NEAR(t1[0], t1[2], 1e-9 * t1[2]);
  EXPECT_NEAR(t1[1], t1[2], 1e-9 * t1[2]);
  EXPECT_GT(t64[0], t64[1] * 1.05);
  EXPECT_GT(t64[1], t64[2] * 1.001);
  // The "cpu" kind defaults to the AVX-512 kernel's 6 rows.
  EXPECT_EQ(KnownKind("cpu")->rows_per_pass, 6);
  EXPECT_EQ(KnownKind("rtx4090")->rows_per_pass, 0);
  for (const char* bad : {"-1", "2.5", "5000", "\"six\""}) {
    auto pool = ParsePool(absl::StrCat(
        R"({"nodes": [{"link_gbps": 1, "cards": [{"kind": "rtx4090", "rows_per_pass": )", bad,
        R"(}]}], "attention": {"kind": "rtx5090", "link_gbps": 1}})"));
    ASSERT_FALSE(pool.ok()) << bad;
    EXPECT_NE(std::string(pool.status().message()).find("rows_per_pass"), std::string::npos)
        << pool.status();
  }
}

// A CPU attention node splits a step into micro-batches as attention-service does (2 of at
// least 4 rows by default): each reads the attention weights and dispatches every MoE layer on
// its own. Below 2 x min rows a step is not split; a GPU attention node never splits.
TEST(Planner, CpuAttentionMicroBatchesReadTheWeightsPerMicroBatch) {
  const ModelConfig config = DeepSeekV3();
  auto pool_json = [](const std::string& attention, int micro_batches) {
    return absl::StrCat(
        R"({"nodes": [{"name": "n", "link_gbps": 100, "cards": [{"kind": "rtx4090", "count": 32}]}], )",
        R"("attention": )", attention, R"(, "batch": [1, 4, 16], "micro_batches": )", micro_batches,
        "}");
  };
  const std::string cpu_attention =
      R"({"kind": "cpu", "memory_gib": 512, "bandwidth_gbs": 400, "gflops": 4000, "link_gbps": 100})";
  const std::string gpu_attention = R"({"kind": "rtx5090", "link_gbps": 100})";
  auto predict = [&](const std::string& attention, int micro_batches, int batch) {
    auto pool = ParsePool(pool_json(attention, micro_batches));
    EXPECT_TRUE(pool.ok()) << pool.status();
    EXPECT_EQ(pool->micro_batches, micro_batches);
    auto plan = MakePlan(config, *pool, {.redundant_copies = false});
    EXPECT_TRUE(plan.ok()) << plan.status();
    return Predict(*plan, batch);
  };
  // Batch 16 in 2 micro-batches of 8: 2 x ceil(8 / 6) = 4 passes over the attention weights
  // against ceil(16 / 6) = 3 unsplit, and twice the dispatches.
  const Prediction split = predict(cpu_attention, 2, 16), whole = predict(cpu_attention, 1, 16);
  EXPECT_GT(split.attention_ms, whole.attention_ms * 1.2);
  EXPECT_GT(split.dispatch_ms, whole.dispatch_ms * 1.3);  // 2 x (170 + 8 x 17) us vs 170 + 16 x 17
  // Batch 4 < 2 x 4 rows: not split.
  EXPECT_DOUBLE_EQ(predict(cpu_attention, 2, 4).step_ms, predict(cpu_attention, 1, 4).step_ms);
  EXPECT_DOUBLE_EQ(predict(gpu_attention, 2, 16).step_ms, predict(gpu_attention, 1, 16).step_ms);
  for (const char* bad : {"0", "9", "1.5"}) {
    auto pool = ParsePool(absl::StrCat(
        R"({"nodes": [{"link_gbps": 1, "cards": [{"kind": "rtx4090"}]}], "attention": {"kind": "rtx5090", "link_gbps": 1}, "micro_batches": )",
        bad, "}"));
    ASSERT_FALSE(pool.ok()) << bad;
    EXPECT_NE(std::string(pool.status().message()).find("micro_batches"), std::string::npos)
        << pool.status();
  }
}

TEST(Planner, OneGbeLinkIsTheBottleneckAtLargeBatch) {
  const ModelConfig config = DeepSeekV3();
  auto slow = MakePlan(config, OneKind("rtx4090", 32, /*link_gbps=*/1, "", "[1, 256]"));
  ASSERT_TRUE(slow.ok()) << slow.status();
  const Prediction big = Predict(*slow, 256);
  EXPECT_EQ(big.bottleneck, Bottleneck::kLink) << big.bottleneck_detail;
  EXPECT_NE(big.bottleneck_detail.find("1 Gbit/s"), std::string::npos) << big.bottleneck_detail;
  // A 100 Gbit/s link moves the bottleneck elsewhere and is faster.
  auto fast = MakePlan(config, OneKind("rtx4090", 32, 100, "", "[1, 256]"));
  const Prediction big_fast = Predict(*fast, 256);
  EXPECT_NE(big_fast.bottleneck, Bottleneck::kLink);
  EXPECT_GT(big_fast.tokens_per_s, big.tokens_per_s);
}

TEST(Planner, HotExpertsGetCopiesWhenLoadIsSkewed) {
  const ModelConfig config = DeepSeekV3();
  // Two nodes of 16 x 4090 on 10 Gbit/s links; experts 0-3 of every MoE layer take 200x the
  // tokens of each other expert (the JSON a router's GetStatus gives, tokens as strings).
  auto pool = ParsePool(R"({"nodes": [
      {"name": "a", "link_gbps": 10, "latency_us": 10, "cards": [{"kind": "rtx4090", "count": 16}]},
      {"name": "b", "link_gbps": 10, "latency_us": 10, "cards": [{"kind": "rtx4090", "count": 16}]}],
      "attention": {"kind": "rtx5090", "link_gbps": 100, "latency_us": 5}, "batch": [1, 32]})");
  ASSERT_TRUE(pool.ok()) << pool.status();
  std::string json = R"({"expertLoad": [)";
  bool first = true;
  for (int l : SizesOf(config).moe_layers) {
    for (int e = 0; e < config.n_routed_experts; ++e) {
      absl::StrAppend(&json, first ? "" : ",", R"({"layer": )", l, R"(, "expert": )", e,
                      R"(, "tokens": ")", e < 4 ? 20000 : 100, R"("})");
      first = false;
    }
  }
  json += "]}";
  auto load = ParseLoadProfile(json, config);
  ASSERT_TRUE(load.ok()) << load.status();
  PlanOptions options;
  options.load = &*load;
  auto skewed = MakePlan(config, *pool, options);
  ASSERT_TRUE(skewed.ok()) << skewed.status();
  const int E = static_cast<int>(config.n_routed_experts);
  EXPECT_GT(skewed->redundant_copies, 0);
  EXPECT_GE(skewed->copies[static_cast<size_t>(3) * E + 0].size(), 2u);
  for (size_t c = 0; c < skewed->cards.size(); ++c) {
    EXPECT_LE(skewed->cards[c].used_gib, pool->cards[c].kind.memory_gib);
  }
  options.redundant_copies = false;
  auto single = MakePlan(config, *pool, options);
  ASSERT_TRUE(single.ok());
  EXPECT_EQ(single->redundant_copies, 0);
  EXPECT_LT(Predict(*skewed, 32).step_ms, Predict(*single, 32).step_ms);
  // Experts with copies are written as arrays and load back the same.
  CheckWrittenPlacement(*skewed);
  // Uniform routing: a copy is read as well and rarely pays.
  auto uniform = MakePlan(config, *pool);
  ASSERT_TRUE(uniform.ok());
  EXPECT_LT(uniform->redundant_copies, skewed->redundant_copies);
  // A bad profile names the entry: layer 0 is dense.
  auto bad =
      ParseLoadProfile(R"({"expert_load": [{"layer": 0, "expert": 0, "tokens": 1}]})", config);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("expert_load[0]"), std::string::npos);
}

}  // namespace
}  // namespace expertmesh::planner
