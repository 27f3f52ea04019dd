// The attention service's parts in one process, with every expert local (LocalExperts):
// the paged KV cache gives the engine bitwise the same logits as the contiguous one, and the
// continuous-batching scheduler -- sequences joining at step boundaries, long prompts
// prefilled in chunks, sequences waiting for KV blocks -- produces for each sequence exactly
// the reference engine's greedy tokens. Cancellation and admission limits free and bound
// resources as specified.
#include <cstdio>
#include <filesystem>
#include <thread>

#include "attention-service/attention_service.h"
#include "attention-service/kv_block_pool.h"
#include "attention-service/paged_kv_cache.h"
#include "attention-service/scheduler.h"
#include "core/decode/sampling.h"
#include "core/engine/engine.h"
#include "core/format/safetensors.h"
#include "core/model/local_experts.h"
#include "core/model/model.h"
#include "gtest/gtest.h"
#include "tests/cluster/cluster_test_util.h"
#include "tests/common/metrics_text.h"

namespace expertmesh::attention {
namespace {

// Reads a stream to its end: the final event; its tokens appended to `tokens`. An error event
// when nothing arrives for `timeout`.
SequenceEvent DrainStream(SequenceStream& s, std::vector<int32_t>* tokens, absl::Duration timeout) {
  while (true) {
    std::optional<SequenceEvent> e = s.Next(timeout);
    if (!e.has_value())
      return SequenceEvent{{}, FinishReason::kError, absl::DeadlineExceededError("no event")};
    for (const GeneratedToken& t : e->tokens) tokens->push_back(t.token);
    if (e->finish != FinishReason::kNone) return *e;
  }
}

class SchedulerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> dir = expertmesh::testing::MakeClusterTestModel();
    ASSERT_TRUE(dir.ok()) << dir.status();
    model_dir_ = new std::string(*dir);
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*model_dir_);
    delete model_dir_;
  }
  void SetUp() override {
    absl::StatusOr<ModelConfig> config = LoadModelConfig(*model_dir_ + "/config.json");
    ASSERT_TRUE(config.ok());
    config_ = *config;
    absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(*model_dir_);
    ASSERT_TRUE(ckpt.ok());
    ckpt_ = *std::move(ckpt);
    ModelLoadOptions load;
    load.load_mtp = false;
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Create(*ckpt_, config_, load);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);
    absl::StatusOr<std::unique_ptr<LocalExperts>> experts =
        LocalExperts::Create(*ckpt_, config_, AllExperts(config_));
    ASSERT_TRUE(experts.ok()) << experts.status();
    experts_ = *std::move(experts);
  }
  // Reads a stream to its end.
  static SequenceEvent Drain(SequenceStream& s, std::vector<int32_t>* tokens) {
    return DrainStream(s, tokens, absl::Seconds(60));
  }
  SequenceRequest Greedy(const std::string& id, const std::vector<int32_t>& prompt,
                         int max_tokens) {
    SequenceRequest r;
    r.request_id = id;
    r.prompt = prompt;
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    return r;
  }

  static std::string* model_dir_;
  ModelConfig config_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<LocalExperts> experts_;
};
std::string* SchedulerTest::model_dir_ = nullptr;

// The value of a series in a registry's exposition (-1 when absent).
double MetricValue(const MetricsRegistry& metrics, const std::string& name) {
  return expertmesh::testing::MetricValue(metrics.RenderText(), name);
}

// Submits every request, drains every stream; the tokens of each, in order.
std::vector<std::vector<int32_t>> RunAll(Scheduler& s, const std::vector<SequenceRequest>& reqs) {
  std::vector<std::shared_ptr<SequenceStream>> streams;
  for (const SequenceRequest& r : reqs) {
    absl::StatusOr<std::shared_ptr<SequenceStream>> st = s.Submit(r);
    EXPECT_TRUE(st.ok()) << st.status();
    if (!st.ok()) return {};
    streams.push_back(*st);
  }
  std::vector<std::vector<int32_t>> out;
  for (auto& st : streams) {
    std::vector<int32_t> tokens;
    const SequenceEvent last = DrainStream(*st, &tokens, absl::Seconds(120));
    EXPECT_EQ(last.finish, FinishReason::kLength) << last.error;
    out.push_back(std::move(tokens));
  }
  return out;
}

