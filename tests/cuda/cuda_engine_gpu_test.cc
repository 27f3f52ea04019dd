// The GPU engine (core/kernels/cuda/cuda_engine.h) against the CPU reference engine on the bundled
// models (FP8 and BF16): a batch of two sequences, prefill then 8 greedy decode steps fed with
// the reference's tokens, then the MTP module over the prefill's hidden states; tensor
// parallelism over 1 and 2 GPUs (2 skips with a message on a one-GPU machine). Logits and
// final-normed hidden states are compared by relative RMS error and by the largest error
// relative to the reference's peak; the greedy token must agree at every step, unless the two
// candidates are a near-tie within the row's logit error.
//
// Tolerances are ESTIMATES, not yet measured on a GPU. The largest known difference is the
// BF16 latent cache: its cost alone, emulated on the CPU (tests/cuda/engine_bf16_cache_test.cc),
// is 1.1e-2 relative RMS in the FP8 model's logits (rounding moves activations across FP8
// quantization steps) and 3.4e-3 in the BF16 model's. Beyond it: FP32 accumulation order (FP8
// kernel per 128-deep block, cuBLAS), ~1e-6. Allowed: about three times the emulated cache
// cost (RMS), and a peak bound for single rows. Replace with measured figures (the [measured]
// lines) once run.
// The gate's scores come from the GPU's hidden rows: a near-tie between two experts can flip
// under those small differences and change one row's experts, which shows as one large row
// error (max / peak) while the RMS stays small -- look for that before suspecting a kernel.
#include "core/kernels/cuda/cuda_engine.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/engine/engine.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/model/local_experts.h"
#include "core/model/model.h"
#include "tests/cuda/gpu_test_util.h"
#include "tests/cuda/models_dir.h"

