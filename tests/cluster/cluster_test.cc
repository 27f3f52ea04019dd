// The whole cluster as real processes on loopback (router-service, expert-service x shards x
// replicas, attention-service), started by the launcher library exactly as `expertmesh up`
// starts it:
//  - distribution changes nothing: greedy tokens equal the in-process reference engine's for
//    8 prompts with 1, 2 and 4 shard groups and 1 and 2 replicas each;
//  - a shard replica killed with SIGKILL mid-generation: the sequence finishes with the same
//    tokens through the other replica; with no replica of a shard left, sequences fail with
//    UNAVAILABLE within the step deadline, the services stay up, and serve again once a
//    replica of that shard registers;
//  - 64 concurrent sequences complete with the reference tokens; cancelling mid-stream
//    frees the KV blocks (seen in /metrics);
//  - bad input to Submit gets INVALID_ARGUMENT and the service stays healthy.
// Wall-clock bounds appear only where the real network is the subject (deadlines).
#include <signal.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "expertmesh/v1/attention.grpc.pb.h"
#include "gtest/gtest.h"
#include "service-common/grpc_util.h"
#include "service-common/handshake.h"
#include "service-common/metrics_http.h"
#include "tests/cluster/cluster_test_util.h"
#include "tests/common/poll.h"
#include "tools/launcher/cluster.h"

namespace expertmesh {
namespace {

using launcher::Cluster;
using launcher::ClusterOptions;
using testing::GreedyRequest;
using testing::SubmitAndCollect;
using testing::SubmitResult;

constexpr int kMaxTokens = 10;
constexpr int kPrompts = 64;

class ClusterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> dir = testing::MakeClusterTestModel();
    ASSERT_TRUE(dir.ok()) << dir.status();
    model_dir_ = new std::string(*dir);
    prompts_ = new std::vector<std::vector<int32_t>>(testing::MakePrompts(kPrompts, 40, 320, 11));
    // The in-process reference engine (exact combine: the same for every placement), all 64
    // prompts (the 64-sequence test's cluster).
    absl::StatusOr<std::vector<std::vector<int32_t>>> want =
        testing::ReferenceGreedy(*model_dir_, *prompts_, kMaxTokens);
    ASSERT_TRUE(want.ok()) << want.status();
    want_ = new std::vector<std::vector<int32_t>>(*std::move(want));
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*model_dir_);
    delete model_dir_;
    delete prompts_;
    delete want_;
  }

  static ClusterOptions Options(int shards, int replicas, const std::string& model_dir = "") {
    ClusterOptions o;
    o.model_dir = model_dir.empty() ? *model_dir_ : model_dir;
    o.shards = shards;
    o.replicas = replicas;
    o.bin_dir = EXPERTMESH_BINARY_DIR;
    o.kv_blocks = 1024;
    o.kv_block_size = 16;
    o.max_batch = 64;
    o.max_waiting = 64;
    o.prefill_chunk = 16;  // prompts up to 40 tokens: prefilled in up to 3 chunks
    o.step_deadline_ms = 3000;
    o.extra_attention_args = {"--attempt-timeout-ms", "1000"};
    return o;
  }
  static std::unique_ptr<v1::AttentionService::Stub> Stub(const Cluster& c) {
    return v1::AttentionService::NewStub(MakeChannel(c.attention().grpc_address));
  }
  // Runs prompts [0, n) concurrently, one thread each; checks every result against `want`
  // (default: the in-process reference) and returns the tokens.
  static std::vector<std::vector<int32_t>> ExpectReferenceOutputs(
      const Cluster& c, int n, const std::vector<std::vector<int32_t>>* want_in = nullptr,
      const std::vector<std::vector<int32_t>>* prompts_in = nullptr) {
    const std::vector<std::vector<int32_t>>& want = want_in ? *want_in : *want_;
    const std::vector<std::vector<int32_t>>& prompts = prompts_in ? *prompts_in : *prompts_;
    auto stub = Stub(c);
    std::vector<SubmitResult> results(n);
    std::vector<std::thread> threads;
    for (int i = 0; i < n; ++i) {
      threads.emplace_back([&, i] {
        results[i] =
            SubmitAndCollect(*stub, GreedyRequest("p" + std::to_string(i), prompts[i], kMaxTokens));
      });
    }
    for (std::thread& t : threads) t.join();
    std::vector<std::vector<int32_t>> got;
    for (int i = 0; i < n; ++i) {
      EXPECT_TRUE(results[i].status.ok())
          << "prompt " << i << ": " << results[i].status.error_message();
      EXPECT_EQ(results[i].finish, v1::FINISH_REASON_LENGTH);
      EXPECT_EQ(results[i].tokens, want[i]) << "prompt " << i;
      got.push_back(results[i].tokens);
    }
    return got;
  }
  // A metric's value (the first series of that name) in a service's /metrics: 0 when the
  // metric does not exist yet, NaN when /metrics cannot be read.
  static double Metric(int metrics_port, const std::string& name) {
    absl::StatusOr<std::string> text = HttpGet("127.0.0.1", metrics_port, "/metrics");
    if (!text.ok()) return NAN;
    for (absl::string_view line : absl::StrSplit(*text, '\n')) {
      if (absl::StartsWith(line, name + " ")) {
        double v = 0;
        if (absl::SimpleAtod(line.substr(name.size() + 1), &v)) return v;
      }
    }
    return 0.0;
  }
  static double Metric(const Cluster& c, const std::string& name) {
    return Metric(c.attention().metrics_port, name);
  }
  // Stops the cluster (every service must exit cleanly on SIGTERM); its logs are kept only
  // when the test failed.
  void StopCluster(Cluster& c) {
    EXPECT_TRUE(c.UnexpectedExits().empty());
    EXPECT_TRUE(c.Stop().ok());
    if (HasFailure()) {
      std::printf("[ info ] service logs kept in %s\n", c.log_dir().c_str());
    } else {
      std::filesystem::remove_all(c.log_dir());
    }
  }
  // The cluster a fixture below starts for each test, stopped (and checked) after it.
  void StartCluster(int shards, int replicas) {
    absl::StatusOr<std::unique_ptr<Cluster>> c = Cluster::Start(Options(shards, replicas));
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = *std::move(c);
  }
  void TearDown() override {
    if (cluster_ != nullptr) StopCluster(*cluster_);
  }
  static bool Healthy(const Cluster& c) {
    auto ch = MakeChannel(c.attention().grpc_address);
    absl::StatusOr<bool> s = CheckHealth(*ch, "expertmesh.v1.AttentionService", absl::Seconds(2));
    return s.ok() && *s;
  }

  static std::string* model_dir_;
  static std::vector<std::vector<int32_t>>* prompts_;
  static std::vector<std::vector<int32_t>>* want_;  // the in-process engine, per prompt
  std::unique_ptr<Cluster> cluster_;
};
std::string* ClusterTest::model_dir_ = nullptr;
std::vector<std::vector<int32_t>>* ClusterTest::prompts_ = nullptr;
std::vector<std::vector<int32_t>>* ClusterTest::want_ = nullptr;

