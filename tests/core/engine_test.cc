// Properties of the reference engine on the committed random checkpoints: the naive and the
// absorbed MLA forms agree; prefill in chunks, decode steps, KV truncation and batching change
// no bit of a sequence's logits; the MTP module likewise; LocalExperts holds only its
// experts; bad inputs are errors that leave the caches as they were.
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "core/engine/layers.h"
#include "tests/core/engine_test_util.h"

namespace expertmesh::testing {
namespace {

std::vector<int32_t> Tokens(int n, int32_t vocab, int32_t salt) {
  std::vector<int32_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = (salt * 37 + i * 53 + 11) % vocab;
  return t;
}

std::vector<float> Rows(const std::vector<float>& logits, int64_t first, int64_t n, int64_t vocab) {
  return {logits.begin() + first * vocab, logits.begin() + (first + n) * vocab};
}

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    yarn_ = new LoadedModel(LoadedModel::Load("engine-yarn", true));
    mtp_ = new LoadedModel(LoadedModel::Load("engine-mtp", true));
  }
  static void TearDownTestSuite() {
    delete yarn_;
    delete mtp_;
  }
  static LoadedModel* yarn_;
  static LoadedModel* mtp_;
};
LoadedModel* EngineTest::yarn_ = nullptr;
LoadedModel* EngineTest::mtp_ = nullptr;

TEST_F(EngineTest, RopeMatchesTransformersYarnScaling) {
  // From transformers 5.23 for tests/data/engine-yarn/config.json (factor 4, mscale 0.8,
  // mscale_all_dim 0.6): rotary_emb.attention_scaling and self_attn.scaling.
  Rope rope(yarn_->config);
  EXPECT_NEAR(rope.attention_factor(), 1.0255968048489137, 1e-6);
  EXPECT_NEAR(rope.softmax_scale(), 0.16934749281137246, 1e-6);
  Rope plain(mtp_->config);  // rope_scaling null
  EXPECT_EQ(plain.attention_factor(), 1.0f);
  EXPECT_NEAR(plain.softmax_scale(), 1.0 / std::sqrt(48.0), 1e-7);
}

TEST_F(EngineTest, NaiveAndAbsorbedAttentionAgree) {
  const std::vector<int32_t> prompt = Tokens(19, 320, 1);
  // Float activations: the two forms differ only in summation order.
  // Measured max |logit diff| 1.1e-5 (logits of std ~3); tolerance 1e-4.
  for (bool quant : {false, true}) {
    LoadedModel m = LoadedModel::Load("engine-yarn", quant);
    auto naive = m.NewEngine({quant, AttentionForm::kNaive});
    auto absorbed = m.NewEngine({quant, AttentionForm::kAbsorbed});
    auto c1 = naive->NewCache();
    auto c2 = absorbed->NewCache();
    SequenceOutput a = Run1(*naive, *c1, prompt, true);
    SequenceOutput b = Run1(*absorbed, *c2, prompt, true);
    // Layer 0's cache rows are the same bits: both forms write c_kv and k_pe alike (later
    // layers see the slightly different attention outputs).
    for (int64_t pos = 0; pos < std::ssize(prompt); ++pos) {
      ASSERT_EQ(0, std::memcmp(c1->Slot(0, pos), c2->Slot(0, pos), c1->row_size() * sizeof(float)));
    }
    const float err = MaxAbsDiff(a.logits, b.logits);
    double err_sq = 0.0, ref_sq = 0.0;
    for (size_t i = 0; i < a.logits.size(); ++i) {
      err_sq += (a.logits[i] - b.logits[i]) * (a.logits[i] - b.logits[i]);
      ref_sq += a.logits[i] * a.logits[i];
    }
    std::printf("[ measured ] naive vs absorbed, act_quant=%d: max |logit diff| %.3g, NMSE %.3g\n",
                quant, err, err_sq / ref_sq);
    if (!quant) {
      EXPECT_LE(err, 1e-4f);
    } else {
      // With FP8 activations the naive form also quantizes c_kv before kv_b_proj (as
      // DeepSeek's naive mode does) and the absorbed form does not. Measured NMSE 0.0089 over
      // 19 positions; tolerance 0.1, the bound used against the float goldens.
      EXPECT_LE(err_sq / ref_sq, 0.1);
    }
  }
}