TEST(KvBlockPoolTest, AllocatesAllOrNothingLowestFirstAndFrees) {
  absl::StatusOr<std::unique_ptr<KvBlockPool>> pool = KvBlockPool::Create(8, 4, 2, 3);
  ASSERT_TRUE(pool.ok());
  KvBlockPool& p = **pool;
  EXPECT_EQ(p.BlocksFor(9), 3);
  std::optional<std::vector<int32_t>> a = p.Allocate(3);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(*a, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_FALSE(p.Allocate(6).has_value());  // only 5 free: nothing taken
  EXPECT_EQ(p.used_blocks(), 3);
  std::optional<std::vector<int32_t>> b = p.Allocate(5);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(p.free_blocks(), 0);
  p.Free(*a);
  EXPECT_EQ(p.used_blocks(), 5);
  EXPECT_EQ(*p.Allocate(2), (std::vector<int32_t>{0, 1}));
  // Distinct slots for distinct (block, layer, offset).
  EXPECT_NE(p.Slot(0, 0, 0), p.Slot(0, 1, 0));
  EXPECT_EQ(p.Slot(1, 0, 0) - p.Slot(0, 0, 0), 2 * 4 * 3);
  EXPECT_FALSE(KvBlockPool::Create(0, 4, 2, 3).ok());
}

TEST(KvBlockPoolTest, PrefixCacheSharesRefcountsAndEvictsOnlyUnheldBlocksLru) {
  absl::StatusOr<std::unique_ptr<KvBlockPool>> pool = KvBlockPool::Create(4, 2, 1, 3, true, 1);
  ASSERT_TRUE(pool.ok());
  KvBlockPool& p = **pool;
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6};
  const uint64_t h0 = KvBlockPool::ChainHash(0, std::span<const int32_t>(tokens).subspan(0, 2));
  const uint64_t h1 = KvBlockPool::ChainHash(h0, std::span<const int32_t>(tokens).subspan(2, 2));
  EXPECT_NE(h0, KvBlockPool::ChainHash(0, std::span<const int32_t>(tokens).subspan(2, 2)));
  std::vector<int32_t> a = *p.Allocate(2);  // blocks 0, 1
  p.Register(a[0], h0, std::nullopt);
  p.Register(a[1], h1, /*mtp_next=*/5);
  EXPECT_EQ(p.cached_blocks(), 2);
  // A second holder of the prefix: shared, one more reference.
  std::optional<int32_t> b0 = p.Acquire(h0);
  ASSERT_TRUE(b0.has_value());
  EXPECT_EQ(*b0, a[0]);
  EXPECT_EQ(p.shared_blocks(), 1);
  // MTP rows count only when registered as final, with the same next token.
  EXPECT_FALSE(p.MtpRowsValid(a[0], 3));
  EXPECT_FALSE(p.MtpRowsValid(a[1], 9));
  EXPECT_TRUE(p.MtpRowsValid(a[1], 5));
  std::optional<int32_t> b1 = p.Acquire(h1);
  ASSERT_TRUE(b1.has_value());
  EXPECT_EQ(p.used_blocks(), 2);
  p.Free(a);  // the first holder leaves: the blocks stay held by the second
  EXPECT_EQ(p.used_blocks(), 2);
  EXPECT_EQ(p.shared_blocks(), 0);
  // Pressure: 2 free blocks; a request for 3 cannot evict held blocks.
  EXPECT_EQ(p.free_blocks(), 2);
  EXPECT_FALSE(p.Allocate(3).has_value());
  // Released, the cached blocks become evictable, least recently released first.
  p.Free(std::vector<int32_t>{*b1});
  p.Free(std::vector<int32_t>{*b0});
  EXPECT_EQ(p.used_blocks(), 0);
  EXPECT_EQ(p.free_blocks(), 4);
  std::vector<int32_t> c = *p.Allocate(3);  // blocks 2, 3, then evicts block 1 (h1)
  EXPECT_EQ(c, (std::vector<int32_t>{2, 3, a[1]}));
  EXPECT_FALSE(p.Acquire(h1).has_value());
  EXPECT_TRUE(p.Acquire(h0).has_value());  // still cached
  EXPECT_EQ(p.cached_blocks(), 1);
}

TEST_F(SchedulerTest, PreemptionUnderKvPressureKeepsTheGreedyTokens) {
  // 8 sequences of up to 40 + 16 tokens in a pool of 32 blocks of 4 tokens: every sequence
  // fits alone, but they cannot all grow at once: some are preempted and recomputed.
  constexpr int kMaxTokens = 16;
  const std::vector<std::vector<int32_t>> prompts =
      expertmesh::testing::MakePrompts(8, 40, static_cast<int>(config_.vocab_size), 11);
  absl::StatusOr<std::vector<std::vector<int32_t>>> want =
      expertmesh::testing::ReferenceGreedy(*model_dir_, prompts, kMaxTokens);
  ASSERT_TRUE(want.ok()) << want.status();
  SchedulerOptions o;
  o.kv_blocks = 32;
  o.kv_block_size = 4;
  o.max_batch = 8;
  o.prefill_chunk = 16;
  o.prefix_caching = false;  // every recomputation computes
  MetricsRegistry metrics;
  absl::StatusOr<std::unique_ptr<Scheduler>> s =
      Scheduler::Create(model_.get(), experts_.get(), o, &metrics);
  ASSERT_TRUE(s.ok()) << s.status();
  std::vector<SequenceRequest> reqs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    reqs.push_back(Greedy("p" + std::to_string(i), prompts[i], kMaxTokens));
  }
  EXPECT_EQ(RunAll(**s, reqs), *want);
  EXPECT_GT(MetricValue(metrics, "expertmesh_attention_preemptions_total"), 0);
  EXPECT_EQ((*s)->Load().kv_blocks_used, 0);
}