// Exact combine (the default): every shard count (3 splits 8 experts unevenly) and replica
// count gives the plain in-process engine's tokens.
TEST_F(ClusterTest, DistributionChangesNothing) {
  for (int shards : {1, 2, 3, 4}) {
    for (int replicas : {1, 2}) {
      SCOPED_TRACE(::testing::Message()
                   << shards << " shard group(s) x " << replicas << " replica(s)");
      absl::StatusOr<std::unique_ptr<Cluster>> c = Cluster::Start(Options(shards, replicas));
      ASSERT_TRUE(c.ok()) << c.status();
      ExpectReferenceOutputs(**c, 8);
      StopCluster(**c);
    }
  }
}

// The same on the bundled model (16 experts, top-4, vocabulary 4096).
TEST_F(ClusterTest, BundledModelDistributionChangesNothing) {
  const std::string tiny = std::string(EXPERTMESH_SOURCE_DIR) + "/models/expertmesh-tiny";
  const std::vector<std::vector<int32_t>> prompts = testing::MakePrompts(8, 40, 4096, 23);
  absl::StatusOr<std::vector<std::vector<int32_t>>> want =
      testing::ReferenceGreedy(tiny, prompts, kMaxTokens);
  ASSERT_TRUE(want.ok()) << want.status();
  for (auto [shards, replicas] :
       {std::pair{1, 2}, std::pair{2, 1}, std::pair{3, 2}, std::pair{4, 1}}) {
    SCOPED_TRACE(::testing::Message() << "bundled model, " << shards << " shard group(s) x "
                                      << replicas << " replica(s)");
    absl::StatusOr<std::unique_ptr<Cluster>> c = Cluster::Start(Options(shards, replicas, tiny));
    ASSERT_TRUE(c.ok()) << c.status();
    ExpectReferenceOutputs(**c, 8, &*want, &prompts);
    StopCluster(**c);
  }
}

