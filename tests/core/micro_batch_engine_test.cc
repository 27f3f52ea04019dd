// Ping-pong micro-batches (core/engine/micro_batch_engine.h) on the committed random
// checkpoints: how batches are split; a split forward gives bitwise the logits, hidden states and
// cache lengths of one unsplit forward (2, 3 and 8 micro-batches, prefills and decodes of several
// lengths, MTP); every micro-batch's expert call is in flight at once (the compute baton is given
// up while a micro-batch waits for its experts); a failure in one micro-batch rolls every
// sequence's cache back.
#include "core/engine/micro_batch_engine.h"

#include <condition_variable>
#include <map>
#include <mutex>

#include "core/base/status.h"
#include "tests/core/engine_test_util.h"

namespace expertmesh::testing {
namespace {

std::vector<int32_t> Tokens(int n, int32_t vocab, int32_t salt) {
  std::vector<int32_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = (salt * 37 + i * 53 + 11) % vocab;
  return t;
}

TEST(SplitMicroBatchesTest, BalancesRowsOverWholeSequences) {
  using V = std::vector<size_t>;
  const std::vector<int64_t> ones(8, 1);
  EXPECT_EQ(SplitMicroBatches(ones, 2, 1), (V{4, 8}));
  EXPECT_EQ(SplitMicroBatches(ones, 3, 1), (V{3, 6, 8}));
  EXPECT_EQ(SplitMicroBatches(ones, 2, 4), (V{4, 8}));
  EXPECT_EQ(SplitMicroBatches(ones, 2, 5), (V{8}));  // 8 rows < 2 x 5: not split
  EXPECT_EQ(SplitMicroBatches(ones, 8, 2), (V{2, 4, 6, 8}));
  EXPECT_EQ(SplitMicroBatches(std::vector<int64_t>{1}, 2, 1), (V{1}));  // batch 1: never
  EXPECT_EQ(SplitMicroBatches(std::vector<int64_t>{}, 2, 1), (V{0}));
  // A long prefill weighs its rows: [30] | [1 1 1 1 1 1].
  EXPECT_EQ(SplitMicroBatches(std::vector<int64_t>{30, 1, 1, 1, 1, 1, 1}, 2, 1), (V{1, 7}));
  // More micro-batches than sequences: one sequence each.
  EXPECT_EQ(SplitMicroBatches(std::vector<int64_t>{9, 9}, 4, 1), (V{1, 2}));
  // The last sequences are kept for the last micro-batches.
  EXPECT_EQ(SplitMicroBatches(std::vector<int64_t>{1, 1, 40}, 3, 1), (V{1, 2, 3}));
}

// Micro-batch i's experts: each expert call waits until every micro-batch of the forward has
// called the same layer, then runs the real experts. This can only complete when the compute
// baton is given up while a micro-batch waits for its experts (else the others never reach
// their MoE layer): what overlapping the round trips needs. The MTP module's layers (never
// split) pass straight through.
class Rendezvous {
 public:
  Rendezvous(RoutedExperts* inner, int parties, int main_layers)
      : inner_(inner), parties_(parties), main_layers_(main_layers) {}
  class Lane final : public RoutedExperts {
   public:
    Lane(Rendezvous* r, int index) : r_(r), index_(index) {}
    absl::Status Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                     std::span<float> out) override {
      if (layer < r_->main_layers_) {
        if (r_->fail_lane == index_) return r_->Fail();
        EM_RETURN_IF_ERROR(r_->Arrive(layer));
      }
      return r_->inner_->Run(layer, x, routes, out);
    }

   private:
    Rendezvous* r_;
    int index_;
  };
  absl::Status Arrive(int layer) {
    std::unique_lock<std::mutex> lock(mu_);
    const int n = ++arrived_[layer];
    if (n % parties_ == 0) cv_.notify_all();
    const int round = (n + parties_ - 1) / parties_;
    if (!cv_.wait_for(lock, std::chrono::seconds(30),
                      [&] { return failed_ || arrived_[layer] >= round * parties_; })) {
      return absl::DeadlineExceededError("the other micro-batches never reached this layer");
    }
    if (failed_) return absl::AbortedError("another micro-batch failed");
    return absl::OkStatus();
  }
  absl::Status Fail() {
    std::lock_guard<std::mutex> lock(mu_);
    failed_ = true;
    cv_.notify_all();
    return absl::UnavailableError("micro-batch failed on purpose");
  }
  int fail_lane = -1;  // this micro-batch's expert calls fail