TEST_F(SchedulerTest, PrefixCacheComputesASharedPromptOnceAndKeepsTheTokens) {
  constexpr int kMaxTokens = 6;
  constexpr int kRequests = 64;
  const int32_t V = static_cast<int32_t>(config_.vocab_size);
  std::vector<int32_t> system;  // 48 tokens: 6 full blocks of 8
  for (int32_t j = 0; j < 48; ++j) system.push_back(2 + (j * 37 + 11) % (V - 2));
  std::vector<std::vector<int32_t>> prompts;
  int64_t user_tokens = 0;
  for (int32_t i = 0; i < kRequests; ++i) {
    std::vector<int32_t> p = system;
    p.push_back(2 + i);  // a distinct user part: its first token differs
    for (int32_t j = 1; j < 6; ++j) p.push_back(2 + (i * 13 + j * 29) % (V - 2));
    user_tokens += 6;
    prompts.push_back(std::move(p));
  }
  absl::StatusOr<std::vector<std::vector<int32_t>>> want =
      expertmesh::testing::ReferenceGreedy(*model_dir_, prompts, kMaxTokens);
  ASSERT_TRUE(want.ok()) << want.status();
  SchedulerOptions o;
  o.kv_blocks = 256;
  o.kv_block_size = 8;
  o.max_batch = 64;
  MetricsRegistry metrics;
  absl::StatusOr<std::unique_ptr<Scheduler>> s =
      Scheduler::Create(model_.get(), experts_.get(), o, &metrics);
  ASSERT_TRUE(s.ok()) << s.status();
  std::vector<SequenceRequest> reqs;
  for (int i = 0; i < kRequests; ++i) {
    reqs.push_back(Greedy("c" + std::to_string(i), prompts[i], kMaxTokens));
  }
  // The first request computes the system prompt; the other 63 find it cached.
  std::vector<std::vector<int32_t>> got = RunAll(**s, {reqs[0]});
  std::vector<std::vector<int32_t>> rest =
      RunAll(**s, std::vector<SequenceRequest>(reqs.begin() + 1, reqs.end()));
  got.insert(got.end(), rest.begin(), rest.end());
  EXPECT_EQ(got, *want);  // identical to the engine without any cache
  const double computed = MetricValue(metrics, "expertmesh_attention_prompt_tokens_total");
  const double hits = MetricValue(metrics, "expertmesh_attention_prefix_cache_hits_tokens_total");
  // The 48-token system prompt is 6 full blocks: computed once, then found 63 times.
  EXPECT_EQ(hits, 63.0 * 48);
  EXPECT_EQ(computed, 48.0 + static_cast<double>(user_tokens));
  EXPECT_GT(MetricValue(metrics, "expertmesh_attention_kv_blocks_cached"), 0);
  EXPECT_EQ((*s)->Load().kv_blocks_used, 0);
}

TEST_F(SchedulerTest, WaitingSequencesStartInPriorityOrder) {
  SchedulerOptions o;
  o.kv_blocks = 64;
  o.kv_block_size = 4;
  o.max_batch = 1;  // one at a time: the order of admission is the order of first tokens
  absl::StatusOr<std::unique_ptr<Scheduler>> s =
      Scheduler::Create(model_.get(), experts_.get(), o, nullptr);
  ASSERT_TRUE(s.ok());
  absl::StatusOr<std::shared_ptr<SequenceStream>> a = (*s)->Submit(Greedy("a", {5, 6, 7}, 24));
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE((*a)->Next(absl::Seconds(60)).has_value());  // A runs; B and C wait
  // B is long enough (200 steps) that it cannot also run to its end between C's last token
  // and the Load() below on a loaded machine (with 4 tokens it did, 1 run in 12 under load).
  SequenceRequest late = Greedy("b", {5, 6}, 200);
  late.priority = 5;
  SequenceRequest urgent = Greedy("c", {7, 8}, 4);
  urgent.priority = -1;
  absl::StatusOr<std::shared_ptr<SequenceStream>> b = (*s)->Submit(late);
  absl::StatusOr<std::shared_ptr<SequenceStream>> c = (*s)->Submit(urgent);
  ASSERT_TRUE(b.ok() && c.ok());
  std::vector<int32_t> ta, tb, tc;
  EXPECT_EQ(Drain(**a, &ta).finish, FinishReason::kLength);
  // C, submitted after B with a lower priority value, runs (and ends) first: when C has
  // finished, B has not (max_batch 1: B starts only after C).
  EXPECT_EQ(Drain(**c, &tc).finish, FinishReason::kLength);
  EXPECT_EQ((*s)->Load().waiting + (*s)->Load().running, 1);
  EXPECT_EQ(Drain(**b, &tb).finish, FinishReason::kLength);
  EXPECT_EQ(tb.size(), 200u);
  EXPECT_EQ(tc.size(), 4u);
}

TEST_F(SchedulerTest, PagedCacheGivesBitwiseTheContiguousLogits) {
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(*model_, experts_.get());
  ASSERT_TRUE(engine.ok());
  absl::StatusOr<std::unique_ptr<KvBlockPool>> pool = KvBlockPool::Create(
      16, 4, config_.num_hidden_layers, config_.kv_lora_rank + config_.qk_rope_head_dim);
  ASSERT_TRUE(pool.ok());
  // Take a block first so the sequence's blocks are not 0..n-1 (a real block table).
  std::optional<std::vector<int32_t>> hole = (*pool)->Allocate(1);
  absl::StatusOr<std::unique_ptr<PagedKvCache>> paged = PagedKvCache::Create(pool->get(), 30);
  ASSERT_TRUE(paged.ok());
  EXPECT_EQ((*paged)->block_table().front(), 1);
  std::unique_ptr<ContiguousKvCache> contiguous = (*engine)->NewCache();

  const std::vector<int32_t> prompt = {5, 17, 33, 250, 9, 71, 2, 300, 41, 8, 99};  // spans blocks
  std::vector<int32_t> next_paged = prompt, next_contiguous = prompt;
  for (int step = 0; step < 6; ++step) {
    SequenceInput a{next_paged, paged->get(), false};
    SequenceInput b{next_contiguous, contiguous.get(), false};
    absl::StatusOr<std::vector<SequenceOutput>> oa = (*engine)->Forward({&a, 1});
    absl::StatusOr<std::vector<SequenceOutput>> ob = (*engine)->Forward({&b, 1});
    ASSERT_TRUE(oa.ok() && ob.ok());
    ASSERT_EQ((*oa)[0].logits, (*ob)[0].logits) << "step " << step;
    next_paged = next_contiguous = {Argmax((*oa)[0].logits)};
  }
  EXPECT_EQ((*paged)->length(), contiguous->length());
  // Beyond the reserved capacity (30 tokens -> 8 blocks of 4 = 32 slots) Extend fails.
  EXPECT_FALSE((*paged)->Extend(32 - (*paged)->length() + 1).ok());
  const int64_t used = (*pool)->used_blocks();
  paged->reset();
  EXPECT_EQ((*pool)->used_blocks(), used - 8);
}