// The partial combine (--combine partial) still exists: its output is the reference engine
// with that mode's numerics for the cluster's even placement (each shard's partial sum in
// BF16), which depends on the placement: printed, how many prompts 3 groups x 2 replicas
// share with 1 x 1 in that mode (the exact mode: all, above).
TEST_F(ClusterTest, PartialCombineEqualsItsPlacementNumerics) {
  const std::vector<std::vector<int32_t>> first8(prompts_->begin(), prompts_->begin() + 8);
  absl::StatusOr<std::vector<std::vector<int32_t>>> want3 =
      testing::ReferenceGreedy(*model_dir_, first8, kMaxTokens, /*partial_shards=*/3);
  ASSERT_TRUE(want3.ok()) << want3.status();
  absl::StatusOr<std::vector<std::vector<int32_t>>> want1 =
      testing::ReferenceGreedy(*model_dir_, first8, kMaxTokens, /*partial_shards=*/1);
  ASSERT_TRUE(want1.ok()) << want1.status();
  ClusterOptions o = Options(3, 2);
  o.combine = "partial";
  absl::StatusOr<std::unique_ptr<Cluster>> c = Cluster::Start(o);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectReferenceOutputs(**c, 8, &*want3);
  StopCluster(**c);
  int same_1x1 = 0, same_exact = 0;
  for (int i = 0; i < 8; ++i) {
    same_1x1 += (*want3)[i] == (*want1)[i] ? 1 : 0;
    same_exact += (*want3)[i] == (*want_)[i] ? 1 : 0;
  }
  std::printf(
      "[ measured ] partial combine, 3 groups x 2 replicas: %d/8 prompts equal 1 x 1 partial, "
      "%d/8 equal the in-process engine (exact combine: 8/8 for every placement)\n",
      same_1x1, same_exact);
}

// Each test gets its own cluster of 2 shard groups x 1 replica.
class ServingClusterTest : public ClusterTest {
 protected:
  void SetUp() override { StartCluster(2, 1); }
};

TEST_F(ServingClusterTest, SixtyFourConcurrentSequencesEqualTheReference) {
  ExpectReferenceOutputs(*cluster_, kPrompts);
  EXPECT_EQ(Metric(*cluster_, "expertmesh_attention_kv_blocks_used"), 0.0);
  // The attention service drafted with the MTP module (its MoE layer dispatched to the
  // shards like the others), and the tokens are still the reference's.
  EXPECT_GT(Metric(*cluster_, "expertmesh_attention_drafted_tokens_total"), 0.0);
}

// Client-side cancel mid-stream, and the Cancel rpc: both free the sequence's blocks.
TEST_F(ServingClusterTest, CancelFreesTheBlocks) {
  auto stub = Stub(*cluster_);
  for (bool use_rpc : {false, true}) {
    SCOPED_TRACE(use_rpc ? "Cancel rpc" : "client cancel");
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    const std::string id = use_rpc ? "cancel-rpc" : "cancel-client";
    auto reader = stub->Submit(&ctx, GreedyRequest(id, (*prompts_)[0], 200));
    v1::TokenEvent e;
    ASSERT_TRUE(reader->Read(&e));  // running: it holds its blocks
    EXPECT_GT(Metric(*cluster_, "expertmesh_attention_kv_blocks_used"), 0.0);
    if (use_rpc) {
      grpc::ClientContext cctx;
      cctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      v1::CancelRequest req;
      req.set_request_id(id);
      v1::CancelResponse resp;
      ASSERT_TRUE(stub->Cancel(&cctx, req, &resp).ok());
      EXPECT_TRUE(resp.found());
      v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
      while (reader->Read(&e)) finish = e.finish_reason();
      EXPECT_EQ(finish, v1::FINISH_REASON_CANCELLED);
      EXPECT_TRUE(reader->Finish().ok());
    } else {
      ctx.TryCancel();
      while (reader->Read(&e)) {
      }
      EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
    }
    // The blocks return at the next step boundary: poll /metrics (a few ms on loopback).
    testing::PollUntil(
        [&] { return Metric(*cluster_, "expertmesh_attention_kv_blocks_used") == 0.0; },
        absl::Seconds(10));
    EXPECT_EQ(Metric(*cluster_, "expertmesh_attention_kv_blocks_used"), 0.0);
    EXPECT_EQ(Metric(*cluster_, "expertmesh_attention_mtp_kv_blocks_used"), 0.0);
    EXPECT_EQ(Metric(*cluster_, "expertmesh_attention_requests_running"), 0.0);
  }
}