 private:
  RoutedExperts* inner_;
  const int parties_;
  const int main_layers_;
  bool failed_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int, int> arrived_;
};

class MicroBatchEngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { mtp_ = new LoadedModel(LoadedModel::Load("engine-mtp", true)); }
  static void TearDownTestSuite() { delete mtp_; }
  static int MainLayers() { return static_cast<int>(mtp_->config.num_hidden_layers); }
  static int32_t Vocab() { return static_cast<int32_t>(mtp_->config.vocab_size); }
  static LoadedModel* mtp_;
};
LoadedModel* MicroBatchEngineTest::mtp_ = nullptr;

// Seven sequences: prefills of 1..23 tokens and decodes (1 or 3 tokens, i.e. with drafts),
// some with every position's logits. Each micro-batched run starts from the same caches.
TEST_F(MicroBatchEngineTest, SplitForwardIsBitwiseTheUnsplitForward) {
  const int32_t vocab = static_cast<int32_t>(mtp_->config.vocab_size);
  auto reference = mtp_->NewEngine({});
  const std::vector<int> prior = {0, 6, 0, 11, 0, 3, 0};  // tokens already cached
  const std::vector<int> feed = {23, 1, 5, 3, 1, 1, 9};
  auto make_caches = [&] {
    std::vector<std::unique_ptr<ContiguousKvCache>> caches;
    for (size_t s = 0; s < prior.size(); ++s) {
      caches.push_back(reference->NewCache());
      if (prior[s] > 0) Run1(*reference, *caches.back(), Tokens(prior[s], vocab, 100 + s), false);
    }
    return caches;
  };
  std::vector<std::vector<int32_t>> tokens;
  for (size_t s = 0; s < feed.size(); ++s) tokens.push_back(Tokens(feed[s], vocab, 7 + s));
  auto inputs = [&](std::vector<std::unique_ptr<ContiguousKvCache>>& caches) {
    std::vector<SequenceInput> in;
    for (size_t s = 0; s < feed.size(); ++s) in.push_back({tokens[s], caches[s].get(), s % 2 == 1});
    return in;
  };
  auto want_caches = make_caches();
  absl::StatusOr<std::vector<SequenceOutput>> want = reference->Forward(inputs(want_caches));
  ASSERT_TRUE(want.ok()) << want.status();

  for (int k : {2, 3, 8}) {
    SCOPED_TRACE(::testing::Message() << k << " micro-batches");
    std::vector<std::unique_ptr<Rendezvous::Lane>> lanes;
    std::vector<RoutedExperts*> experts;
    const size_t parts =
        SplitMicroBatches(std::vector<int64_t>(feed.begin(), feed.end()), k, 1).size();
    Rendezvous meet(mtp_->experts.get(), static_cast<int>(parts), MainLayers());
    for (int i = 0; i < k; ++i) {
      lanes.push_back(std::make_unique<Rendezvous::Lane>(&meet, i));
      experts.push_back(lanes.back().get());
    }
    MicroBatchOptions mo;
    mo.micro_batches = k;
    mo.min_rows = 1;
    auto engine = MicroBatchForwardEngine::Create(*mtp_->model, experts, {}, mo);
    ASSERT_TRUE(engine.ok()) << engine.status();
    auto caches = make_caches();
    absl::StatusOr<std::vector<SequenceOutput>> got = (*engine)->Forward(inputs(caches));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ((*engine)->last_split(), static_cast<int>(parts));
    EXPECT_EQ(parts, static_cast<size_t>(std::min(k, 7)));
    ASSERT_EQ(got->size(), want->size());
    for (size_t s = 0; s < want->size(); ++s) {
      EXPECT_EQ((*got)[s].logits, (*want)[s].logits) << "sequence " << s;
      EXPECT_EQ((*got)[s].hidden, (*want)[s].hidden) << "sequence " << s;
      EXPECT_EQ(caches[s]->length(), want_caches[s]->length()) << "sequence " << s;
    }
    // The MTP module (never split) through the same engine.
    std::vector<MtpInput> mtp_in;
    std::vector<std::unique_ptr<ContiguousKvCache>> mc;
    for (size_t s = 0; s < 2; ++s) {
      mc.push_back(reference->NewMtpCache());
      mtp_in.push_back({std::span<const int32_t>(tokens[s]).first(1),
                        std::span<const float>((*want)[s].hidden).first(mtp_->config.hidden_size),
                        mc.back().get(), false});
    }
    auto mtp_got = (*engine)->ForwardMtp(mtp_in, 0);
    ASSERT_TRUE(mtp_got.ok()) << mtp_got.status();
    for (auto& c : mc) c->Truncate(0);
    auto mtp_want = reference->ForwardMtp(mtp_in, 0);
    ASSERT_TRUE(mtp_want.ok());
    for (size_t s = 0; s < 2; ++s) EXPECT_EQ((*mtp_got)[s].logits, (*mtp_want)[s].logits);
  }
}

