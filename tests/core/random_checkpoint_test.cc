// expertmesh-make-checkpoint's library: DeepSeek-V3's layout (FP8 exactly where the released
// checkpoint has a weight_scale_inv, BF16 / F32 elsewhere, MTP layer, >= 2 shards), loadable by
// the engine, and deterministic per seed.
#include "tools/make-checkpoint/random_checkpoint.h"

#include <filesystem>
#include <string>

#include "core/base/file.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "gtest/gtest.h"
#include "tests/core/engine_test_util.h"

namespace expertmesh::testing {
namespace {

// The file's bytes; a failed read fails the test (and compares as "").
std::string ReadOk(const std::string& path) {
  absl::StatusOr<std::string> bytes = base::ReadFile(path);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return bytes.ok() ? *std::move(bytes) : std::string();
}

bool EndsWith(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

class RandomCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ =
        std::filesystem::path(::testing::TempDir()) / ("random_ckpt_" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir_);
    absl::StatusOr<std::string> config_text =
        base::ReadFile(EngineDataDir("engine-mtp") + "/config.json");
    ASSERT_TRUE(config_text.ok()) << config_text.status();
    config_text_ = *std::move(config_text);
    auto config = ParseModelConfig(config_text_);
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = *config;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
  std::string config_text_;
  ModelConfig config_;
};

TEST_F(RandomCheckpointTest, HasDeepSeekV3Layout) {
  ASSERT_TRUE(WriteRandomCheckpoint(config_, config_text_, dir_ / "a", 5).ok());
  EXPECT_EQ(ReadOk((dir_ / "a/config.json").string()), config_text_);
  EXPECT_TRUE(std::filesystem::exists(dir_ / "a/model-00001-of-00002.safetensors"));
  auto ckpt = Checkpoint::Open((dir_ / "a").string());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  int fp8 = 0;
  for (const std::string& name : (*ckpt)->TensorNames()) {
    const TensorInfo* info = (*ckpt)->Info(name);
    // *_proj.weight and kv_a_proj_with_mqa.weight, not the MTP's BF16 eh_proj.
    const bool is_proj = EndsWith(name, ".weight") && name.find("_proj") != std::string::npos &&
                         name.find("eh_proj") == std::string::npos;
    if (EndsWith(name, "_scale_inv")) {
      EXPECT_EQ(info->dtype, DType::kF32) << name;
    } else if (is_proj) {  // attention, dense MLP, shared and routed experts
      EXPECT_EQ(info->dtype, DType::kF8E4M3) << name;
      EXPECT_TRUE((*ckpt)->Has(name + "_scale_inv")) << name;
      ++fp8;
    } else if (EndsWith(name, "e_score_correction_bias")) {
      EXPECT_EQ(info->dtype, DType::kF32) << name;
    } else {  // embeddings, norms, gate, lm_head, eh_proj, shared_head
      EXPECT_EQ(info->dtype, DType::kBF16) << name;
      EXPECT_FALSE((*ckpt)->Has(name + "_scale_inv")) << name;
    }
  }
  // Per main/MTP layer: q_proj, kv_a, kv_b, o (4) x 3 layers; dense MLP 3; MoE layers 1 and 2:
  // 6 routed + 1 shared experts x 3 projections each.
  EXPECT_EQ(fp8, 4 * 3 + 3 + 2 * 7 * 3);
  for (const char* name :
       {"model.layers.2.enorm.weight", "model.layers.2.hnorm.weight",
        "model.layers.2.eh_proj.weight", "model.layers.2.shared_head.norm.weight",
        "model.layers.2.shared_head.head.weight", "model.layers.2.embed_tokens.weight",
        "model.layers.2.mlp.experts.5.down_proj.weight"}) {
    EXPECT_TRUE((*ckpt)->Has(name)) << name;
  }
  // The engine loads it, MTP included.
  auto model = Model::Create(**ckpt, config_);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->mtp().size(), 1u);
}

TEST_F(RandomCheckpointTest, IsDeterministicPerSeed) {
  ASSERT_TRUE(WriteRandomCheckpoint(config_, config_text_, dir_ / "a", 9).ok());
  ASSERT_TRUE(WriteRandomCheckpoint(config_, config_text_, dir_ / "b", 9).ok());
  ASSERT_TRUE(WriteRandomCheckpoint(config_, config_text_, dir_ / "c", 10).ok());
  const std::string shard = "model-00001-of-00002.safetensors";
  const std::string a = ReadOk((dir_ / "a" / shard).string());
  ASSERT_FALSE(a.empty());
  EXPECT_EQ(a, ReadOk((dir_ / "b" / shard).string()));
  EXPECT_NE(a, ReadOk((dir_ / "c" / shard).string()));
}

}  // namespace
}  // namespace expertmesh::testing