// Bad input: INVALID_ARGUMENT, and the service stays healthy and serving.
TEST_F(ServingClusterTest, BadInputIsInvalidArgumentAndTheServiceStaysHealthy) {
  auto stub = Stub(*cluster_);
  std::vector<std::pair<std::string, v1::SubmitRequest>> bad;
  auto base = [&] { return GreedyRequest("bad", {5, 6, 7}, 4); };
  {
    v1::SubmitRequest r = base();
    r.clear_prompt_token_ids();
    bad.push_back({"empty prompt", r});
  }
  {
    v1::SubmitRequest r = base();
    r.add_prompt_token_ids(320);
    bad.push_back({"token id = vocab_size", r});
  }
  {
    v1::SubmitRequest r = base();
    r.add_prompt_token_ids(-5);
    bad.push_back({"negative token id", r});
  }
  {
    v1::SubmitRequest r = base();
    for (int i = 0; i < 300; ++i) r.add_prompt_token_ids(7);
    bad.push_back({"prompt longer than the context", r});
  }
  {
    v1::SubmitRequest r = base();
    r.mutable_sampling()->set_temperature(-0.5f);
    bad.push_back({"negative temperature", r});
  }
  {
    v1::SubmitRequest r = base();
    r.mutable_sampling()->set_temperature(std::nanf(""));
    bad.push_back({"NaN temperature", r});
  }
  {
    v1::SubmitRequest r = base();
    r.mutable_sampling()->set_top_p(2.0f);
    bad.push_back({"top_p > 1", r});
  }
  {
    v1::SubmitRequest r = base();
    r.mutable_sampling()->set_top_k(-1);
    bad.push_back({"negative top_k", r});
  }
  {
    v1::SubmitRequest r = base();
    r.mutable_sampling()->set_presence_penalty(5.0f);
    bad.push_back({"presence_penalty > 2", r});
  }
  {
    v1::SubmitRequest r = base();
    r.add_stop_token_ids(100000);
    bad.push_back({"stop token out of vocab", r});
  }
  for (const auto& [what, req] : bad) {
    SubmitResult r = SubmitAndCollect(*stub, req, 10000);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << what << ": " << r.status.error_message();
    EXPECT_TRUE(r.tokens.empty()) << what;
  }
  EXPECT_TRUE(Healthy(*cluster_));

  ExpectReferenceOutputs(*cluster_, 2);  // still serves
}

