// The speculative-decoding pieces on synthetic inputs: the rejection-sampling rule keeps the
// target distribution (general p/q, and the deterministic-draft form against a Sampler with
// temperature, top-k and penalties), greedy verification, the row-cost model and the
// adaptive draft policy's decisions under a synthetic cost model.
#include "core/decode/speculative.h"

#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"
#include "tests/mtp/mtp_test_util.h"

namespace expertmesh {
namespace {

int32_t Draw(std::span<const double> q, Rng& rng) {
  const double u = rng.Uniform();
  double acc = 0;
  for (size_t i = 0; i < q.size(); ++i) {
    acc += q[i];
    if (u < acc) return static_cast<int32_t>(i);
  }
  return static_cast<int32_t>(q.size() - 1);
}

// Draft d ~ q, then the rule: the emitted tokens follow p (chi-square at significance 0.001)
// and the acceptance rate is sum_i min(p_i, q_i) (within 4.5 binomial standard deviations).
TEST(SpeculativeTest, RejectionSamplingKeepsTheTargetDistribution) {
  const std::vector<std::pair<std::vector<double>, std::vector<double>>> cases = {
      {{0.1, 0.4, 0.2, 0.3, 0.0}, {0.5, 0.1, 0.1, 0.1, 0.2}},
      {{0.25, 0.25, 0.25, 0.25, 0.0}, {0.0, 0.0, 0.0, 0.0, 1.0}},  // q disjoint: never accepts
      {{0.05, 0.05, 0.6, 0.1, 0.2}, {0.05, 0.05, 0.6, 0.1, 0.2}},  // q = p: always accepts
      {{0.7, 0.1, 0.1, 0.05, 0.05}, {0.1, 0.1, 0.1, 0.35, 0.35}},
  };
  Rng rng(2026);
  auto uniform = [&] { return rng.Uniform(); };
  constexpr int kN = 100000;
  for (const auto& [p, q] : cases) {
    std::map<int32_t, int> seen;
    int accepted = 0;
    for (int n = 0; n < kN; ++n) {
      const RejectionResult r = RejectionSample(p, q, Draw(q, rng), uniform);
      ++seen[r.token];
      accepted += r.accepted;
    }
    std::map<int32_t, double> expected;
    double overlap = 0;
    for (size_t i = 0; i < p.size(); ++i) {
      if (p[i] > 0) expected[static_cast<int32_t>(i)] = p[i];
      overlap += std::min(p[i], q[i]);
    }
    const testing::ChiSquare chi = testing::ChiSquareGoodnessOfFit(seen, expected, kN);
    EXPECT_LT(chi.statistic, chi.critical_001) << "df " << chi.df;
    EXPECT_NEAR(accepted, kN * overlap, 4.5 * std::sqrt(kN * overlap * (1 - overlap)) + 1e-9);
  }
}

// The deterministic-draft form against a Sampler (temperature 0.7, top-k 5 of 8 tokens):
// accepted with probability p(d), and the emitted token follows the sampler's distribution,
// for a draft inside the support, the most likely token, and one outside the support.
TEST(SpeculativeTest, DeterministicDraftKeepsTheSamplersDistribution) {
  const std::vector<float> logits = {0.3f, 1.2f, -0.4f, 0.9f, 2.0f, -3.0f, 0.1f, 1.5f};
  SamplingParams params;
  params.temperature = 0.7f;
  params.top_k = 5;
  params.seed = 11;
  for (int32_t draft : {3, 4, 5}) {
    Sampler s = *Sampler::Create(params);
    const TokenDistribution p = s.Distribution(logits);
    ASSERT_EQ(p.tokens.size(), 5u);
    constexpr int kN = 60000;
    std::map<int32_t, int> seen;
    int accepted = 0;
    for (int n = 0; n < kN; ++n) {
      const VerifiedToken v = VerifyDraft(s, logits, draft);
      ++seen[v.token.token];
      accepted += v.accepted;
      EXPECT_EQ(v.accepted, v.token.token == draft);
    }
    std::map<int32_t, double> expected;
    for (size_t i = 0; i < p.tokens.size(); ++i) expected[p.tokens[i]] = p.probs[i];
    const testing::ChiSquare chi = testing::ChiSquareGoodnessOfFit(seen, expected, kN);
    EXPECT_LT(chi.statistic, chi.critical_001) << "draft " << draft;
    const double pd = p.Prob(draft);
    EXPECT_NEAR(accepted, kN * pd, 4.5 * std::sqrt(kN * pd * (1 - pd)) + 1e-9) << draft;
    if (draft == 5) {
      EXPECT_EQ(accepted, 0);  // outside the top-k
    }
  }
}

TEST(SpeculativeTest, GreedyVerificationAcceptsTheArgmaxOnly) {
  const int64_t V = 4;
  // Rows: argmax 3, 1, 2.
  const std::vector<float> logits = {0, 1, 2, 3, /**/ 0, 5, 1, 1, /**/ 0, 0, 9, 0};
  Sampler s = *Sampler::Create({});
  const std::vector<int32_t> agree = {3, 1};
  Verification v = VerifyDrafts(s, logits, agree, V);
  EXPECT_EQ(v.accepted, 2);
  ASSERT_EQ(v.tokens.size(), 3u);  // both drafts and the bonus token
  EXPECT_EQ(v.tokens[0].token, 3);
  EXPECT_EQ(v.tokens[1].token, 1);
  EXPECT_EQ(v.tokens[2].token, 2);
  const std::vector<int32_t> second_wrong = {3, 0};
  v = VerifyDrafts(s, logits, second_wrong, V);
  EXPECT_EQ(v.accepted, 1);
  ASSERT_EQ(v.tokens.size(), 2u);  // the accepted draft and the correction
  EXPECT_EQ(v.tokens[1].token, 1);
  // Logprobs are reported as Sample() reports them.
  EXPECT_NEAR(v.tokens[0].logprob, LogSoftmax(std::span<const float>(logits).first(4))[3], 1e-6);
}

// Penalties apply position by position: a token emitted at position j is penalized at j + 1.
TEST(SpeculativeTest, VerificationAppliesPenaltiesInOrder) {
  const std::vector<float> row = {0.0f, 1.0f, 1.3f};
  std::vector<float> logits;
  for (int i = 0; i < 3; ++i) logits.insert(logits.end(), row.begin(), row.end());
  SamplingParams params;
  params.presence_penalty = 0.5f;
  Sampler s = *Sampler::Create(params);
  const std::vector<int32_t> drafts = {2, 2};
  const Verification v = VerifyDrafts(s, logits, drafts, 3);
  EXPECT_EQ(v.accepted, 1);  // then 1.3 - 0.5 < 1.0: token 1 corrects the second draft
  ASSERT_EQ(v.tokens.size(), 2u);
  EXPECT_EQ(v.tokens[1].token, 1);
}

TEST(SpeculativeTest, RowCostModelInterpolatesAndExtrapolates) {
  RowCostModel m;
  EXPECT_LT(m.Predict(4), 0);
  m.Observe(4, 2.0);
  EXPECT_DOUBLE_EQ(m.Predict(8), 4.0);  // one point: proportional
  m.Observe(8, 3.0);
  EXPECT_DOUBLE_EQ(m.Predict(6), 2.5);
  EXPECT_DOUBLE_EQ(m.Predict(16), 5.0);  // the end segment's slope
  EXPECT_DOUBLE_EQ(m.Predict(2), 1.5);
  m.Observe(8, 4.0);  // moving mean: 3 + 0.1 * (4 - 3)
  EXPECT_NEAR(m.Predict(8), 3.1, 1e-12);
  EXPECT_NEAR(m.Predict(4), 2.0 * 3.1 / 3.0, 1e-12);  // drifts with the point observed
  m.Observe(8, 100.0);  // a stall counts as 2x the mean: 3.1 + 0.1 * (6.2 - 3.1)
  EXPECT_NEAR(m.Predict(8), 3.41, 1e-12);
}

// A synthetic engine: a step of R rows costs 1 + 0.015 R, the MTP module 0.005 per row;
// drafts are accepted with probability alpha. At batch 32 with alpha 0.1 drafting loses
// (predicted 0.72x), with alpha 0.9 it gains (1.24x, over the 1.2 margin); at batch 1 it
// gains for alpha 0.9 (1.85x).
struct Simulation {
  DraftPolicy policy{1, DraftPolicyOptions{}};
  Rng rng{5};
  int Run(int64_t B, double alpha, int steps) {
    int drafting = 0;
    for (int i = 0; i < steps; ++i) {
      const int k = policy.Choose(B);
      drafting += k > 0;
      policy.ObserveMain(B * (1 + k), 1.0 + 0.015 * B * (1 + k));
      if (k > 0) {
        int64_t acc = 0;
        for (int64_t b = 0; b < B; ++b) acc += rng.Uniform() < alpha;
        policy.ObserveMtp(B + acc, 0.005 * (B + acc));
        const int64_t drafted[1] = {B}, accepted[1] = {acc};
        policy.ObserveAcceptance(drafted, accepted);
      }
    }
    return drafting;
  }
};

TEST(SpeculativeTest, PolicyTurnsDraftingOffWhenItLosesAndBackOnWhenItPays) {
  Simulation sim;
  // Batch 32, poor acceptance: off after the probes, then probes (4 steps each) at intervals
  // of 32, 64, 128, 256 steps.
  const int low = sim.Run(32, 0.1, 320);
  EXPECT_LE(low, 2 + 4 * 4);
  EXPECT_LE(sim.Run(32, 0.1, 512), 3 * 4);
  // Acceptance improves: the probes (now every 256 steps) see it and drafting comes back.
  sim.Run(32, 0.9, 1600);
  const int high = sim.Run(32, 0.9, 100);
  EXPECT_GE(high, 100 - 100 / 32 - 1);
  EXPECT_GT(sim.policy.PredictedSpeedup(32, 1), 1.0);
  // Batch 1 with good acceptance: drafting pays from the start.
  Simulation one;
  const int b1 = one.Run(1, 0.9, 200);
  EXPECT_GE(b1, 200 - 200 / 32 - 2);
  EXPECT_NEAR(one.policy.acceptance_rate(0), 0.9, 0.15);
}

TEST(SpeculativeTest, NonAdaptivePolicyAlwaysDrafts) {
  DraftPolicy p(2, DraftPolicyOptions{.adaptive = false});
  for (int i = 0; i < 10; ++i) EXPECT_EQ(p.Choose(32), 2);
  EXPECT_EQ(p.Choose(0), 0);
}

}  // namespace
}  // namespace expertmesh
