// The reference engine against transformers' DeepSeek-V3 (golden files written by
// tools/golden/make_engine_goldens.sh from the committed checkpoints in tests/data/engine-*).
//
// - Activation quantization off: the engine computes what transformers computes (float
//   inputs to dequantized FP8 weights), so logits match tightly and greedy tokens are equal.
// - On (the default, as DeepSeek serves): against the float goldens the difference is the FP8
//   activation error, bounded by an NMSE measured here. The goldens also hold transformers with
//   the same activation quantization emulated (act_quant); the naive attention form computes
//   exactly that, except where a value sits within float rounding of an FP8 rounding midpoint:
//   the two implementations then round it to neighbouring FP8 values (measured: one element in
//   ~1e5, e.g. x/scale = 272.0000 between 256 and 288), and this sensitive random model carries
//   that to later positions. So most positions match tightly, not all.
#include <string>
#include <vector>

#include "tests/core/engine_test_util.h"

namespace expertmesh::testing {
namespace {

// Quantization off: measured max |logit diff| 1.4e-5 (logits of std ~3), MTP 1.9e-5.
constexpr float kFloatTolerance = 1e-4f;
// Quantization on, naive form vs emulated act_quant golden: a position "matches" within
// 1e-3 (measured <= 7.6e-6 where no rounding flip happened). Measured matching: yarn 9/12
// (one flip at a position <= 7 of the 23-token prompt), mtp 21/21. Required: the first
// position of every prompt (fewest quantization sites) and 60% of all positions.
constexpr float kActQuantMatch = 1e-3f;
constexpr double kActQuantMinMatchingFraction = 0.6;
// Quantization on vs float golden: NMSE = |got - want|^2 / |want|^2 over the golden
// positions. Measured: absorbed yarn 0.041, mtp 0.0055; naive (c_kv quantized before
// kv_b_proj too) yarn 0.055, mtp 0.037.
constexpr double kFp8MaxNmse = 0.1;

struct Case {
  std::string name;
  bool quantize_activations;
  AttentionForm attention;
};

struct Errors {
  float max_abs = 0.0f;
  int positions = 0;
  int matching = 0;  // max |diff| <= kActQuantMatch
  double err_sq = 0.0, ref_sq = 0.0;
  void Add(std::span<const float> got, std::span<const float> want) {
    const float e = MaxAbsDiff(got, want);
    max_abs = std::max(max_abs, e);
    ++positions;
    matching += e <= kActQuantMatch;
    for (size_t i = 0; i < got.size(); ++i) {
      err_sq += (got[i] - want[i]) * (got[i] - want[i]);
      ref_sq += want[i] * want[i];
    }
  }
  double nmse() const { return ref_sq > 0 ? err_sq / ref_sq : 0.0; }
};

class EngineGoldenTest : public ::testing::TestWithParam<Case> {};

TEST_P(EngineGoldenTest, MatchesTransformers) {
  const Case& c = GetParam();
  LoadedModel m = LoadedModel::Load(c.name, c.quantize_activations);
  // transformers' act_quant emulation keeps each expert's output in float (it has no BF16
  // expert outputs), so this comparison runs the experts with that rounding off; every other
  // user keeps LocalExperts' default (BF16 per expert output, the data plane's exact combine).
  // Measured with the rounding on: mtp naive 0/21 positions within 1e-3 (max 0.62), as the
  // BF16 error (~2^-9 relative per expert output) is far above this tolerance.
  LocalExperts::Options float_outputs{c.quantize_activations, nullptr};
  float_outputs.round_expert_outputs_bf16 = false;
  auto experts = LocalExperts::Create(*m.ckpt, m.config, AllExperts(m.config), float_outputs);
  ASSERT_TRUE(experts.ok()) << experts.status();
  m.experts = *std::move(experts);
  auto engine = m.NewEngine({c.quantize_activations, c.attention});
  boost::json::value golden =
      ReadJson(std::string(EXPERTMESH_SOURCE_DIR) + "/tests/golden/engine/" + c.name + ".json");
  const int64_t vocab = m.config.vocab_size;
  Errors same_mode, vs_float;  // vs the golden of this mode; vs the float golden
  int greedy_equal = 0, greedy_total = 0;
  for (const auto& prompt : golden.at("prompts").as_array()) {
    const std::vector<int32_t> tokens = JsonVector<int32_t>(prompt.at("tokens"));
    const auto& want = c.quantize_activations ? prompt.at("act_quant") : prompt;
    auto cache = engine->NewCache();
    SequenceOutput out = Run1(*engine, *cache, tokens, /*all_logits=*/true);
    const std::vector<int64_t> positions = JsonVector<int64_t>(prompt.at("positions"));
    for (size_t i = 0; i < positions.size(); ++i) {
      std::span<const float> got(out.logits.data() + positions[i] * vocab, vocab);
      std::vector<float> want_logits = JsonVector<float>(want.at("logits").as_array()[i]);
      same_mode.Add(got, want_logits);
      if (positions[i] == 0 && c.attention == AttentionForm::kNaive) {
        EXPECT_LE(MaxAbsDiff(got, want_logits), kActQuantMatch) << "first position";
      }
      vs_float.Add(got, JsonVector<float>(prompt.at("logits").as_array()[i]));
    }
    if (prompt.as_object().contains("mtp_logits")) {
      // MTP over the prompt: position i sees t[i+1] and h[i].
      auto mtp_cache = engine->NewMtpCache();
      const int64_t n = std::ssize(tokens) - 1;
      std::vector<int32_t> next(tokens.begin() + 1, tokens.end());
      std::span<const float> hidden(out.hidden.data(), n * m.config.hidden_size);
      MtpInput in{next, hidden, mtp_cache.get(), /*all_logits=*/true};
      auto mtp = engine->ForwardMtp(std::span<const MtpInput>(&in, 1));
      ASSERT_TRUE(mtp.ok()) << mtp.status();
      const std::vector<int64_t> mtp_positions = JsonVector<int64_t>(prompt.at("mtp_positions"));
      for (size_t i = 0; i < mtp_positions.size(); ++i) {
        std::span<const float> got((*mtp)[0].logits.data() + mtp_positions[i] * vocab, vocab);
        same_mode.Add(got, JsonVector<float>(want.at("mtp_logits").as_array()[i]));
      }
    }
    std::vector<float> final_logits;
    const std::vector<int32_t> want_greedy = JsonVector<int32_t>(want.at("greedy"));
    const std::vector<int32_t> greedy =
        Greedy(*engine, tokens, static_cast<int>(want_greedy.size()), &final_logits);
    for (size_t i = 0; i < greedy.size(); ++i) greedy_equal += greedy[i] == want_greedy[i];
    greedy_total += std::ssize(greedy);
    if (!c.quantize_activations) {
      EXPECT_EQ(greedy, want_greedy);
      same_mode.Add(final_logits, JsonVector<float>(want.at("final_logits")));
    }
  }
  std::printf(
      "[ measured ] %s act_quant=%d %s: vs same-mode golden max |diff| %.3g, "
      "%d/%d positions within %.0e, NMSE %.3g; vs float golden NMSE %.3g; greedy "
      "tokens equal %d/%d\n",
      c.name.c_str(), c.quantize_activations,
      c.attention == AttentionForm::kAbsorbed ? "absorbed" : "naive", same_mode.max_abs,
      same_mode.matching, same_mode.positions, kActQuantMatch, same_mode.nmse(), vs_float.nmse(),
      greedy_equal, greedy_total);
  if (!c.quantize_activations) {
    EXPECT_LE(same_mode.max_abs, kFloatTolerance);
    return;
  }
  EXPECT_LE(vs_float.nmse(), kFp8MaxNmse);
  if (c.attention == AttentionForm::kNaive) {
    EXPECT_GE(same_mode.matching, kActQuantMinMatchingFraction * same_mode.positions);
  }
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, EngineGoldenTest,
                         ::testing::Values(Case{"engine-yarn", false, AttentionForm::kAbsorbed},
                                           Case{"engine-yarn", false, AttentionForm::kNaive},
                                           Case{"engine-yarn", true, AttentionForm::kAbsorbed},
                                           Case{"engine-yarn", true, AttentionForm::kNaive},
                                           Case{"engine-mtp", false, AttentionForm::kAbsorbed},
                                           Case{"engine-mtp", false, AttentionForm::kNaive},
                                           Case{"engine-mtp", true, AttentionForm::kAbsorbed},
                                           Case{"engine-mtp", true, AttentionForm::kNaive}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           std::string name = info.param.name.substr(7);  // after "engine-"
                           name += info.param.quantize_activations ? "_ActQuant" : "_Float";
                           name += info.param.attention == AttentionForm::kAbsorbed ? "_Absorbed"
                                                                                    : "_Naive";
                           return name;
                         });

}  // namespace
}  // namespace expertmesh::testing