TEST_F(EngineTest, ChunkedPrefillAndDecodeEqualOnePrefillBitwise) {
  auto engine = yarn_->NewEngine({});
  const std::vector<int32_t> prompt = Tokens(14, 320, 2);
  auto full_cache = engine->NewCache();
  SequenceOutput full = Run1(*engine, *full_cache, prompt, true);
  auto cache = engine->NewCache();
  std::vector<float> chunked;
  int64_t begin = 0;
  for (int n : {5, 1, 6, 1, 1}) {
    std::vector<int32_t> chunk(prompt.begin() + begin, prompt.begin() + begin + n);
    SequenceOutput out = Run1(*engine, *cache, chunk, true);
    chunked.insert(chunked.end(), out.logits.begin(), out.logits.end());
    begin += n;
  }
  EXPECT_EQ(cache->length(), 14);
  EXPECT_EQ(chunked, full.logits);
}

TEST_F(EngineTest, TruncatedThenRefilledCacheEqualsAFreshRun) {
  for (AttentionForm form : {AttentionForm::kAbsorbed, AttentionForm::kNaive}) {
    auto engine = yarn_->NewEngine({true, form});
    const std::vector<int32_t> prompt = Tokens(12, 320, 3);
    const std::vector<int32_t> other = Tokens(5, 320, 4);
    auto cache = engine->NewCache();
    Run1(*engine, *cache, prompt, false);
    Run1(*engine, *cache, {7}, false);
    Run1(*engine, *cache, {8}, false);
    cache->Truncate(8);  // roll back rejected speculative tokens and part of the prompt
    EXPECT_EQ(cache->length(), 8);
    SequenceOutput refilled = Run1(*engine, *cache, other, true);

    std::vector<int32_t> fresh_tokens(prompt.begin(), prompt.begin() + 8);
    fresh_tokens.insert(fresh_tokens.end(), other.begin(), other.end());
    auto fresh_cache = engine->NewCache();
    SequenceOutput fresh = Run1(*engine, *fresh_cache, fresh_tokens, true);
    EXPECT_EQ(refilled.logits, Rows(fresh.logits, 8, 5, 320));
    EXPECT_EQ(refilled.hidden,
              std::vector<float>(fresh.hidden.begin() + 8 * 256, fresh.hidden.end()));
  }
}

TEST_F(EngineTest, ASequenceIsBitwiseTheSameAloneOrInABatch) {
  auto engine = yarn_->NewEngine({});
  const std::vector<int32_t> a = Tokens(9, 320, 5), b = Tokens(4, 320, 6), c = Tokens(13, 320, 7);
  // Alone: a prefill; b prefill then one decode token; c prefill.
  auto ca = engine->NewCache(), cb = engine->NewCache(), cc = engine->NewCache();
  SequenceOutput alone_a = Run1(*engine, *ca, a, true);
  Run1(*engine, *cb, b, false);
  SequenceOutput alone_b = Run1(*engine, *cb, {17}, true);
  SequenceOutput alone_c = Run1(*engine, *cc, c, false);
  // Batched: the same work in one forward (b's prefill done before, alone).
  auto ba = engine->NewCache(), bb = engine->NewCache(), bc = engine->NewCache();
  Run1(*engine, *bb, b, false);
  const std::vector<int32_t> b_next = {17};
  std::vector<SequenceInput> batch = {
      {c, bc.get(), false}, {a, ba.get(), true}, {b_next, bb.get(), true}};
  auto out = engine->Forward(batch);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[1].logits, alone_a.logits);
  EXPECT_EQ((*out)[1].hidden, alone_a.hidden);
  EXPECT_EQ((*out)[2].logits, alone_b.logits);
  EXPECT_EQ((*out)[0].logits, alone_c.logits);
  EXPECT_EQ((*out)[0].logits.size(), 320u);  // last position only
}

