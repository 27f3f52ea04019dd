// Live expert rebalancing end to end (issue 16, section 2): a whole cluster as real processes on
// loopback (router-service, expert-service x shard groups x replicas, attention-service, started
// by the launcher as `expertmesh up` starts them) keeps serving greedy streams while the router
// moves experts between shard groups:
//  - worker threads submit greedy requests back to back (4 of 8 tokens, 1 of 120 tokens),
//    before, during and after the change;
//    every stream's tokens equal the plain in-process engine's (ReferenceGreedy(..., 0): exact
//    combine, the same engine for every placement), and no request fails;
//  - the change is started by the Rebalance RPC with force (or, in one case, by the router's
//    automatic trigger with a low threshold and a 1 s check) once the attention service's
//    load reports reached the router; the router publishes a new map version and no replica
//    is left loading; requests finished before the call, ran while the change was pending,
//    ran across the switch (submitted under the old map, finished under the new one) and
//    after it -- at least one of each, all with the reference tokens;
//  - the new placement holds every expert, with redundant copies where the slots allow them
//    (the default) and none with --redundant-experts 0; the shards loaded the experts they
//    gained live (their expertmesh_expert_placement_loads_total), and a group that lost an
//    expert releases it once no step uses it (--release-grace-s 1);
//  - one shard group: the rebalance is a no-op and the answer says so; the map stays.
// Models: the random test model with a gate skew (the first quarter of each layer's experts hot:
// group 0 of the even placement), and the bundled model (16 experts, top-4).
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "expertmesh/v1/attention.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "gtest/gtest.h"
#include "service-common/grpc_util.h"
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

constexpr int kMaxTokens = 8;
constexpr int kPrompts = 12;
constexpr int kWorkers = 4;
constexpr int kLongTokens = 120;  // the fifth worker's streams
// Routed (layer, expert) tokens the router's window must hold before a rebalance (its
// --rebalance-min-tokens; the default 2000 is for real traffic).
constexpr int kMinTokens = 150;

enum class ModelKind { kRandomSkewed, kBundled };
enum class Trigger { kForced, kAutomatic };

struct Case {
  const char* name;
  ModelKind model;
  int shards;
  int replicas;
  bool redundant;  // false: --redundant-experts 0
  Trigger trigger = Trigger::kForced;
  // router --group-aligned: whole expert groups per shard group (with more shard groups than
  // expert groups, copies of each; the shards start with the even plan's experts and load the
  // rest live before they enter the map).
  bool group_aligned = false;
};

std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }

// The cluster's map: per (layer, expert) the shard groups holding it.
using Holders = std::map<std::pair<int, int>, std::set<int>>;
Holders HoldersOf(const v1::PlacementMap& map) {
  Holders h;
  for (const v1::ShardGroup& g : map.shards()) {
    for (const v1::LayerExpert& le : g.experts()) h[{le.layer(), le.expert()}].insert(g.shard_id());
  }
  return h;
}

// The sum of a metric's series (all label sets) in a service's /metrics; NaN when unreadable.
double MetricSum(int metrics_port, const std::string& name) {
  absl::StatusOr<std::string> text = HttpGet("127.0.0.1", metrics_port, "/metrics");
  if (!text.ok()) return NAN;
  double sum = 0;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    if (!absl::StartsWith(line, name)) continue;
    const absl::string_view rest = line.substr(name.size());
    if (rest.empty() || (rest[0] != ' ' && rest[0] != '{')) continue;
    double v = 0;
    if (absl::SimpleAtod(rest.substr(rest.rfind(' ') + 1), &v)) sum += v;
  }
  return sum;
}

