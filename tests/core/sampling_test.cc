// Sampling: greedy ties, seeded determinism, top-k / top-p support, penalties, logprobs.
#include "core/decode/sampling.h"

#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"

namespace expertmesh {
namespace {

TEST(SamplingTest, GreedyTakesTheLowestIdOnTies) {
  auto s = Sampler::Create({});
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->Sample(std::vector<float>{1.0f, 3.0f, 3.0f, 2.0f}).token, 1);
}

TEST(SamplingTest, SameSeedSameTokensDifferentSeedDifferentTokens) {
  std::vector<float> logits(50);
  for (int i = 0; i < 50; ++i) logits[i] = std::sin(i * 0.7f);
  auto run = [&](uint64_t seed) {
    SamplingParams p;
    p.temperature = 1.0f;
    p.seed = seed;
    Sampler s = *Sampler::Create(p);
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) out.push_back(s.Sample(logits).token);
    return out;
  };
  EXPECT_EQ(run(7), run(7));
  EXPECT_NE(run(7), run(8));
}

TEST(SamplingTest, TopKAndTopPRestrictTheSupport) {
  const std::vector<float> logits = {0.0f, 2.0f, 1.0f, 3.0f, -1.0f};
  SamplingParams p;
  p.temperature = 2.0f;
  p.top_k = 2;  // tokens 3 and 1 only
  Sampler k = *Sampler::Create(p);
  std::map<int32_t, int> seen;
  for (int i = 0; i < 400; ++i) ++seen[k.Sample(logits).token];
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_GT(seen[3], seen[1]);
  EXPECT_GT(seen[1], 0);
  // top_p: probabilities at T=1 are ~{.032,.237,.087,.644,.012}; 0.7 keeps tokens 3 and 1.
  p.top_k = 0;
  p.temperature = 1.0f;
  p.top_p = 0.7f;
  Sampler tp = *Sampler::Create(p);
  seen.clear();
  for (int i = 0; i < 400; ++i) ++seen[tp.Sample(logits).token];
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_TRUE(seen.count(3) && seen.count(1));
  // The frequency of the top token, 0.644 / (0.644 + 0.237) = 0.731 of 400 draws: within 6
  // standard deviations (sd = 8.9 draws).
  EXPECT_NEAR(seen[3], 0.731 * 400, 6 * 8.9);
}

TEST(SamplingTest, PenaltiesDiscourageRepeats) {
  const std::vector<float> logits = {1.0f, 1.2f, 0.0f};
  SamplingParams p;
  p.presence_penalty = 0.5f;
  Sampler s = *Sampler::Create(p);
  EXPECT_EQ(s.Sample(logits).token, 1);
  EXPECT_EQ(s.Sample(logits).token, 0);  // 1.2 - 0.5 < 1.0
  SamplingParams f;
  f.frequency_penalty = 0.15f;
  Sampler sf = *Sampler::Create(f);
  EXPECT_EQ(sf.Sample(logits).token, 1);  // 1.2
  EXPECT_EQ(sf.Sample(logits).token, 1);  // 1.05 > 1.0
  EXPECT_EQ(sf.Sample(logits).token, 0);  // 0.9 < 1.0
}

TEST(SamplingTest, LogprobsAreTheModelsLogSoftmax) {
  const std::vector<float> logits = {0.0f, std::log(3.0f), 0.0f};  // p = {.2, .6, .2}
  SamplingParams p;
  p.top_logprobs = 2;
  Sampler s = *Sampler::Create(p);
  SampledToken t = s.Sample(logits);
  EXPECT_EQ(t.token, 1);
  EXPECT_NEAR(t.logprob, std::log(0.6f), 1e-6);
  ASSERT_EQ(t.top_logprobs.size(), 2u);
  EXPECT_EQ(t.top_logprobs[0].token, 1);
  EXPECT_EQ(t.top_logprobs[1].token, 0);  // tie with 2: lower id
  EXPECT_NEAR(t.top_logprobs[1].logprob, std::log(0.2f), 1e-6);
}

TEST(SamplingTest, InvalidParametersAreRejected) {
  SamplingParams p;
  p.top_p = 0.0f;
  EXPECT_FALSE(Sampler::Create(p).ok());
  p = {};
  p.temperature = -1.0f;
  EXPECT_FALSE(Sampler::Create(p).ok());
  p = {};
  p.top_logprobs = 21;
  EXPECT_FALSE(Sampler::Create(p).ok());
}

}  // namespace
}  // namespace expertmesh
