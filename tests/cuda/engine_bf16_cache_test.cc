// The error budget of the GPU engine's BF16 latent cache, measured on the CPU: the reference
// engine run with its float cache rounded to BF16 after every forward (as the GPU engine stores
// it; here a token's own row is read unrounded within its forward) against the float cache, on
// the bundled models, prefill + 8 greedy decode steps. What it measures sets the GPU engine
// test's tolerances (tests/cuda/cuda_engine_gpu_test.cc: about three times these bounds).
// Measured on the bundled model retrained for issue 17 (hidden = the final-normed state):
// expertmesh-tiny (FP8) logits 1.1e-2 relative RMS (the rounding moves activations across FP8
// quantization steps), hidden 1.3e-2; expertmesh-tiny-bf16 logits 3.4e-3, hidden 6.3e-3 (the
// model before it: 2.0e-2 / 1.2e-2 and 1.2e-3 / 2.2e-3).
#include <cmath>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/engine/engine.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/model/local_experts.h"
#include "core/model/model.h"
#include "core/numerics/numerics.h"
#include "gtest/gtest.h"
#include "tests/cuda/models_dir.h"

namespace expertmesh {
namespace {

double RelRms(const std::vector<float>& got, const std::vector<float>& want) {
  double d = 0.0, r = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    d += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    r += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(d / r);
}

struct Budget {
  const char* model;
  double logits;  // allowed relative RMS, about 1.5x the measured value
  double hidden;
};

class Bf16CacheBudgetTest : public ::testing::TestWithParam<Budget> {};

TEST_P(Bf16CacheBudgetTest, StaysWithinBudget) {
  const Budget& budget = GetParam();
  const std::string dir = testing::ModelDir(budget.model);  // honours EXPERTMESH_MODELS_DIR
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto config = LoadModelConfig(dir + "/config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  ModelLoadOptions lo;
  lo.load_mtp = false;
  auto model = Model::Create(**ckpt, *config, lo);
  ASSERT_TRUE(model.ok()) << model.status();
  LocalExperts::Options eo;
  auto experts = LocalExperts::Create(**ckpt, *config, AllExperts(*config), eo);
  ASSERT_TRUE(experts.ok()) << experts.status();
  auto engine = Engine::Create(**model, experts->get());
  ASSERT_TRUE(engine.ok()) << engine.status();

  std::mt19937 rng(2026);
  std::uniform_int_distribution<int32_t> tok(2, static_cast<int32_t>(config->vocab_size) - 1);
  std::vector<int32_t> input(13);
  for (int32_t& t : input) t = tok(rng);
  auto exact = (*engine)->NewCache();
  auto rounded = (*engine)->NewCache();
  double worst_logits = 0.0, worst_hidden = 0.0;
  for (int step = 0; step <= 8; ++step) {
    const std::vector<SequenceInput> a = {{input, exact.get(), false}};
    const std::vector<SequenceInput> b = {{input, rounded.get(), false}};
    auto want = (*engine)->Forward(a);
    auto got = (*engine)->Forward(b);
    ASSERT_TRUE(want.ok() && got.ok());
    for (int l = 0; l < rounded->num_layers(); ++l) {
      for (int64_t j = 0; j < rounded->length(); ++j) {
        float* slot = rounded->Slot(l, j);
        for (int64_t i = 0; i < rounded->row_size(); ++i) {
          slot[i] = Bf16ToFloat(FloatToBf16(slot[i]));
        }
      }
    }
    worst_logits = std::max(worst_logits, RelRms((*got)[0].logits, (*want)[0].logits));
    worst_hidden = std::max(worst_hidden, RelRms((*got)[0].hidden, (*want)[0].hidden));
    const std::vector<float>& l = (*want)[0].logits;
    input = {static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin())};
  }
  std::printf("[measured] BF16 latent cache, %s: logits rel RMS %.3g, hidden rel RMS %.3g\n",
              budget.model, worst_logits, worst_hidden);
  EXPECT_LE(worst_logits, budget.logits);
  EXPECT_LE(worst_hidden, budget.hidden);
  EXPECT_GT(worst_logits, 0.0);  // the rounding is seen at all
}

// The bundled-model path follows $EXPERTMESH_MODELS_DIR (a prebuilt bundle runs in another
// checkout than the one it was built in) and falls back to this source tree.
TEST(ModelsDirTest, EnvironmentOverridesTheSourceTree) {
  const char* before = std::getenv("EXPERTMESH_MODELS_DIR");
  const std::string saved = before != nullptr ? before : "";
  ASSERT_EQ(setenv("EXPERTMESH_MODELS_DIR", "/elsewhere/models", 1), 0);
  EXPECT_EQ(testing::ModelDir("expertmesh-tiny"), "/elsewhere/models/expertmesh-tiny");
  ASSERT_EQ(unsetenv("EXPERTMESH_MODELS_DIR"), 0);
  EXPECT_EQ(testing::ModelDir("expertmesh-tiny"),
            std::string(EXPERTMESH_SOURCE_DIR) + "/models/expertmesh-tiny");
  ASSERT_EQ(setenv("EXPERTMESH_MODELS_DIR", "", 1), 0);  // empty: as if unset
  EXPECT_EQ(testing::ModelDir("m"), std::string(EXPERTMESH_SOURCE_DIR) + "/models/m");
  if (before != nullptr) {
    setenv("EXPERTMESH_MODELS_DIR", saved.c_str(), 1);
  } else {
    unsetenv("EXPERTMESH_MODELS_DIR");
  }
}

INSTANTIATE_TEST_SUITE_P(Bundled, Bf16CacheBudgetTest,
                         ::testing::Values(Budget{"expertmesh-tiny", 3e-2, 2e-2},
                                           Budget{"expertmesh-tiny-bf16", 5e-3, 9.5e-3}),
                         [](const auto& info) {
                           return std::string(info.param.model) == "expertmesh-tiny" ? "fp8"
                                                                                     : "bf16";
                         });

}  // namespace
}  // namespace expertmesh