class RebalanceClusterTest : public ::testing::TestWithParam<Case> {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> dir = testing::MakeClusterTestModel(/*gate_skew=*/0.3);
    ASSERT_TRUE(dir.ok()) << dir.status();
    random_dir_ = new std::string(*dir);
    bundled_dir_ = new std::string(std::string(EXPERTMESH_SOURCE_DIR) + "/models/expertmesh-tiny");
    random_prompts_ =
        new std::vector<std::vector<int32_t>>(testing::MakePrompts(kPrompts, 12, 320, 31));
    bundled_prompts_ =
        new std::vector<std::vector<int32_t>>(testing::MakePrompts(kPrompts, 12, 4096, 37));
    // The plain in-process engine: what every placement must give, before, during and after.
    absl::StatusOr<std::vector<std::vector<int32_t>>> want =
        testing::ReferenceGreedy(*random_dir_, *random_prompts_, kMaxTokens);
    ASSERT_TRUE(want.ok()) << want.status();
    random_want_ = new std::vector<std::vector<int32_t>>(*std::move(want));
    want = testing::ReferenceGreedy(*bundled_dir_, *bundled_prompts_, kMaxTokens);
    ASSERT_TRUE(want.ok()) << want.status();
    bundled_want_ = new std::vector<std::vector<int32_t>>(*std::move(want));
    want = testing::ReferenceGreedy(*random_dir_, {(*random_prompts_)[0]}, kLongTokens);
    ASSERT_TRUE(want.ok()) << want.status();
    random_long_want_ = new std::vector<int32_t>((*want)[0]);
    want = testing::ReferenceGreedy(*bundled_dir_, {(*bundled_prompts_)[0]}, kLongTokens);
    ASSERT_TRUE(want.ok()) << want.status();
    bundled_long_want_ = new std::vector<int32_t>((*want)[0]);
  }
  static void TearDownTestSuite() {
    if (random_dir_ != nullptr) std::filesystem::remove_all(*random_dir_);
    delete random_dir_;
    delete bundled_dir_;
    delete random_prompts_;
    delete bundled_prompts_;
    delete random_want_;
    delete bundled_want_;
    delete random_long_want_;
    delete bundled_long_want_;
  }

  static ClusterOptions Options(const Case& c) {
    ClusterOptions o;
    o.model_dir = c.model == ModelKind::kBundled ? *bundled_dir_ : *random_dir_;
    o.shards = c.shards;
    o.replicas = c.replicas;
    o.bin_dir = EXPERTMESH_BINARY_DIR;
    o.kv_blocks = 512;
    o.kv_block_size = 16;
    o.max_batch = 16;
    o.max_waiting = 64;
    o.prefill_chunk = 16;
    o.step_deadline_ms = 5000;
    o.extra_attention_args = {"--attempt-timeout-ms", "2000"};
    o.extra_router_args = {"--rebalance-min-tokens", std::to_string(kMinTokens)};
    if (c.trigger == Trigger::kForced) {
      o.extra_router_args.push_back("--no-rebalance");  // the RPC alone changes the placement
    } else {
      for (const char* a : {"--rebalance-threshold", "1.05", "--rebalance-check-s", "1",
                            "--rebalance-cooldown-s", "3600"}) {
        o.extra_router_args.push_back(a);
      }
    }
    if (c.group_aligned) o.extra_router_args.push_back("--group-aligned");
    if (!c.redundant) {
      o.extra_router_args.push_back("--redundant-experts");
      o.extra_router_args.push_back("0");
    }
    o.extra_expert_args = {"--release-grace-s", "1"};
    return o;
  }

  static v1::StatusResponse Status(const Cluster& cluster) {
    auto stub = v1::RouterService::NewStub(MakeChannel(cluster.router().grpc_address));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::StatusResponse resp;
    const grpc::Status s = stub->GetStatus(&ctx, v1::StatusRequest{}, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp;
  }
  static uint64_t WindowTokens(const v1::StatusResponse& s) {
    uint64_t n = 0;
    for (const v1::LayerExpertLoad& l : s.expert_load()) n += l.tokens();
    return n;
  }

  static std::string* random_dir_;
  static std::string* bundled_dir_;
  static std::vector<std::vector<int32_t>>* random_prompts_;
  static std::vector<std::vector<int32_t>>* bundled_prompts_;
  static std::vector<std::vector<int32_t>>* random_want_;
  static std::vector<std::vector<int32_t>>* bundled_want_;
  static std::vector<int32_t>* random_long_want_;  // prompt 0, kLongTokens
  static std::vector<int32_t>* bundled_long_want_;
};
std::string* RebalanceClusterTest::random_dir_ = nullptr;
std::string* RebalanceClusterTest::bundled_dir_ = nullptr;
std::vector<std::vector<int32_t>>* RebalanceClusterTest::random_prompts_ = nullptr;
std::vector<std::vector<int32_t>>* RebalanceClusterTest::bundled_prompts_ = nullptr;
std::vector<std::vector<int32_t>>* RebalanceClusterTest::random_want_ = nullptr;
std::vector<std::vector<int32_t>>* RebalanceClusterTest::bundled_want_ = nullptr;
std::vector<int32_t>* RebalanceClusterTest::random_long_want_ = nullptr;
std::vector<int32_t>* RebalanceClusterTest::bundled_long_want_ = nullptr;