TEST_F(EngineTest, MtpIsChunkAndBatchInvariant) {
  auto engine = mtp_->NewEngine({});
  const int64_t D = mtp_->config.hidden_size;
  const std::vector<int32_t> prompt = Tokens(10, 256, 8);
  auto cache = engine->NewCache();
  SequenceOutput main = Run1(*engine, *cache, prompt, true);
  ASSERT_EQ(std::ssize(main.hidden), 10 * D);
  std::vector<int32_t> next(prompt.begin() + 1, prompt.end());  // 9 MTP positions
  auto whole_cache = engine->NewMtpCache();
  MtpInput whole{next, std::span<const float>(main.hidden.data(), 9 * D), whole_cache.get(), true};
  auto all = engine->ForwardMtp(std::span<const MtpInput>(&whole, 1));
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(std::ssize((*all)[0].logits), 9 * 256);
  // The same positions in two chunks, the second batched with an unrelated sequence.
  auto chunk_cache = engine->NewMtpCache(), other_cache = engine->NewMtpCache();
  std::vector<int32_t> first(next.begin(), next.begin() + 4), rest(next.begin() + 4, next.end());
  MtpInput in1{first, std::span<const float>(main.hidden.data(), 4 * D), chunk_cache.get(), true};
  auto out1 = engine->ForwardMtp(std::span<const MtpInput>(&in1, 1));
  ASSERT_TRUE(out1.ok());
  const std::vector<int32_t> other_tokens = {3, 4};
  std::vector<MtpInput> batch = {
      {other_tokens, std::span<const float>(main.hidden.data(), 2 * D), other_cache.get(), true},
      {rest, std::span<const float>(main.hidden.data() + 4 * D, 5 * D), chunk_cache.get(), true}};
  auto out2 = engine->ForwardMtp(batch);
  ASSERT_TRUE(out2.ok());
  std::vector<float> chunked = (*out1)[0].logits;
  chunked.insert(chunked.end(), (*out2)[1].logits.begin(), (*out2)[1].logits.end());
  EXPECT_EQ(chunked, (*all)[0].logits);
}

void MtpLastRowOnlyCase(Engine& engine);

// Without all_logits the MTP module carries only each sequence's last row through its layer
// (the others only fill the cache): the last row's logits and hidden state, and the cache, are
// those of the full computation, bit for bit.
TEST_F(EngineTest, MtpLastRowOnlyEqualsTheFullComputation) {
  for (const EngineOptions& options :
       {EngineOptions{}, EngineOptions{true, AttentionForm::kAbsorbed, LinearKernel::kReference},
        EngineOptions{true, AttentionForm::kNaive, LinearKernel::kSimd}}) {
    SCOPED_TRACE(options.attention == AttentionForm::kNaive ? "naive" : "absorbed");
    MtpLastRowOnlyCase(*mtp_->NewEngine(options));
  }
}