TEST_F(SchedulerTest, ContinuousBatchingReproducesTheReferenceEngine) {
  // 12 prompts up to 40 tokens, prefill chunks of 8 tokens, at most 5 sequences per step,
  // and a KV pool too small to hold every sequence at once: sequences join and leave the
  // batch at many different steps, and wait for KV blocks.
  constexpr int kMaxTokens = 12;
  const std::vector<std::vector<int32_t>> prompts =
      expertmesh::testing::MakePrompts(12, 40, static_cast<int>(config_.vocab_size), 7);
  absl::StatusOr<std::vector<std::vector<int32_t>>> want =
      expertmesh::testing::ReferenceGreedy(*model_dir_, prompts, kMaxTokens);
  ASSERT_TRUE(want.ok()) << want.status();

  SchedulerOptions o;
  o.kv_blocks = 16;  // 4-token blocks: 64 slots; a long sequence needs up to 13 blocks
  o.kv_block_size = 4;
  o.max_batch = 5;
  o.max_waiting = 64;
  o.prefill_chunk = 8;
  MetricsRegistry metrics;
  absl::StatusOr<std::unique_ptr<Scheduler>> s =
      Scheduler::Create(model_.get(), experts_.get(), o, &metrics);
  ASSERT_TRUE(s.ok()) << s.status();
  std::vector<std::shared_ptr<SequenceStream>> streams;
  for (size_t i = 0; i < prompts.size(); ++i) {
    absl::StatusOr<std::shared_ptr<SequenceStream>> st =
        (*s)->Submit(Greedy("seq" + std::to_string(i), prompts[i], kMaxTokens));
    ASSERT_TRUE(st.ok()) << st.status();
    streams.push_back(*st);
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::vector<int32_t> got;
    SequenceEvent last = Drain(*streams[i], &got);
    EXPECT_EQ(last.finish, FinishReason::kLength) << last.error;
    EXPECT_EQ(last.completion_tokens, kMaxTokens);
    EXPECT_EQ(got, (*want)[i]) << "sequence " << i << " (prompt of " << prompts[i].size()
                               << " tokens)";
  }
  const SchedulerLoad load = (*s)->Load();
  EXPECT_EQ(load.kv_blocks_used, 0);
  EXPECT_EQ(load.running + load.waiting, 0);
  // Several steps ran with more than one sequence in the batch.
  EXPECT_NE(metrics.RenderText().find("expertmesh_attention_step_tokens_count"), std::string::npos);
}