// One finished request of the workers below.
struct Finished {
  int prompt = 0;
  int max_tokens = 0;
  absl::Time submitted, finished;
  SubmitResult result;
};

TEST_P(RebalanceClusterTest, StreamsKeepTheReferenceTokensThroughALiveRebalance) {
  const Case& c = GetParam();
  const bool bundled = c.model == ModelKind::kBundled;
  const std::vector<std::vector<int32_t>>& prompts = bundled ? *bundled_prompts_ : *random_prompts_;
  const std::vector<std::vector<int32_t>>& want = bundled ? *bundled_want_ : *random_want_;
  const std::vector<int32_t>& long_want = bundled ? *bundled_long_want_ : *random_long_want_;

  absl::StatusOr<std::unique_ptr<Cluster>> started = Cluster::Start(Options(c));
  ASSERT_TRUE(started.ok()) << started.status();
  Cluster& cluster = **started;

  // Workers: greedy requests back to back until told to stop (and joined on every exit path).
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::vector<Finished> done;
  std::vector<std::thread> workers;
  struct Joiner {
    std::atomic<bool>& stop;
    std::vector<std::thread>& threads;
    ~Joiner() {
      stop = true;
      for (std::thread& t : threads) {
        if (t.joinable()) t.join();
      }
    }
  } joiner{stop, workers};
  auto submit = [&](v1::AttentionService::Stub& stub, const std::string& id, int prompt,
                    int max_tokens) {
    Finished f;
    f.prompt = prompt;
    f.max_tokens = max_tokens;
    f.submitted = absl::Now();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    std::unique_ptr<grpc::ClientReader<v1::TokenEvent>> reader =
        stub.Submit(&ctx, GreedyRequest(id, prompts[prompt], max_tokens));
    v1::TokenEvent e;
    while (reader->Read(&e)) {
      f.result.tokens.insert(f.result.tokens.end(), e.token_ids().begin(), e.token_ids().end());
      if (e.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) f.result.finish = e.finish_reason();
    }
    f.result.status = reader->Finish();
    f.finished = absl::Now();
    std::lock_guard<std::mutex> lock(mu);
    done.push_back(std::move(f));
  };
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&, w] {
      auto stub = v1::AttentionService::NewStub(MakeChannel(cluster.attention().grpc_address));
      for (int n = 0; !stop.load(); ++n) {
        submit(*stub, absl::StrCat("w", w, "-", n), (w + n * kWorkers) % kPrompts, kMaxTokens);
      }
    });
  }
  auto count_submitted_after = [&](absl::Time t) {
    std::lock_guard<std::mutex> lock(mu);
    return std::count_if(done.begin(), done.end(),
                         [&](const Finished& f) { return f.submitted > t; });
  };

  // The attention service's load reports (every 5 s) reach the router's window.
  const v1::StatusResponse before = Status(cluster);
  const uint64_t v0 = before.placement().version();
  EXPECT_TRUE(testing::PollUntil([&] { return WindowTokens(Status(cluster)) >= kMinTokens; },
                                 absl::Seconds(30), absl::Milliseconds(200)))
      << "no load reached the router";
  if (c.trigger == Trigger::kForced) {
    EXPECT_EQ(Status(cluster).placement().version(), v0);  // nothing changed yet
  }

  // A fifth worker with longer streams (prompt 0, kLongTokens each), also back to back.
  workers.emplace_back([&] {
    auto stub = v1::AttentionService::NewStub(MakeChannel(cluster.attention().grpc_address));
    for (int n = 0; !stop.load(); ++n) {
      submit(*stub, absl::StrCat("long-", n), 0, kLongTokens);
    }
  });

  const absl::Time asked = absl::Now();
  v1::RebalanceResponse answer;
  if (c.trigger == Trigger::kForced) {
    auto stub = v1::RouterService::NewStub(MakeChannel(cluster.router().grpc_address));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::RebalanceRequest req;
    req.set_force(true);
    const grpc::Status s = stub->Rebalance(&ctx, req, &answer);
    ASSERT_TRUE(s.ok()) << s.error_message();
    std::printf("[ info ] %s: Rebalance answered started=%d, %s (moved %u, redundant %u)\n", c.name,
                answer.started(), answer.reason().c_str(), answer.experts_moved(),
                answer.redundant_copies());
  }

  absl::Time published = absl::InfinitePast();
  v1::StatusResponse after;
  if (c.shards == 1) {
    // One shard group: nothing to balance; the answer says so and the map stays.
    EXPECT_FALSE(answer.started());
    EXPECT_NE(answer.reason().find("current one"), std::string::npos) << answer.reason();
    EXPECT_EQ(answer.experts_moved(), 0u);
    EXPECT_EQ(answer.redundant_copies(), 0u);
    published = absl::Now();
    after = Status(cluster);
    EXPECT_EQ(after.placement().version(), v0);
    EXPECT_FALSE(after.rebalance().pending());
  } else {
    if (c.trigger == Trigger::kForced) {
      EXPECT_TRUE(answer.started()) << answer.reason();
      EXPECT_GT(answer.experts_moved(), 0u);
      EXPECT_GT(answer.target_generation(), 0u);
    }
    // The new map is published once every replica holds it.
    EXPECT_TRUE(testing::PollUntil(
        [&] {
          after = Status(cluster);
          return after.rebalance().rebalances() >= 1 && !after.rebalance().pending() &&
                 after.placement().version() > v0;
        },
        absl::Seconds(40), absl::Milliseconds(50)))
        << "no new map: " << after.rebalance().last_result();
    published = absl::Now();
    for (const v1::ShardGroup& g : after.placement().shards()) {
      EXPECT_FALSE(g.replicas().empty()) << "group " << g.shard_id();
      for (const v1::ShardReplica& r : g.replicas()) {
        EXPECT_TRUE(r.healthy()) << r.replica_id();
        EXPECT_FALSE(r.loading()) << r.replica_id();
      }
    }
  }

  // Every expert of every MoE layer has a holder; copies as configured.
  const Holders was = HoldersOf(before.placement());
  const Holders now = HoldersOf(after.placement());
  EXPECT_EQ(now.size(), was.size());
  uint32_t copies = 0;
  for (const auto& [le, groups] : now) {
    EXPECT_FALSE(groups.empty());
    copies += static_cast<uint32_t>(groups.size()) - 1;
  }
  EXPECT_EQ(after.rebalance().redundant_copies(), copies);
  if (c.shards > 1 && c.redundant) {
    EXPECT_GT(copies, 0u) << "free slots but no redundant copy";
  } else {
    EXPECT_EQ(copies, 0u);
  }
  std::printf("[ info ] %s: map v%llu -> v%llu, %u redundant copies, imbalance %.3f\n", c.name,
              static_cast<unsigned long long>(v0),
              static_cast<unsigned long long>(after.placement().version()), copies,
              after.rebalance().imbalance());

  if (c.shards > 1) {
    // The shards loaded what their groups gained, live.
    double loads = 0;
    for (int s = 0; s < c.shards; ++s) {
      for (int r = 0; r < c.replicas; ++r) {
        loads +=
            MetricSum(cluster.expert(s, r).metrics_port, "expertmesh_expert_placement_loads_total");
      }
    }
    EXPECT_GT(loads, 0.0);
    // A group that lost an expert releases it once unused (--release-grace-s 1), while the
    // workers keep sending steps.
    std::set<int> losers;
    for (const auto& [le, groups] : was) {
      for (int g : groups) {
        if (!now.count(le) || !now.at(le).count(g)) losers.insert(g);
      }
    }
    for (int g : losers) {
      EXPECT_TRUE(testing::PollUntil(
          [&] {
            for (int r = 0; r < c.replicas; ++r) {
              if (!(MetricSum(cluster.expert(g, r).metrics_port,
                              "expertmesh_expert_placement_releases_total") > 0)) {
                return false;
              }
            }
            return true;
          },
          absl::Seconds(20), absl::Milliseconds(100)))
          << "group " << g << " kept the experts it lost";
    }
  }

  // "After": every worker finishes at least one request submitted after the new map.
  EXPECT_TRUE(testing::PollUntil([&] { return count_submitted_after(published) >= kWorkers; },
                                 absl::Seconds(60), absl::Milliseconds(20)));
  stop = true;
  for (std::thread& t : workers) t.join();
  workers.clear();

  // Before: finished before the call. During: running while the change was pending (between
  // the call and the published map). Across the switch: submitted before the new map was
  // published and finished after it, so decoded under both maps. After: submitted after it.
  int before_n = 0, during_n = 0, across_n = 0, after_n = 0, long_n = 0;
  for (const Finished& f : done) {
    SCOPED_TRACE(::testing::Message()
                 << "prompt " << f.prompt << ", " << f.max_tokens << " tokens");
    EXPECT_TRUE(f.result.status.ok()) << f.result.status.error_message();
    EXPECT_EQ(f.result.finish, v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(f.result.tokens, f.max_tokens == kLongTokens ? long_want : want[f.prompt]);
    long_n += f.max_tokens == kLongTokens ? 1 : 0;
    if (f.finished < asked) ++before_n;
    if (f.submitted < published && f.finished > asked) ++during_n;
    if (f.submitted < published && f.finished > published) ++across_n;
    if (f.submitted > published) ++after_n;
  }
  std::printf(
      "[ info ] %s: %zu requests (%d of %d tokens) equal the in-process engine: %d before the "
      "rebalance, %d during the %.0f ms from the call to the new map, %d across the switch, %d "
      "after\n",
      c.name, done.size(), long_n, kLongTokens, before_n, during_n,
      absl::ToDoubleMilliseconds(published - asked), across_n, after_n);
  EXPECT_GT(before_n, 0);
  EXPECT_GT(during_n, 0);
  EXPECT_GT(across_n, 0);
  EXPECT_GE(after_n, kWorkers);
  EXPECT_GT(long_n, 0);

  EXPECT_TRUE(cluster.UnexpectedExits().empty());
  EXPECT_TRUE(cluster.Stop().ok());
  if (HasFailure()) {
    std::printf("[ info ] service logs kept in %s\n", cluster.log_dir().c_str());
  } else {
    std::filesystem::remove_all(cluster.log_dir());
  }
}

INSTANTIATE_TEST_SUITE_P(
    Placements, RebalanceClusterTest,
    ::testing::Values(Case{"random_1x2", ModelKind::kRandomSkewed, 1, 2, true},
                      Case{"random_2x2", ModelKind::kRandomSkewed, 2, 2, true},
                      Case{"random_3x1_no_copies", ModelKind::kRandomSkewed, 3, 1, false},
                      Case{"random_4x1_automatic", ModelKind::kRandomSkewed, 4, 1, true,
                           Trigger::kAutomatic},
                      Case{"random_4x1_no_copies", ModelKind::kRandomSkewed, 4, 1, false},
                      Case{"bundled_2x1_no_copies", ModelKind::kBundled, 2, 1, false},
                      Case{"bundled_3x2", ModelKind::kBundled, 3, 2, true},
                      Case{"bundled_4x1", ModelKind::kBundled, 4, 1, true},
                      Case{"bundled_8x1_group_aligned", ModelKind::kBundled, 8, 1, true,
                           Trigger::kForced, /*group_aligned=*/true}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace expertmesh
