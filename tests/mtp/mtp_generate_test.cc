// Speculative decoding through the in-process BatchGenerator on the committed random checkpoint
// with an MTP module (tests/data/engine-mtp): greedy output identical to plain decoding
// token for token (k = 1, 2, 3; one sequence at a time and batched), both KV caches after
// rejections equal to those of a run without drafting, and the sampled distribution of the
// second token equal to the plain one (a chi-square test).
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "core/decode/generate.h"
#include "core/decode/speculative.h"
#include "gtest/gtest.h"
#include "tests/core/engine_test_util.h"
#include "tests/mtp/mtp_test_util.h"

namespace expertmesh {
namespace {

using testing::LoadedModel;

class MtpGenerateTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { model_ = new LoadedModel(LoadedModel::Load("engine-mtp", true)); }
  static void TearDownTestSuite() { delete model_; }

  std::unique_ptr<BatchGenerator> NewGenerator(Engine* engine, bool mtp, int k, bool adaptive) {
    BatchGeneratorOptions o;
    o.mtp = mtp;
    o.draft_k = k;
    o.policy.adaptive = adaptive;
    auto g = BatchGenerator::Create(engine, o);
    EXPECT_TRUE(g.ok()) << g.status();
    return *std::move(g);
  }

  static std::vector<BatchRequest> GreedyRequests(int n, int max_tokens) {
    std::vector<BatchRequest> out;
    for (const auto& p : testing::MtpTestPrompts(n, model_->config.vocab_size)) {
      BatchRequest r;
      r.prompt = p;
      r.max_tokens = max_tokens;
      r.ignore_eos = true;
      out.push_back(r);
    }
    return out;
  }

  static std::vector<int32_t> Tokens(const BatchResult& r) {
    std::vector<int32_t> t;
    for (const SampledToken& s : r.tokens) t.push_back(s.token);
    return t;
  }

  // The first of 400 fixed random prompts whose exact probability of accepting the MTP draft
  // of the second generated token, sum_t1 P(t1) P(t2 = draft(t1) | t1), lies in [0.2, 0.8]
  // under temperature 1, top-k 4 -- with a random model most drafts fall outside the top 4,
  // so a usable prompt has to be picked -- with the exact distribution of that token.
  struct AcceptingPrompt {
    std::vector<int32_t> prompt;
    SamplingParams sampling;
    std::map<int32_t, double> second_token;
    double acceptance = 0;
  };
  static AcceptingPrompt FindAcceptingPrompt(Engine& engine) {
    const int64_t V = model_->config.vocab_size, D = model_->config.hidden_size;
    AcceptingPrompt out;
    out.sampling.temperature = 1.0f;
    out.sampling.top_k = 4;
    for (const std::vector<int32_t>& prompt :
         testing::MtpTestPrompts(400, static_cast<int>(V), 99)) {
      Sampler s = *Sampler::Create(out.sampling);
      auto cache = engine.NewCache();
      const SequenceOutput first = testing::Run1(engine, *cache, prompt, false);
      const TokenDistribution d1 = s.Distribution(first.logits);
      std::map<int32_t, double> dist;
      double accept = 0;
      for (size_t a = 0; a < d1.tokens.size(); ++a) {
        std::vector<int32_t> p = prompt;
        p.push_back(d1.tokens[a]);
        auto c2 = engine.NewCache();
        const SequenceOutput second = testing::Run1(engine, *c2, p, false);
        const TokenDistribution d2 = s.Distribution(second.logits);
        for (size_t b = 0; b < d2.tokens.size(); ++b) {
          dist[d2.tokens[b]] += d1.probs[a] * d2.probs[b];
        }
        // The draft: the MTP module over (t[i+1], h[i]) for the prompt's positions.
        auto mc = engine.NewMtpCache();
        MtpInput in{std::span<const int32_t>(p).subspan(1),
                    std::span<const float>(first.hidden).first(prompt.size() * D), mc.get(), false};
        auto m = engine.ForwardMtp(std::span<const MtpInput>(&in, 1));
        EXPECT_TRUE(m.ok());
        if (!m.ok()) return out;
        accept += d1.probs[a] * d2.Prob(Argmax((*m)[0].logits));
      }
      if (accept >= 0.2 && accept <= 0.8) {
        out.prompt = prompt;
        out.second_token = dist;
        out.acceptance = accept;
        return out;
      }
    }
    return out;
  }