void MtpLastRowOnlyCase(Engine& e) {
  Engine* engine = &e;
  const int64_t D = engine->model().config().hidden_size;
  const std::vector<int32_t> prompt = Tokens(10, 256, 9);
  auto cache = engine->NewCache();
  SequenceOutput main = Run1(*engine, *cache, prompt, true);
  const std::vector<int32_t> next(prompt.begin() + 1, prompt.end());
  const std::vector<int32_t> other = {7, 8, 9};
  auto full_a = engine->NewMtpCache(), full_b = engine->NewMtpCache();
  auto last_a = engine->NewMtpCache(), last_b = engine->NewMtpCache();
  const std::span<const float> ha(main.hidden.data(), 9 * D), hb(main.hidden.data(), 3 * D);
  std::vector<MtpInput> full = {{next, ha, full_a.get(), true}, {other, hb, full_b.get(), true}};
  std::vector<MtpInput> last = {{next, ha, last_a.get(), false}, {other, hb, last_b.get(), false}};
  auto f = engine->ForwardMtp(full);
  auto l = engine->ForwardMtp(last);
  ASSERT_TRUE(f.ok() && l.ok());
  const int64_t V = engine->model().config().vocab_size;
  for (int b = 0; b < 2; ++b) {
    const auto& fo = (*f)[b];
    const auto& lo = (*l)[b];
    ASSERT_EQ(std::ssize(lo.logits), V);
    ASSERT_EQ(std::ssize(lo.hidden), D);
    EXPECT_EQ(lo.logits, std::vector<float>(fo.logits.end() - V, fo.logits.end())) << b;
    EXPECT_EQ(lo.hidden, std::vector<float>(fo.hidden.end() - D, fo.hidden.end())) << b;
  }
  for (auto [a, b] : {std::pair{full_a.get(), last_a.get()}, {full_b.get(), last_b.get()}}) {
    ASSERT_EQ(a->length(), b->length());
    for (int64_t pos = 0; pos < a->length(); ++pos) {
      const float* x = a->Slot(0, pos);
      const float* y = b->Slot(0, pos);
      EXPECT_TRUE(std::equal(x, x + a->row_size(), y)) << "position " << pos;
    }
  }
}

TEST_F(EngineTest, BadInputsAreErrorsAndLeaveCachesUnchanged) {
  auto engine = yarn_->NewEngine({});
  auto cache = engine->NewCache();
  Run1(*engine, *cache, {1, 2, 3}, false);
  const std::vector<int32_t> bad = {4, 320};
  SequenceInput in{bad, cache.get(), false};
  auto out = engine->Forward(std::span<const SequenceInput>(&in, 1));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache->length(), 3);
  // A bounded cache that cannot take the tokens: ResourceExhausted, the other caches of the
  // batch rolled back.
  auto small = *ContiguousKvCache::Create(3, 144, 16, /*max_length=*/4);
  auto roomy = engine->NewCache();
  const std::vector<int32_t> five = {1, 2, 3, 4, 5};
  std::vector<SequenceInput> batch = {{five, roomy.get(), false}, {five, small.get(), false}};
  auto out2 = engine->Forward(batch);
  EXPECT_EQ(out2.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(roomy->length(), 0);
  EXPECT_EQ(small->length(), 0);
  // A model with MoE layers needs experts.
  EXPECT_FALSE(Engine::Create(*yarn_->model, nullptr).ok());
}