// Batch 1, and batches below 2 x min_rows, run unsplit (on micro-batch 0 alone: the
// rendezvous of 1 party never waits).
TEST_F(MicroBatchEngineTest, SmallBatchesAreNotSplit) {
  Rendezvous meet(mtp_->experts.get(), 1, MainLayers());
  Rendezvous::Lane lane0(&meet, 0), lane1(&meet, 1);
  std::vector<RoutedExperts*> experts = {&lane0, &lane1};
  MicroBatchOptions mo;
  mo.micro_batches = 2;
  mo.min_rows = 4;
  auto engine = MicroBatchForwardEngine::Create(*mtp_->model, experts, {}, mo);
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto reference = mtp_->NewEngine({});
  auto c1 = reference->NewCache(), c2 = reference->NewCache();
  const std::vector<int32_t> a = Tokens(3, Vocab(), 1), b = Tokens(4, Vocab(), 2);
  std::vector<SequenceInput> in = {{a, c1.get(), false}, {b, c2.get(), false}};  // 7 rows < 8
  auto got = (*engine)->Forward(in);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ((*engine)->last_split(), 1);
}

TEST_F(MicroBatchEngineTest, AFailedMicroBatchRollsBackEveryCache) {
  Rendezvous meet(mtp_->experts.get(), 2, MainLayers());
  meet.fail_lane = 1;
  Rendezvous::Lane lane0(&meet, 0), lane1(&meet, 1);
  std::vector<RoutedExperts*> experts = {&lane0, &lane1};
  MicroBatchOptions mo;
  mo.min_rows = 1;
  auto engine = MicroBatchForwardEngine::Create(*mtp_->model, experts, {}, mo);
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto reference = mtp_->NewEngine({});
  auto c1 = reference->NewCache(), c2 = reference->NewCache();
  Run1(*reference, *c1, Tokens(5, Vocab(), 3), false);
  const std::vector<int32_t> a = Tokens(2, Vocab(), 1), b = Tokens(4, Vocab(), 2);
  std::vector<SequenceInput> in = {{a, c1.get(), false}, {b, c2.get(), false}};
  auto got = (*engine)->Forward(in);
  EXPECT_FALSE(got.ok());
  EXPECT_EQ(c1->length(), 5);
  EXPECT_EQ(c2->length(), 0);
  // Bad options.
  mo.micro_batches = 9;
  EXPECT_FALSE(MicroBatchForwardEngine::Create(*mtp_->model, experts, {}, mo).ok());
  mo.micro_batches = 3;  // 2 experts for 3 micro-batches
  EXPECT_FALSE(MicroBatchForwardEngine::Create(*mtp_->model, experts, {}, mo).ok());
}

}  // namespace
}  // namespace expertmesh::testing