  static LoadedModel* model_;
};
LoadedModel* MtpGenerateTest::model_ = nullptr;

TEST_F(MtpGenerateTest, GreedyWithMtpEqualsGreedyWithout) {
  auto engine = model_->NewEngine({});
  const std::vector<BatchRequest> requests = GreedyRequests(8, 24);
  auto plain = NewGenerator(engine.get(), false, 1, false);
  ASSERT_FALSE(plain->mtp());
  auto expected = plain->Generate(requests);
  ASSERT_TRUE(expected.ok()) << expected.status();
  for (int k : {1, 2, 3}) {
    auto spec = NewGenerator(engine.get(), true, k, /*adaptive=*/false);
    ASSERT_TRUE(spec->mtp());
    // All 8 in one batch, then each alone.
    BatchStats stats;
    auto batched = spec->Generate(requests, &stats);
    ASSERT_TRUE(batched.ok()) << batched.status();
    for (size_t i = 0; i < requests.size(); ++i) {
      EXPECT_EQ(Tokens((*batched)[i]), Tokens((*expected)[i])) << "k=" << k << " prompt " << i;
      auto alone = spec->Generate(std::span<const BatchRequest>(&requests[i], 1));
      ASSERT_TRUE(alone.ok()) << alone.status();
      EXPECT_EQ(Tokens((*alone)[0]), Tokens((*expected)[i])) << "k=" << k << " alone " << i;
    }
    EXPECT_GT(stats.drafted, 0);
    EXPECT_EQ(stats.draft_steps, stats.decode_steps);  // not adaptive: every step drafts
    std::printf("k=%d: drafted %lld accepted %lld (%.1f%%) in %lld steps\n", k,
                static_cast<long long>(stats.drafted), static_cast<long long>(stats.accepted),
                100.0 * stats.accepted / std::max<int64_t>(1, stats.drafted),
                static_cast<long long>(stats.decode_steps));
  }
}

TEST_F(MtpGenerateTest, AdaptivePolicyKeepsGreedyOutput) {
  auto engine = model_->NewEngine({});
  const std::vector<BatchRequest> requests = GreedyRequests(8, 40);
  auto plain = NewGenerator(engine.get(), false, 1, false);
  auto expected = plain->Generate(requests);
  ASSERT_TRUE(expected.ok());
  auto spec = NewGenerator(engine.get(), true, 2, /*adaptive=*/true);
  BatchStats stats;
  auto got = spec->Generate(requests, &stats);
  ASSERT_TRUE(got.ok()) << got.status();
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(Tokens((*got)[i]), Tokens((*expected)[i])) << "prompt " << i;
  }
  // It probed drafting at least once, whatever it then chose.
  EXPECT_GT(stats.draft_steps, 0);
}

// After sampled generation with both accepted and rejected drafts: the main cache equals
// that of a plain run fed the same tokens one at a time, bit for bit, and the MTP cache
// equals the MTP module run once over the whole sequence with that run's hidden states
// (teacher forcing).
TEST_F(MtpGenerateTest, CachesAfterRollbackEqualThoseWithoutDrafting) {
  auto engine = model_->NewEngine({});
  const int64_t D = model_->config.hidden_size;
  const AcceptingPrompt crafted = FindAcceptingPrompt(*engine);
  ASSERT_FALSE(crafted.prompt.empty());
  std::vector<BatchRequest> requests = GreedyRequests(8, 12);
  requests.insert(requests.begin(), BatchRequest{crafted.prompt, {}, 12, true, {}});
  for (size_t i = 0; i < requests.size(); ++i) {
    requests[i].sampling = crafted.sampling;
    requests[i].sampling.seed = 100 + i;
  }
  for (int k : {1, 2}) {
    auto spec = NewGenerator(engine.get(), true, k, false);
    BatchStats stats;
    auto got = spec->Generate(requests, &stats);
    ASSERT_TRUE(got.ok());
    std::printf("k=%d: %lld drafts, %lld accepted\n", k, static_cast<long long>(stats.drafted),
                static_cast<long long>(stats.accepted));
    ASSERT_GT(stats.accepted, 0) << "no accepted draft";
    ASSERT_GT(stats.drafted - stats.accepted, 0) << "no rejection to roll back";
    for (size_t i = 0; i < requests.size(); ++i) {
      std::vector<int32_t> seq = requests[i].prompt;
      for (int32_t t : Tokens((*got)[i])) seq.push_back(t);
      // The plain run: the prompt, then every generated token but the last, one at a time.
      const int64_t P = std::ssize(requests[i].prompt);
      auto ref = engine->NewCache();
      std::vector<float> hidden = testing::Run1(*engine, *ref, requests[i].prompt, false).hidden;
      for (int64_t pos = P; pos + 1 < std::ssize(seq); ++pos) {
        const SequenceOutput o = testing::Run1(*engine, *ref, {seq[pos]}, false);
        hidden.insert(hidden.end(), o.hidden.begin(), o.hidden.end());
      }
      const MlaKvCache& a = spec->cache(i);
      ASSERT_EQ(a.length(), ref->length()) << "prompt " << i;
      for (int layer = 0; layer < a.num_layers(); ++layer) {
        for (int64_t pos = 0; pos < a.length(); ++pos) {
          ASSERT_EQ(0, std::memcmp(a.Slot(layer, pos), ref->Slot(layer, pos),
                                   sizeof(float) * a.row_size()))
              << "k=" << k << " prompt " << i << " layer " << layer << " pos " << pos;
        }
      }
      // Teacher-forced MTP over the positions the module was fed: tokens t[1..M].
      const MlaKvCache& mtp = *spec->mtp_cache(i);
      const int64_t M = mtp.length();
      ASSERT_GE(M, P);
      auto ref_mtp = engine->NewMtpCache();
      MtpInput in{std::span<const int32_t>(seq).subspan(1, M),
                  std::span<const float>(hidden).first(M * D), ref_mtp.get(), false};
      ASSERT_TRUE(engine->ForwardMtp(std::span<const MtpInput>(&in, 1)).ok());
      for (int64_t pos = 0; pos < M; ++pos) {
        ASSERT_EQ(
            0, std::memcmp(mtp.Slot(0, pos), ref_mtp->Slot(0, pos), sizeof(float) * mtp.row_size()))
            << "k=" << k << " prompt " << i << " MTP pos " << pos;
      }
    }
  }
}