TEST_F(EngineTest, LocalExpertsHoldOnlyTheirExperts) {
  const ModelConfig& c = yarn_->config;
  const std::vector<LayerExpert> mine = {{2, 1}, {2, 4}, {2, 7}};
  auto some = LocalExperts::Create(*yarn_->ckpt, c, mine);
  ASSERT_TRUE(some.ok()) << some.status();
  EXPECT_TRUE((*some)->Holds(2, 4));
  EXPECT_FALSE((*some)->Holds(2, 0));
  EXPECT_FALSE((*some)->Holds(1, 4));
  // Each expert: 3 FP8 [64 x 256] / [256 x 64] weights + their scale_inv blocks.
  EXPECT_EQ((*some)->bytes_mapped(), 3u * 3u * (64 * 256 + 2 * 4));
  EXPECT_EQ(yarn_->experts->bytes_mapped(), 3u * 9u * (64 * 256 + 2 * 4));
  EXPECT_EQ(AllExperts(c).size(), 9u);  // one MoE layer (2) of 9 experts
  EXPECT_FALSE(LocalExperts::Create(*yarn_->ckpt, c, std::vector<LayerExpert>{{1, 0}}).ok());

  // Rows routed to held experts: the same result as with every expert loaded.
  const int64_t D = c.hidden_size;
  std::vector<float> x(2 * D);
  for (int64_t i = 0; i < 2 * D; ++i) x[i] = std::sin(0.37f * i);
  QuantizedActivations q = QuantizeActivations(x, 2, D);
  ExpertRoutes routes;
  routes.AddRow(std::vector<int32_t>{1, 7}, std::vector<float>{0.5f, 1.25f});
  routes.AddRow(std::vector<int32_t>{4}, std::vector<float>{2.0f});
  std::vector<float> got(2 * D), want(2 * D);
  ASSERT_TRUE((*some)->Run(2, q, routes, got).ok());
  ASSERT_TRUE(yarn_->experts->Run(2, q, routes, want).ok());
  EXPECT_EQ(got, want);
  // Row independence: row 1 alone gives the same bits.
  ExpertRoutes one;
  one.AddRow(std::vector<int32_t>{4}, std::vector<float>{2.0f});
  QuantizedActivations q1 = QuantizeActivations(std::span<const float>(x).subspan(D), 1, D);
  std::vector<float> row(D);
  ASSERT_TRUE((*some)->Run(2, q1, one, row).ok());
  EXPECT_EQ(row, std::vector<float>(got.begin() + D, got.end()));
  // An expert not held: InvalidArgument.
  ExpertRoutes foreign;
  foreign.AddRow(std::vector<int32_t>{0}, std::vector<float>{1.0f});
  std::vector<float> out1(D);
  EXPECT_EQ((*some)->Run(2, q1, foreign, out1).code(), absl::StatusCode::kInvalidArgument);
}

TEST(LocalExpertsMapping, AShardMapsOnlyItsExpertsBytes) {
  // A fresh checkpoint: LocalExperts for one expert maps that expert's pages and nothing else.
  auto ckpt = Checkpoint::Open(EngineDataDir("engine-yarn"));
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto config = LoadModelConfig(EngineDataDir("engine-yarn") + "/config.json");
  ASSERT_TRUE(config.ok());
  const std::vector<LayerExpert> one = {{2, 3}};
  auto experts = LocalExperts::Create(**ckpt, *config, one);
  ASSERT_TRUE(experts.ok()) << experts.status();
  const uint64_t expert_bytes = (*experts)->bytes_mapped();  // 3 x (64 x 256 FP8 + 2 scales)
  // Whole pages around each of the 6 tensors: at most one extra page on each side.
  EXPECT_GE((*ckpt)->bytes_mapped(), expert_bytes);
  EXPECT_LE((*ckpt)->bytes_mapped(), expert_bytes + 6 * 2 * 4096);
  EXPECT_LT((*ckpt)->bytes_mapped(), (*ckpt)->total_bytes() / 10);
}

TEST(KvCacheTest, ExtendTruncateAndBounds) {
  auto cache = *ContiguousKvCache::Create(2, 4, 2, /*max_length=*/3);
  EXPECT_EQ(cache->row_size(), 6);
  ASSERT_TRUE(cache->Extend(2).ok());
  cache->Slot(1, 1)[5] = 42.0f;
  EXPECT_EQ(cache->Extend(2).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(cache->length(), 2);
  ASSERT_TRUE(cache->Extend(1).ok());
  EXPECT_EQ(cache->Slot(1, 1)[5], 42.0f);
  cache->Truncate(1);
  EXPECT_EQ(cache->length(), 1);
  ASSERT_TRUE(cache->Extend(1).ok());
  EXPECT_EQ(cache->Slot(1, 1)[5], 0.0f);  // a truncated slot comes back cleared
  EXPECT_FALSE(ContiguousKvCache::Create(0, 4, 2).ok());
}

}  // namespace
}  // namespace expertmesh::testing