// Handshake: the same model is accepted, another model's fingerprint refused.
TEST_F(ServingClusterTest, HandshakeAcceptsTheSameModelOnly) {
  auto stub = Stub(*cluster_);
  absl::StatusOr<v1::PeerIdentity> me = MakeLocalIdentity(*model_dir_, "gateway", "test");
  ASSERT_TRUE(me.ok()) << me.status();
  for (bool same : {true, false}) {
    v1::HandshakeRequest req;
    *req.mutable_client() = *me;
    if (!same) req.mutable_client()->set_model_fingerprint("another-model");
    v1::HandshakeResponse resp;
    grpc::ClientContext hctx;
    hctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    const grpc::Status hs = stub->Handshake(&hctx, req, &resp);
    if (same) {
      EXPECT_TRUE(hs.ok()) << hs.error_message();
      EXPECT_EQ(resp.server().service(), "attention-service");
      EXPECT_EQ(resp.server().model_fingerprint(), me->model_fingerprint());
    } else {
      EXPECT_EQ(hs.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    }
  }
  ExpectReferenceOutputs(*cluster_, 2);  // still serves
}

// Each test gets its own cluster of 2 shard groups x 2 replicas.
class ReplicatedClusterTest : public ClusterTest {
 protected:
  void SetUp() override { StartCluster(2, 2); }
  // SIGKILLs both replicas of shard 0.
  void KillShard0() {
    ASSERT_TRUE(cluster_->KillExpert(0, 0, SIGKILL).ok());
    ASSERT_TRUE(cluster_->KillExpert(0, 1, SIGKILL).ok());
  }
};

// SIGKILL one replica of shard 0 while a sequence is generating: the sequence finishes with
// the same tokens through the other replica.
TEST_F(ReplicatedClusterTest, ReplicaKilledMidGenerationFinishesThroughTheOther) {
  auto stub = Stub(*cluster_);
  constexpr int kLong = 120;
  absl::StatusOr<std::vector<std::vector<int32_t>>> want_long =
      testing::ReferenceGreedy(*model_dir_, {(*prompts_)[1]}, kLong);
  ASSERT_TRUE(want_long.ok());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto reader = stub->Submit(&ctx, GreedyRequest("survivor", (*prompts_)[1], kLong));
  std::vector<int32_t> got;
  v1::TokenEvent e;
  ASSERT_TRUE(reader->Read(&e));
  got.insert(got.end(), e.token_ids().begin(), e.token_ids().end());
  // Kill the replica of shard 0 that has been computing (the dispatcher prefers one).
  const std::string kRows = "expertmesh_expert_rows_total";
  const int busy = Metric(cluster_->expert(0, 0).metrics_port, kRows) > 0 ? 0 : 1;
  const int other = 1 - busy;
  ASSERT_GT(Metric(cluster_->expert(0, busy).metrics_port, kRows), 0.0);
  const double other_rows_before = Metric(cluster_->expert(0, other).metrics_port, kRows);
  ASSERT_TRUE(cluster_->KillExpert(0, busy, SIGKILL).ok());
  while (reader->Read(&e)) got.insert(got.end(), e.token_ids().begin(), e.token_ids().end());
  const grpc::Status s = reader->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_LT(1u, got.size());
  EXPECT_EQ(got, (*want_long)[0]);  // the same tokens, through the other replica
  EXPECT_GT(Metric(cluster_->expert(0, other).metrics_port, kRows), other_rows_before);
}

// No replica of shard 0 left: sequences fail with UNAVAILABLE within the step deadline; the
// services stay up.
TEST_F(ReplicatedClusterTest, NoReplicaLeftIsUnavailableWithinTheStepDeadline) {
  auto stub = Stub(*cluster_);
  ASSERT_NO_FATAL_FAILURE(KillShard0());
  {
    const absl::Time start = absl::Now();
    SubmitResult r =
        SubmitAndCollect(*stub, GreedyRequest("orphan", (*prompts_)[2], kMaxTokens), 30000);
    const absl::Duration took = absl::Now() - start;
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
    EXPECT_NE(r.status.error_message().find("shard 0"), std::string::npos)
        << r.status.error_message();
    // One step's deadline, plus prefill before the first MoE layer and loopback slack.
    EXPECT_LT(took, absl::Milliseconds(cluster_->options().step_deadline_ms) + absl::Seconds(2));
  }
  EXPECT_TRUE(cluster_->UnexpectedExits().empty());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::LoadResponse load;
  ASSERT_TRUE(stub->GetLoad(&ctx, v1::LoadRequest(), &load).ok());
  EXPECT_EQ(load.running() + load.waiting(), 0u);
  EXPECT_EQ(load.kv_blocks_used(), 0u);
}

// With no replica of shard 0 left the attention service turns NOT_SERVING; once a replica
// of that shard registers again it turns SERVING and the cluster serves the reference tokens.
TEST_F(ReplicatedClusterTest, ServesAgainOnceAReplicaRegisters) {
  ASSERT_NO_FATAL_FAILURE(KillShard0());
  // The router expires the killed replicas (its expiry), then the attention service stops
  // serving.
  ASSERT_TRUE(testing::PollUntil([&] { return !Healthy(*cluster_); }, absl::Seconds(30),
                                 absl::Milliseconds(20)));
  ASSERT_TRUE(cluster_->RestartExpert(0, 0).ok());
  ASSERT_TRUE(launcher::WaitServing(cluster_->attention().grpc_address, absl::Seconds(30)).ok());
  ExpectReferenceOutputs(*cluster_, 8);
}

}  // namespace
}  // namespace expertmesh