// Ping-pong micro-batches (2 and 3, each micro-batch at least 1 row): sequences of different
// prompt lengths prefilled in chunks and decoded, split over micro-batches whose forwards
// overlap: every sequence's greedy tokens are still the reference engine's.
TEST_F(SchedulerTest, MicroBatchesReproduceTheReferenceEngine) {
  constexpr int kMaxTokens = 10;
  const std::vector<std::vector<int32_t>> prompts =
      expertmesh::testing::MakePrompts(10, 40, static_cast<int>(config_.vocab_size), 9);
  absl::StatusOr<std::vector<std::vector<int32_t>>> want =
      expertmesh::testing::ReferenceGreedy(*model_dir_, prompts, kMaxTokens);
  ASSERT_TRUE(want.ok()) << want.status();
  for (int k : {2, 3}) {
    SCOPED_TRACE(::testing::Message() << k << " micro-batches");
    SchedulerOptions o;
    o.kv_blocks = 256;
    o.kv_block_size = 4;
    o.max_batch = 10;
    o.prefill_chunk = 8;
    o.micro_batches = k;
    o.micro_batch_min_rows = 1;
    MetricsRegistry metrics;
    absl::StatusOr<std::unique_ptr<Scheduler>> s =
        Scheduler::Create(model_.get(), experts_.get(), o, &metrics);
    ASSERT_TRUE(s.ok()) << s.status();
    std::vector<SequenceRequest> reqs;
    for (size_t i = 0; i < prompts.size(); ++i) {
      reqs.push_back(Greedy("mb" + std::to_string(i), prompts[i], kMaxTokens));
    }
    const std::vector<std::vector<int32_t>> got = RunAll(**s, reqs);
    ASSERT_EQ(got.size(), prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(got[i], (*want)[i]) << "sequence " << i;
    EXPECT_EQ((*s)->Load().kv_blocks_used, 0);
    // Steps were split: more micro-batches than steps were run.
    const double steps = MetricValue(metrics, "expertmesh_attention_step_micro_batches_count");
    const double parts = MetricValue(metrics, "expertmesh_attention_step_micro_batches_sum");
    EXPECT_GT(steps, 0);
    EXPECT_GT(parts, steps);
  }
  SchedulerOptions bad;
  bad.micro_batches = 9;
  EXPECT_EQ(Scheduler::Create(model_.get(), experts_.get(), bad, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad.micro_batches = 2;
  bad.micro_batch_experts = {experts_.get()};  // one for two micro-batches
  EXPECT_EQ(Scheduler::Create(model_.get(), experts_.get(), bad, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SchedulerTest, CancelFreesKvBlocksAndFinishesCancelled) {
  SchedulerOptions o;
  o.kv_blocks = 64;
  o.kv_block_size = 4;
  absl::StatusOr<std::unique_ptr<Scheduler>> s =
      Scheduler::Create(model_.get(), experts_.get(), o, nullptr);
  ASSERT_TRUE(s.ok());
  absl::StatusOr<std::shared_ptr<SequenceStream>> st = (*s)->Submit(Greedy("long", {5, 6, 7}, 200));
  ASSERT_TRUE(st.ok());
  // First token: the sequence is running and holds the blocks it has used so far (KV on
  // demand: not the 51 blocks of 3 + 200 tokens).
  std::optional<SequenceEvent> first = (*st)->Next(absl::Seconds(60));
  ASSERT_TRUE(first.has_value());
  EXPECT_GE((*s)->Load().kv_blocks_used, 1);
  EXPECT_LT((*s)->Load().kv_blocks_used, 51);
  EXPECT_TRUE((*s)->Cancel("long"));
  std::vector<int32_t> rest;
  SequenceEvent last = Drain(**st, &rest);
  EXPECT_EQ(last.finish, FinishReason::kCancelled);
  EXPECT_LT(last.completion_tokens, 200);
  EXPECT_EQ((*s)->Load().kv_blocks_used, 0);  // freed before the finish event was pushed
  EXPECT_FALSE((*s)->Cancel("long"));         // no longer live
}

TEST_F(SchedulerTest, ExpiredSequencesEndWithDeadlineExceeded) {
  SchedulerOptions o;
  o.kv_blocks = 64;
  o.kv_block_size = 4;
  absl::StatusOr<std::unique_ptr<Scheduler>> s =
      Scheduler::Create(model_.get(), experts_.get(), o, nullptr);
  ASSERT_TRUE(s.ok());
  SequenceRequest r = Greedy("late", {5, 6, 7}, 50);
  r.deadline = absl::InfinitePast();  // expired before its first step
  absl::StatusOr<std::shared_ptr<SequenceStream>> st = (*s)->Submit(r);
  ASSERT_TRUE(st.ok());
  std::vector<int32_t> tokens;
  SequenceEvent last = Drain(**st, &tokens);
  EXPECT_EQ(last.finish, FinishReason::kError);
  EXPECT_EQ(last.error.code(), absl::StatusCode::kDeadlineExceeded) << last.error;
  EXPECT_TRUE(tokens.empty());
  EXPECT_EQ((*s)->Load().kv_blocks_used, 0);
}

TEST_F(SchedulerTest, RejectsWhatCannotFitAndBoundsTheQueue) {
  SchedulerOptions o;
  o.kv_blocks = 4;
  o.kv_block_size = 4;  // 16 slots in all
  o.max_batch = 1;
  o.max_waiting = 1;
  absl::StatusOr<std::unique_ptr<Scheduler>> s =
      Scheduler::Create(model_.get(), experts_.get(), o, nullptr);
  ASSERT_TRUE(s.ok());
  // Never fits the pool: RESOURCE_EXHAUSTED at once.
  EXPECT_EQ((*s)->Submit(Greedy("big", {5, 6, 7}, 20)).status().code(),
            absl::StatusCode::kResourceExhausted);
  // A holds every block once running; B waits; C finds the queue full.
  absl::StatusOr<std::shared_ptr<SequenceStream>> a = (*s)->Submit(Greedy("a", {5, 6}, 14));
  ASSERT_TRUE(a.ok());
  std::vector<int32_t> ta, tb;
  std::optional<SequenceEvent> a_first = (*a)->Next(absl::Seconds(60));  // A is running now
  ASSERT_TRUE(a_first.has_value());
  for (const GeneratedToken& t : a_first->tokens) ta.push_back(t.token);
  absl::StatusOr<std::shared_ptr<SequenceStream>> b = (*s)->Submit(Greedy("b", {5, 6}, 14));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ((*s)->Submit(Greedy("b", {5}, 2)).status().code(),
            absl::StatusCode::kResourceExhausted);  // queue full (checked before duplicates)
  EXPECT_EQ((*s)->Load().waiting, 1);
  EXPECT_EQ(Drain(**a, &ta).finish, FinishReason::kLength);
  EXPECT_EQ(Drain(**b, &tb).finish, FinishReason::kLength);
  EXPECT_EQ(ta, tb);  // same prompt, greedy: same tokens, whenever it ran
  EXPECT_EQ((*s)->Load().kv_blocks_used, 0);
}

TEST_F(SchedulerTest, ValidatesAgainstTheModel) {
  absl::StatusOr<std::unique_ptr<Scheduler>> s =
      Scheduler::Create(model_.get(), experts_.get(), SchedulerOptions{}, nullptr);
  ASSERT_TRUE(s.ok());
  auto code = [&](SequenceRequest r) { return (*s)->Submit(std::move(r)).status().code(); };
  EXPECT_EQ(code(Greedy("e", {}, 4)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Greedy("v", {5, 320}, 4)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Greedy("n", {5, -1}, 4)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Greedy("c", std::vector<int32_t>(256, 5), 4)), absl::StatusCode::kInvalidArgument);
  SequenceRequest r = Greedy("t", {5}, 4);
  r.sampling.top_p = 1.5f;
  EXPECT_EQ(code(r), absl::StatusCode::kInvalidArgument);
  r = Greedy("stop", {5}, 4);
  r.stop_token_ids = {999};
  EXPECT_EQ(code(r), absl::StatusCode::kInvalidArgument);
}

// The committed MTP test checkpoint (num_nextn_predict_layers = 1), loaded with its module.
class SchedulerMtpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<ModelConfig> config = LoadModelConfig(dir_ + "/config.json");
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = *config;
    absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir_);
    ASSERT_TRUE(ckpt.ok());
    ckpt_ = *std::move(ckpt);
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Create(*ckpt_, config_);  // with MTP
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);
    ASSERT_FALSE(model_->mtp().empty());
    absl::StatusOr<std::unique_ptr<LocalExperts>> experts =
        LocalExperts::Create(*ckpt_, config_, AllExperts(config_));
    ASSERT_TRUE(experts.ok());
    experts_ = *std::move(experts);
  }
  const std::string dir_ = std::string(EXPERTMESH_SOURCE_DIR) + "/tests/data/engine-mtp";
  ModelConfig config_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<LocalExperts> experts_;
};

TEST_F(SchedulerMtpTest, SpeculativeDecodingKeepsTheGreedyTokens) {
  constexpr int kMaxTokens = 14;
  const std::vector<std::vector<int32_t>> prompts =
      expertmesh::testing::MakePrompts(6, 20, static_cast<int>(config_.vocab_size), 5);
  absl::StatusOr<std::vector<std::vector<int32_t>>> want =
      expertmesh::testing::ReferenceGreedy(dir_, prompts, kMaxTokens);
  ASSERT_TRUE(want.ok()) << want.status();

  SchedulerOptions o;
  o.kv_blocks = 64;
  o.kv_block_size = 4;
  o.prefill_chunk = 5;  // prompts of up to 20 tokens: several chunks, MTP rows per chunk
  o.draft_k = 2;
  o.policy.adaptive = false;  // always draft 2
  MetricsRegistry metrics;
  absl::StatusOr<std::unique_ptr<Scheduler>> s =
      Scheduler::Create(model_.get(), experts_.get(), o, &metrics);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->mtp());
  std::vector<std::shared_ptr<SequenceStream>> streams;
  for (size_t i = 0; i < prompts.size(); ++i) {
    SequenceRequest r;
    r.request_id = "mtp" + std::to_string(i);
    r.prompt = prompts[i];
    r.max_tokens = kMaxTokens;
    r.ignore_eos = true;
    r.disable_mtp = i == 0;  // one sequence without drafting, batched with the others
    absl::StatusOr<std::shared_ptr<SequenceStream>> st = (*s)->Submit(r);
    ASSERT_TRUE(st.ok()) << st.status();
    streams.push_back(*st);
  }
  int64_t drafted = 0, accepted = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::vector<int32_t> got;
    SequenceEvent last;
    while (true) {
      std::optional<SequenceEvent> e = streams[i]->Next(absl::Seconds(60));
      ASSERT_TRUE(e.has_value());
      for (const GeneratedToken& t : e->tokens) got.push_back(t.token);
      if (e->finish != FinishReason::kNone) {
        last = *e;
        break;
      }
    }
    EXPECT_EQ(last.finish, FinishReason::kLength) << last.error;
    EXPECT_EQ(got, (*want)[i]) << "sequence " << i;  // drafting changes no token
    if (i == 0) {
      EXPECT_EQ(last.drafted_tokens, 0);
    }
    drafted += last.drafted_tokens;
    accepted += last.accepted_tokens;
  }
  // Drafts were made and verified (each step drafts 2 while 2 or more tokens are wanted).
  EXPECT_GT(drafted, 5 * (kMaxTokens / 3));
  EXPECT_LE(accepted, drafted);
  std::printf("[ info ] MTP drafts: %lld verified, %lld accepted\n",
              static_cast<long long>(drafted), static_cast<long long>(accepted));
  EXPECT_EQ((*s)->Load().kv_blocks_used, 0);
}