// The second generated token's distribution with temperature 1 and top-k 4, sampled with
// MTP (k = 1: token 2 is drafted and verified by rejection sampling), against the exact
// distribution computed from the model: P(t2) = sum_t1 P(t1) P(t2 | t1). The prompt is the
// first of 400 fixed random prompts whose exact acceptance probability
// sum_t1 P(t1) P(t2 = draft(t1) | t1) lies in [0.2, 0.8], so that both accepted and rejected
// drafts shape the sample (with a random model most drafts fall outside the top 4).
TEST_F(MtpGenerateTest, SampledDistributionWithMtpMatchesTheModel) {
  auto engine = model_->NewEngine({});
  const AcceptingPrompt crafted = FindAcceptingPrompt(*engine);
  ASSERT_FALSE(crafted.prompt.empty()) << "no prompt with a usable acceptance probability";
  BatchRequest r{crafted.prompt, crafted.sampling, 2, true, {}};
  const std::map<int32_t, double>& exact = crafted.second_token;
  const double acceptance = crafted.acceptance;
  auto spec = NewGenerator(engine.get(), true, 1, false);
  constexpr int kRounds = 40, kBatch = 100, kSamples = kRounds * kBatch;
  std::map<int32_t, int> seen;
  int64_t drafted = 0, accepted = 0;
  std::vector<BatchRequest> batch(kBatch, r);
  for (int round = 0; round < kRounds; ++round) {
    for (int i = 0; i < kBatch; ++i) batch[i].sampling.seed = round * 1000 + i + 1;
    BatchStats stats;
    auto got = spec->Generate(batch, &stats);
    ASSERT_TRUE(got.ok());
    for (const BatchResult& g : *got) ++seen[g.tokens[1].token];
    drafted += stats.drafted;
    accepted += stats.accepted;
  }
  EXPECT_EQ(drafted, kSamples);
  // Acceptance happens with probability p(draft): binomial, within 4.5 standard deviations.
  const double sd = std::sqrt(kSamples * acceptance * (1 - acceptance));
  EXPECT_NEAR(static_cast<double>(accepted), kSamples * acceptance, 4.5 * sd);
  const testing::ChiSquare chi = testing::ChiSquareGoodnessOfFit(seen, exact, kSamples);
  std::printf(
      "2nd token: %zu categories, chi2 = %.2f, df = %d, critical(0.001) = %.2f; "
      "accepted %lld of %lld drafts (exact acceptance %.3f)\n",
      exact.size(), chi.statistic, chi.df, chi.critical_001, static_cast<long long>(accepted),
      static_cast<long long>(drafted), acceptance);
  EXPECT_LT(chi.statistic, chi.critical_001);
}

}  // namespace
}  // namespace expertmesh