namespace expertmesh::cuda::testing {
namespace {

struct Tolerance {
  double rel_rms;   // relative RMS error, logits and hidden states
  double rel_peak;  // largest error / largest reference magnitude
};
// Estimates (see the header comment).
Tolerance ToleranceFor(const std::string& model) {
  return model == "expertmesh-tiny" ? Tolerance{6e-2, 1.5e-1} : Tolerance{1e-2, 5e-2};
}

struct Errors {
  double rel_rms = 0.0;
  double rel_peak = 0.0;
};

Errors Compare(const std::vector<float>& got, const std::vector<float>& want) {
  double diff = 0.0, ref = 0.0, max_err = 0.0, peak = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    diff += d * d;
    ref += static_cast<double>(want[i]) * want[i];
    max_err = std::max(max_err, std::abs(d));
    peak = std::max(peak, std::abs(static_cast<double>(want[i])));
  }
  return {std::sqrt(diff / std::max(ref, 1e-30)), max_err / std::max(peak, 1e-30)};
}

using ::expertmesh::testing::ModelDir;

int32_t Argmax(const std::vector<float>& v, size_t begin, size_t n) {
  return static_cast<int32_t>(std::max_element(v.begin() + begin, v.begin() + begin + n) -
                              v.begin() - begin);
}

class CudaEngineTest : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(CudaEngineTest, MatchesReferenceEngine) {
  EM_REQUIRE_GPU();
  const auto& [name, tp] = GetParam();
  const Tolerance tol = ToleranceFor(name);
  if (VisibleDevices() < tp) {
    GTEST_SKIP() << "tensor parallelism over " << tp << " GPUs needs " << tp << " CUDA devices; "
                 << VisibleDevices() << " present";
  }
  const std::string dir = ModelDir(name);
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto config = LoadModelConfig(dir + "/config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  auto model = Model::Create(**ckpt, *config);
  ASSERT_TRUE(model.ok()) << model.status();
  LocalExperts::Options eo;
  eo.quantize_activations = true;
  // CudaExperts keeps each expert's output in FP32 (no BF16 rounding before the weighted sum,
  // unlike LocalExperts' default): compare like with like, as these tolerances were measured.
  eo.round_expert_outputs_bf16 = false;
  auto experts = LocalExperts::Create(**ckpt, *config, AllExperts(*config), eo);
  ASSERT_TRUE(experts.ok()) << experts.status();
  auto cpu = Engine::Create(**model, experts->get());
  ASSERT_TRUE(cpu.ok()) << cpu.status();

  CudaEngineOptions go;
  for (int d = 0; d < tp; ++d) go.devices.push_back(d);
  go.kv_pages = 16;
  go.page_size = 8;
  auto gpu = CudaEngine::Create(**model, experts->get(), go);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_EQ((*gpu)->tp_size(), tp);

  const ModelConfig& c = (*model)->config();
  const int64_t V = c.vocab_size, D = c.hidden_size;
  const int64_t row = c.kv_lora_rank + c.qk_rope_head_dim;
  // Two sequences: pages 0..7 and 8..15 (64 tokens each), prompts of 13 and 5 tokens.
  std::mt19937 rng(2026);
  std::uniform_int_distribution<int32_t> tok(2, static_cast<int32_t>(V) - 1);
  std::vector<std::vector<int32_t>> prompts = {std::vector<int32_t>(13), std::vector<int32_t>(5)};
  for (auto& p : prompts) {
    for (int32_t& t : p) t = tok(rng);
  }
  std::vector<std::unique_ptr<ContiguousKvCache>> cpu_caches;
  std::vector<std::unique_ptr<PageListCache>> gpu_caches;
  for (int s = 0; s < 2; ++s) {
    cpu_caches.push_back((*cpu)->NewCache());
    std::vector<int32_t> pages(8);
    std::iota(pages.begin(), pages.end(), 8 * s);
    gpu_caches.push_back(std::make_unique<PageListCache>(static_cast<int>(c.num_hidden_layers), row,
                                                         pages, go.page_size));
  }
  std::vector<std::vector<int32_t>> inputs = prompts;
  Errors worst;
  std::vector<SequenceOutput> first_cpu;
  for (int step = 0; step <= 8; ++step) {
    std::vector<SequenceInput> cb, gb;
    for (int s = 0; s < 2; ++s) {
      // Sequence 0 asks for every position's logits at prefill (speculative verification).
      cb.push_back({inputs[s], cpu_caches[s].get(), step == 0 && s == 0});
      gb.push_back({inputs[s], gpu_caches[s].get(), step == 0 && s == 0});
    }
    auto want = (*cpu)->Forward(cb);
    ASSERT_TRUE(want.ok()) << want.status();
    auto got = (*gpu)->Forward(gb);
    ASSERT_TRUE(got.ok()) << got.status();
    if (step == 0) first_cpu = *want;
    for (int s = 0; s < 2; ++s) {
      ASSERT_EQ((*got)[s].logits.size(), (*want)[s].logits.size());
      ASSERT_EQ((*got)[s].hidden.size(), (*want)[s].hidden.size());
      EXPECT_EQ(gpu_caches[s]->length(), cpu_caches[s]->length());
      const Errors l = Compare((*got)[s].logits, (*want)[s].logits);
      const Errors h = Compare((*got)[s].hidden, (*want)[s].hidden);
      for (const Errors& e : {l, h}) {
        worst.rel_rms = std::max(worst.rel_rms, e.rel_rms);
        worst.rel_peak = std::max(worst.rel_peak, e.rel_peak);
      }
      EXPECT_LE(l.rel_rms, tol.rel_rms) << "step " << step << " seq " << s;
      EXPECT_LE(h.rel_rms, tol.rel_rms) << "step " << step << " seq " << s;
      EXPECT_LE(l.rel_peak, tol.rel_peak) << "step " << step << " seq " << s;
      EXPECT_LE(h.rel_peak, tol.rel_peak) << "step " << step << " seq " << s;
      // The greedy token agrees, or the two candidates are a near-tie: their reference logits
      // differ by no more than the largest logit error of the row.
      const size_t last = (*want)[s].logits.size() - V;
      const int32_t next = Argmax((*want)[s].logits, last, V);
      const int32_t gpu_next = Argmax((*got)[s].logits, last, V);
      double row_err = 0.0;
      for (int64_t i = 0; i < V; ++i) {
        row_err = std::max(row_err, std::abs(static_cast<double>((*got)[s].logits[last + i]) -
                                             (*want)[s].logits[last + i]));
      }
      const double gap = (*want)[s].logits[last + next] - (*want)[s].logits[last + gpu_next];
      EXPECT_LE(gap, row_err) << "step " << step << " seq " << s << ": GPU picks " << gpu_next
                              << ", reference " << next;
      if (gpu_next != next) {
        std::printf("[measured] step %d seq %d: greedy near-tie %d vs %d (gap %.3g)\n", step, s,
                    gpu_next, next, gap);
      }
      inputs[s] = {next};
    }
  }
  std::printf(
      "[measured] CudaEngine %s tp %d vs Engine, prefill + 8 decode steps: rel RMS %.3g, "
      "max err / peak %.3g\n",
      name.c_str(), tp, worst.rel_rms, worst.rel_peak);

  // MTP module over sequence 0's prefill rows: t[i+1] with h[i].
  if (!(*model)->mtp().empty()) {
    const std::vector<int32_t>& p = prompts[0];
    const int64_t n = std::ssize(p) - 1;
    const std::vector<int32_t> next(p.begin() + 1, p.end());
    const std::vector<float> hidden(first_cpu[0].hidden.begin(),
                                    first_cpu[0].hidden.begin() + n * D);
    auto cpu_mtp = (*cpu)->NewMtpCache();
    PageListCache gpu_mtp(1, row, {0, 1, 2}, go.page_size);
    const MtpInput cin{next, hidden, cpu_mtp.get(), true};
    const MtpInput gin{next, hidden, &gpu_mtp, true};
    auto want = (*cpu)->ForwardMtp(std::span<const MtpInput>(&cin, 1), 0);
    ASSERT_TRUE(want.ok()) << want.status();
    auto got = (*gpu)->ForwardMtp(std::span<const MtpInput>(&gin, 1), 0);
    ASSERT_TRUE(got.ok()) << got.status();
    const Errors l = Compare((*got)[0].logits, (*want)[0].logits);
    std::printf(
        "[measured] CudaEngine %s tp %d MTP module: logits rel RMS %.3g, max err / peak "
        "%.3g\n",
        name.c_str(), tp, l.rel_rms, l.rel_peak);
    EXPECT_LE(l.rel_rms, tol.rel_rms);
    EXPECT_LE(l.rel_peak, tol.rel_peak);
  }

  // Rollback (MTP verification): after truncating a sequence by one token, the next forward
  // overwrites that position's cache rows; GPU and reference still agree.
  const int64_t len = gpu_caches[1]->length();
  gpu_caches[1]->Truncate(len - 1);
  cpu_caches[1]->Truncate(len - 1);
  const std::vector<int32_t> again = {inputs[1][0]};
  std::vector<SequenceInput> gb = {{again, gpu_caches[1].get(), false}};
  std::vector<SequenceInput> cb = {{again, cpu_caches[1].get(), false}};
  auto got = (*gpu)->Forward(gb);
  auto want = (*cpu)->Forward(cb);
  ASSERT_TRUE(got.ok() && want.ok());
  EXPECT_LE(Compare((*got)[0].logits, (*want)[0].logits).rel_rms, tol.rel_rms);
}

TEST(CudaEngineErrors, ReportsBadSetups) {
  EM_REQUIRE_GPU();
  const std::string dir = ModelDir("expertmesh-tiny");
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok());
  auto config = LoadModelConfig(dir + "/config.json");
  ASSERT_TRUE(config.ok());
  auto model = Model::Create(**ckpt, *config);
  ASSERT_TRUE(model.ok());
  LocalExperts::Options eo;
  auto experts = LocalExperts::Create(**ckpt, *config, AllExperts(*config), eo);
  ASSERT_TRUE(experts.ok());
  CudaEngineOptions o;
  o.devices = {VisibleDevices()};  // one past the last device
  auto absent = CudaEngine::Create(**model, experts->get(), o);
  ASSERT_FALSE(absent.ok());
  EXPECT_NE(absent.status().message().find("visible"), std::string::npos) << absent.status();
  o.devices = {0};
  EXPECT_FALSE(CudaEngine::Create(**model, nullptr, o).ok());  // MoE layers, no experts
  auto engine = CudaEngine::Create(**model, experts->get(), o);
  ASSERT_TRUE(engine.ok()) << engine.status();
  // A cache that is not paged is refused, and nothing is extended.
  auto contiguous = ContiguousKvCache::Create(static_cast<int>(config->num_hidden_layers),
                                              config->kv_lora_rank, config->qk_rope_head_dim);
  ASSERT_TRUE(contiguous.ok());
  const std::vector<int32_t> t = {5, 6};
  std::vector<SequenceInput> in = {{t, contiguous->get(), false}};
  EXPECT_FALSE((*engine)->Forward(in).ok());
  EXPECT_EQ((*contiguous)->length(), 0);
}

INSTANTIATE_TEST_SUITE_P(Bundled, CudaEngineTest,
                         ::testing::Combine(::testing::Values("expertmesh-tiny",
                                                              "expertmesh-tiny-bf16"),
                                            ::testing::Values(1, 2)),
                         [](const auto& info) {
                           std::string n = std::get<0>(info.param) + "_tp" +
                                           std::to_string(std::get<1>(info.param));
                           for (char& ch : n) {
                             if (ch == '-') ch = '_';
                           }
                           return n;
                         });

}  // namespace
}  // namespace expertmesh::cuda::testing