// Drafting (MTP forwards unsplit) with the main forwards split into 2 micro-batches.
TEST_F(SchedulerMtpTest, MicroBatchesKeepTheGreedyTokensWhileDrafting) {
  constexpr int kMaxTokens = 12;
  const std::vector<std::vector<int32_t>> prompts =
      expertmesh::testing::MakePrompts(8, 20, static_cast<int>(config_.vocab_size), 6);
  absl::StatusOr<std::vector<std::vector<int32_t>>> want =
      expertmesh::testing::ReferenceGreedy(dir_, prompts, kMaxTokens);
  ASSERT_TRUE(want.ok()) << want.status();
  SchedulerOptions o;
  o.kv_blocks = 128;
  o.kv_block_size = 4;
  o.prefill_chunk = 5;
  o.draft_k = 2;
  o.policy.adaptive = false;
  o.micro_batches = 2;
  o.micro_batch_min_rows = 2;
  absl::StatusOr<std::unique_ptr<Scheduler>> s =
      Scheduler::Create(model_.get(), experts_.get(), o, nullptr);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->mtp());
  std::vector<SequenceRequest> reqs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    SequenceRequest r;
    r.request_id = "mbmtp" + std::to_string(i);
    r.prompt = prompts[i];
    r.max_tokens = kMaxTokens;
    r.ignore_eos = true;
    r.disable_mtp = i % 3 == 0;
    reqs.push_back(std::move(r));
  }
  const std::vector<std::vector<int32_t>> got = RunAll(**s, reqs);
  ASSERT_EQ(got.size(), prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(got[i], (*want)[i]) << "sequence " << i;
  EXPECT_EQ((*s)->Load().kv_blocks_used, 0);
}

TEST_F(SchedulerMtpTest, PreemptionAndSharedPrefixesKeepTheGreedyTokensWhileDrafting) {
  constexpr int kMaxTokens = 12;
  const int32_t V = static_cast<int32_t>(config_.vocab_size);
  std::vector<std::vector<int32_t>> prompts;
  for (int32_t i = 0; i < 8; ++i) {
    std::vector<int32_t> p;
    for (int32_t j = 0; j < 16; ++j) p.push_back(2 + (j * 23 + 7) % (V - 2));  // shared
    for (int32_t j = 0; j < 4 + i % 3; ++j) p.push_back(2 + (i * 31 + j * 11 + 1) % (V - 2));
    prompts.push_back(std::move(p));
  }
  absl::StatusOr<std::vector<std::vector<int32_t>>> want =
      expertmesh::testing::ReferenceGreedy(dir_, prompts, kMaxTokens);
  ASSERT_TRUE(want.ok()) << want.status();
  SchedulerOptions o;
  o.kv_blocks = 24;  // 4-token blocks: a sequence needs up to 9; 8 of them cannot all grow
  o.kv_block_size = 4;
  o.max_batch = 8;
  o.prefill_chunk = 8;
  o.draft_k = 2;
  o.policy.adaptive = false;  // always draft 2
  MetricsRegistry metrics;
  absl::StatusOr<std::unique_ptr<Scheduler>> s =
      Scheduler::Create(model_.get(), experts_.get(), o, &metrics);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->mtp());
  std::vector<SequenceRequest> reqs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    SequenceRequest r;
    r.request_id = "m" + std::to_string(i);
    r.prompt = prompts[i];
    r.max_tokens = kMaxTokens;
    r.ignore_eos = true;
    reqs.push_back(std::move(r));
  }
  std::vector<std::vector<int32_t>> got = RunAll(**s, {reqs[0]});
  std::vector<std::vector<int32_t>> rest =
      RunAll(**s, std::vector<SequenceRequest>(reqs.begin() + 1, reqs.end()));
  got.insert(got.end(), rest.begin(), rest.end());
  EXPECT_EQ(got, *want);
  EXPECT_GT(MetricValue(metrics, "expertmesh_attention_preemptions_total"), 0);
  EXPECT_GT(MetricValue(metrics, "expertmesh_attention_prefix_cache_hits_tokens_total"), 0);
  EXPECT_GT(MetricValue(metrics, "expertmesh_attention_drafted_tokens_total"), 0);
  EXPECT_EQ((*s)->Load().kv_blocks_used, 0);
}

TEST(ToGenerationRequestTest, ChecksValuesAndFillsDefaults) {
  const absl::Time now = absl::FromUnixSeconds(1000);
  auto convert = [&](const v1::SubmitRequest& r) {
    return ToGenerationRequest(r, 256, now, absl::InfiniteFuture(), absl::Seconds(30));
  };
  v1::SubmitRequest ok;
  ok.add_prompt_token_ids(5);
  ok.add_prompt_token_ids(6);
  absl::StatusOr<SequenceRequest> r = convert(ok);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->max_tokens, 254);  // 0 = up to the context
  EXPECT_EQ(r->sampling.top_p, 1.0f);
  EXPECT_EQ(r->deadline, now + absl::Seconds(30));
  ok.set_deadline_ms(500);
  EXPECT_EQ(convert(ok)->deadline, now + absl::Milliseconds(500));
  EXPECT_EQ(
      ToGenerationRequest(ok, 256, now, now + absl::Milliseconds(100), absl::Seconds(30))->deadline,
      now + absl::Milliseconds(100));  // the RPC deadline is earlier

  auto bad = [&](auto mutate) {
    v1::SubmitRequest b = ok;
    mutate(b);
    return convert(b).status().code();
  };
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(bad([](v1::SubmitRequest& b) { b.clear_prompt_token_ids(); }), kInvalid);
  EXPECT_EQ(bad([](v1::SubmitRequest& b) {
              for (int i = 0; i < 300; ++i) b.add_prompt_token_ids(5);
            }),
            kInvalid);
  EXPECT_EQ(bad([](v1::SubmitRequest& b) { b.mutable_sampling()->set_temperature(-1); }), kInvalid);
  EXPECT_EQ(bad([](v1::SubmitRequest& b) { b.mutable_sampling()->set_temperature(NAN); }),
            kInvalid);
  EXPECT_EQ(bad([](v1::SubmitRequest& b) { b.mutable_sampling()->set_top_p(1.01f); }), kInvalid);
  EXPECT_EQ(bad([](v1::SubmitRequest& b) { b.mutable_sampling()->set_top_k(-3); }), kInvalid);
  EXPECT_EQ(bad([](v1::SubmitRequest& b) { b.mutable_sampling()->set_top_logprobs(21); }),
            kInvalid);
}

// --device: "cpu" is the reference engine; a CUDA device that is absent (or a build without
// CUDA) fails at start-up with a message naming the flag; a malformed spec is refused.
TEST_F(SchedulerTest, DeviceFlagErrorsAtStartup) {
  SchedulerOptions o;
  o.kv_blocks = 8;
  o.device = "cuda:99";
  absl::StatusOr<std::unique_ptr<Scheduler>> gpu =
      Scheduler::Create(model_.get(), experts_.get(), o, nullptr);
  ASSERT_FALSE(gpu.ok());
  EXPECT_NE(gpu.status().message().find("--device cuda:99"), std::string::npos) << gpu.status();
  o.device = "gpu0";
  EXPECT_FALSE(Scheduler::Create(model_.get(), experts_.get(), o, nullptr).ok());
  o.device = "cpu";
  absl::StatusOr<std::unique_ptr<Scheduler>> cpu =
      Scheduler::Create(model_.get(), experts_.get(), o, nullptr);
  EXPECT_TRUE(cpu.ok()) << cpu.status();
}

// The paged cache reports its blocks as page ids (what the GPU engine addresses).
TEST(PagedKvCacheTest, ReportsItsBlocksAsPages) {
  absl::StatusOr<std::unique_ptr<KvBlockPool>> pool = KvBlockPool::Create(8, 4, 2, 3);
  ASSERT_TRUE(pool.ok());
  absl::StatusOr<std::unique_ptr<PagedKvCache>> cache = PagedKvCache::Create(pool->get(), 9);
  ASSERT_TRUE(cache.ok());
  const MlaKvCache& base = **cache;
  EXPECT_EQ(base.page_size(), 4);
  ASSERT_EQ(base.page_ids().size(), 3u);
  EXPECT_EQ(std::vector<int32_t>(base.page_ids().begin(), base.page_ids().end()),
            (*cache)->block_table());
  // A pool without host storage (the GPU engine's) still hands out the same ids.
  absl::StatusOr<std::unique_ptr<KvBlockPool>> ids_only =
      KvBlockPool::Create(8, 4, 2, 3, /*host_storage=*/false);
  ASSERT_TRUE(ids_only.ok());
  absl::StatusOr<std::unique_ptr<PagedKvCache>> c2 = PagedKvCache::Create(ids_only->get(), 9);
  ASSERT_TRUE(c2.ok());
  EXPECT_EQ((*c2)->block_table(), (*cache)->block_table());
  EXPECT_EQ((*ids_only)->Slot(0, 0, 0), nullptr);
}

}  // namespace
}  // namespace expertmesh::attention

namespace expertmesh::attention {
namespace {

// JSON mode: the random test model, its ids given bytes that spell JSON pieces (and text),
// sampled with several seeds and greedily. Every output is a live prefix of a JSON object at
// every token, and every one that ends by EOS is a whole object. The sequences do not draft.
TEST_F(SchedulerTest, JsonModeMasksEverySampleToAJsonObject) {
  const std::vector<std::string> pieces = {
      "{",       "}",        "[",   "]",        "\"",     ":",  ",",    " ",
      "\n",      "a",        "key", "1",        "-2.5e3", "0",  "true", "null",
      "false",   "{\"",      "\":", "\"}",      "\",",    "{}", "[]",   "\\n",
      "\\u00e9", "\xc3\xa9", "x y", "\xe2\x82", "\xac",   "}]", "]}",   "\"a\": 1"};
  auto table = std::make_shared<TokenByteTable>(static_cast<size_t>(config_.vocab_size));
  for (size_t id = 2; id < table->size(); ++id) (*table)[id] = pieces[id % pieces.size()];
  constexpr int32_t kEos = 1;  // the test model's (0 = bos)
  ASSERT_EQ(config_.eos_token_id.value_or(-1), kEos);

  SchedulerOptions o;
  o.kv_blocks = 256;
  o.kv_block_size = 4;
  MetricsRegistry metrics;
  // Without the table, JSON mode is refused.
  {
    absl::StatusOr<std::unique_ptr<Scheduler>> s =
        Scheduler::Create(model_.get(), experts_.get(), o, &metrics);
    ASSERT_TRUE(s.ok()) << s.status();
    SequenceRequest r = Greedy("json-no-table", {2, 3, 4}, 4);
    r.json_object = true;
    EXPECT_EQ((*s)->Submit(r).status().code(), absl::StatusCode::kInvalidArgument);
  }
  o.token_bytes = table;
  MetricsRegistry metrics2;
  absl::StatusOr<std::unique_ptr<Scheduler>> s =
      Scheduler::Create(model_.get(), experts_.get(), o, &metrics2);
  ASSERT_TRUE(s.ok()) << s.status();
  const std::vector<std::vector<int32_t>> prompts =
      expertmesh::testing::MakePrompts(4, 12, static_cast<int>(config_.vocab_size), 3);
  std::vector<std::shared_ptr<SequenceStream>> streams;
  for (int i = 0; i < 12; ++i) {
    SequenceRequest r;
    r.request_id = "json" + std::to_string(i);
    r.prompt = prompts[static_cast<size_t>(i) % prompts.size()];
    r.max_tokens = 96;
    r.json_object = true;
    if (i > 0) {  // sequence 0 greedy, the others sampled
      r.sampling.temperature = 1.0f;
      r.sampling.seed = 100 + static_cast<uint64_t>(i);
    }
    absl::StatusOr<std::shared_ptr<SequenceStream>> st = (*s)->Submit(r);
    ASSERT_TRUE(st.ok()) << st.status();
    streams.push_back(*st);
  }
  int stopped = 0;
  for (size_t i = 0; i < streams.size(); ++i) {
    std::vector<int32_t> tokens;
    const SequenceEvent last = Drain(*streams[i], &tokens);
    ASSERT_TRUE(last.finish == FinishReason::kStop || last.finish == FinishReason::kLength)
        << last.error;
    EXPECT_EQ(last.drafted_tokens, 0);
    JsonAutomaton a;
    std::string text;
    for (size_t k = 0; k < tokens.size(); ++k) {
      const int32_t t = tokens[k];
      if (t == kEos) {
        EXPECT_EQ(k + 1, tokens.size()) << "EOS ends the sequence";
        break;
      }
      ASSERT_GE(t, 2) << "sequence " << i;
      text += (*table)[static_cast<size_t>(t)];
      ASSERT_TRUE(a.Feed((*table)[static_cast<size_t>(t)])) << "sequence " << i << ": " << text;
    }
    if (last.finish == FinishReason::kStop) {
      ++stopped;
      EXPECT_EQ(tokens.back(), kEos);
      EXPECT_TRUE(a.complete()) << "sequence " << i << " ended by EOS mid-object: " << text;
    }
    std::printf("[ info ] json %zu (%s): %s\n", i, FinishReasonName(last.finish), text.c_str());
  }
  EXPECT_GT(stopped, 0) << "no sequence completed its object within max_tokens";
  EXPECT_EQ((*s)->Load().kv_blocks_used, 0);
}

}  // namespace
}  // namespace expertmesh::attention

namespace expertmesh::attention {
namespace {

TEST(ToGenerationRequestTest, ResponseFormat) {
  const absl::Time now = absl::FromUnixSeconds(1000);
  v1::SubmitRequest req;
  req.add_prompt_token_ids(5);
  auto convert = [&](const v1::SubmitRequest& r) {
    return ToGenerationRequest(r, 256, now, absl::InfiniteFuture(), absl::Seconds(30));
  };
  EXPECT_FALSE(convert(req)->json_object);  // text, the default (and what old gateways send)
  req.set_response_format(v1::RESPONSE_FORMAT_JSON_OBJECT);
  EXPECT_TRUE(convert(req)->json_object);
  req.set_response_format(static_cast<v1::ResponseFormat>(7));  // a newer peer's value
  EXPECT_EQ(convert(req).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace expertmesh::attention
