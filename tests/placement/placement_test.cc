// Placement plans (even spread, group-aligned, redundant copies, JSON files, expert lists, map
// round trip, the copy choice per row) and the router's membership state (registration checks,
// heartbeats, expiry with injected time, versions).
#include "placement/placement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/model/gate.h"

#include "router/membership.h"

namespace expertmesh {
namespace {

template <typename T>
void ExpectError(const absl::StatusOr<T>& r, const std::string& needle) {
  ASSERT_FALSE(r.ok()) << "expected an error containing '" << needle << "'";
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
}

std::vector<int32_t> Copies(const Placement& p, int layer, int expert) {
  const std::span<const int32_t> s = p.ShardsOf(layer, expert);
  return std::vector<int32_t>(s.begin(), s.end());
}

ModelConfig TestConfig() {
  ModelConfig c;
  c.hidden_size = 256;
  c.num_hidden_layers = 4;
  c.num_nextn_predict_layers = 1;  // layer 4 is the MTP layer, MoE too
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  return c;
}

TEST(PlacementTest, EvenSpreadsContiguousRangesOverEveryMoeLayer) {
  const ModelConfig c = TestConfig();
  absl::StatusOr<Placement> p = EvenPlacement(c, 3);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->n_layers, 5);
  EXPECT_EQ(p->ShardOf(0, 0), -1);  // dense layer
  // floor(e * 3 / 8): 0 0 0 1 1 1 2 2
  const std::vector<int32_t> want = {0, 0, 0, 1, 1, 1, 2, 2};
  for (int l = 1; l < 5; ++l) {
    for (int e = 0; e < 8; ++e) EXPECT_EQ(p->ShardOf(l, e), want[e]) << l << " " << e;
  }
  EXPECT_EQ(p->ExpertsOf(2).size(), 2u * 4u);
  EXPECT_EQ(p->ExpertsOf(0).front(), (LayerExpert{1, 0}));
  EXPECT_EQ(p->ShardOf(5, 0), -1);
  EXPECT_EQ(p->ShardOf(1, 8), -1);
  EXPECT_FALSE(EvenPlacement(c, 0).ok());
  EXPECT_FALSE(EvenPlacement(c, 9).ok());
  size_t total = 0;
  for (int s = 0; s < 3; ++s) total += p->ExpertsOf(s).size();
  EXPECT_EQ(total, AllExperts(c).size());
}

TEST(PlacementTest, JsonRoundTripAndRejections) {
  const ModelConfig c = TestConfig();
  const std::string json =
      R"({"num_shards": 2, "layers": {"1": [0,1,0,1,0,1,0,1], "2": [1,1,1,1,0,0,0,0],)"
      R"( "3": [0,0,0,0,0,0,0,1], "4": [1,0,0,0,0,0,0,0]}})";
  absl::StatusOr<Placement> p = PlacementFromJson(json, c);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->ShardOf(1, 1), 1);
  EXPECT_EQ(p->ShardOf(2, 0), 1);
  EXPECT_EQ(p->ShardOf(3, 7), 1);
  absl::StatusOr<Placement> again = PlacementFromJson(PlacementToJson(*p), c);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->shard_of, p->shard_of);

  const auto rejected = [&](const std::string& j, const std::string& needle) {
    absl::StatusOr<Placement> r = PlacementFromJson(j, c);
    ASSERT_FALSE(r.ok()) << j;
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
  };
  rejected("{", "bad JSON");
  rejected(R"({"layers": {}})", "num_shards");
  rejected(R"({"num_shards": 2, "layers": {"0": [0,0,0,0,0,0,0,0]}})", "not a MoE layer");
  rejected(R"({"num_shards": 2, "layers": {"1": [0,1]}})", "must list 8");
  rejected(R"({"num_shards": 2, "layers": {"1": [0,1,0,1,0,1,0,2]}})", "shard id");
  rejected(R"({"num_shards": 1, "layers": {"1": [0,0,0,0,0,0,0,0]}})", "missing");
  rejected(R"({"num_shards": 3, "layers": {"1": [0,1,0,1,0,1,0,1], "2": [0,1,0,1,0,1,0,1],)"
           R"( "3": [0,1,0,1,0,1,0,1], "4": [0,1,0,1,0,1,0,1]}})",
           "shard 2 holds no expert");
}

TEST(PlacementTest, JsonWithRedundantCopies) {
  const ModelConfig c = TestConfig();
  const std::string json =
      R"({"num_shards": 3, "layers": {"1": [0,[2,1],0,1,0,1,2,2], "2": [[0,1,2],1,1,1,0,0,2,0],)"
      R"( "3": [0,0,0,0,1,1,2,2], "4": [1,0,0,0,0,0,0,[2]]}})";
  absl::StatusOr<Placement> p = PlacementFromJson(json, c);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(p->HasCopies());
  EXPECT_EQ(Copies(*p, 1, 1), (std::vector<int32_t>{1, 2}));  // sorted
  EXPECT_EQ(p->ShardOf(1, 1), 1);                             // the first copy
  EXPECT_EQ(Copies(*p, 2, 0), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(Copies(*p, 4, 7), (std::vector<int32_t>{2}));
  EXPECT_EQ(Copies(*p, 3, 4), (std::vector<int32_t>{1}));
  EXPECT_TRUE(Copies(*p, 0, 0).empty());  // dense layer
  EXPECT_TRUE(Copies(*p, 1, 8).empty());
  // ExpertsOf lists copies in every group that holds one.
  const std::vector<LayerExpert> s2 = p->ExpertsOf(2);
  EXPECT_TRUE(std::find(s2.begin(), s2.end(), LayerExpert{1, 1}) != s2.end());
  EXPECT_TRUE(std::find(s2.begin(), s2.end(), LayerExpert{2, 0}) != s2.end());
  const std::vector<LayerExpert> s1 = p->ExpertsOf(1);
  EXPECT_TRUE(std::find(s1.begin(), s1.end(), LayerExpert{1, 1}) != s1.end());
  size_t total = 0;
  for (int s = 0; s < 3; ++s) total += p->ExpertsOf(s).size();
  EXPECT_EQ(total, AllExperts(c).size() + 1 + 2);

  // Arrays only where there are copies; the round trip is exact.
  const std::string out = PlacementToJson(*p);
  EXPECT_NE(out.find("[0,[1,2],0,1,0,1,2,2]"), std::string::npos) << out;
  EXPECT_NE(out.find("[1,0,0,0,0,0,0,2]"), std::string::npos) << out;
  absl::StatusOr<Placement> again = PlacementFromJson(out, c);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, *p);

  // Through the router's map and back.
  v1::PlacementMap map;
  FillShardGroups(*p, &map);
  EXPECT_EQ(map.shards(2).experts_size(), static_cast<int>(p->ExpertsOf(2).size()));
  absl::StatusOr<Placement> from_map = PlacementFromMap(map);
  ASSERT_TRUE(from_map.ok()) << from_map.status();
  EXPECT_EQ(*from_map, *p);

  // A plan without copies keeps the plain table (no CSR) and equals the even plan.
  const std::string plain =
      R"({"num_shards": 2, "layers": {"1": [0,0,0,0,[1],1,1,1], "2": [0,0,0,0,1,1,1,1],)"
      R"( "3": [0,0,0,0,1,1,1,1], "4": [0,0,0,0,1,1,1,1]}})";
  absl::StatusOr<Placement> q = PlacementFromJson(plain, c);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_FALSE(q->HasCopies());
  EXPECT_EQ(*q, *EvenPlacement(c, 2));

  const std::string rest = R"(, "2": [0,1,0,1,0,1,0,1], "3": [0,1,0,1,0,1,0,1],)"
                           R"( "4": [0,1,0,1,0,1,0,1]}})";
  ExpectError(
      PlacementFromJson(R"({"num_shards": 2, "layers": {"1": [[],1,0,1,0,1,0,1])" + rest, c),
      "empty array");
  ExpectError(
      PlacementFromJson(R"({"num_shards": 2, "layers": {"1": [[0,0],1,0,1,0,1,0,1])" + rest, c),
      "lists a shard twice");
  ExpectError(
      PlacementFromJson(R"({"num_shards": 2, "layers": {"1": [[0,2],1,0,1,0,1,0,1])" + rest, c),
      "layers.1[0] must be a shard id in [0, 2)");
  ExpectError(
      PlacementFromJson(R"({"num_shards": 2, "layers": {"1": [[0,[1]],1,0,1,0,1,0,1])" + rest, c),
      "must be a shard id");
  ExpectError(
      PlacementFromJson(R"({"num_shards": 2, "layers": {"1": ["0",1,0,1,0,1,0,1])" + rest, c),
      "must be a shard id");
  Placement bad = *EvenPlacement(c, 2);
  std::vector<std::vector<int32_t>> lists(bad.shard_of.size());
  lists[8] = {1, 0};
  EXPECT_FALSE(bad.SetCopies(lists).ok());
  lists[8] = {0, 2};
  EXPECT_FALSE(bad.SetCopies(lists).ok());
  lists.pop_back();
  EXPECT_FALSE(bad.SetCopies(lists).ok());
}

// Experts 0-7 of layer 1 over 4 groups: 0,1 -> {0}; 2 -> {0,1}; 3,4 -> {1,2}; 5 -> {2,3};
// 6 -> {3}; 7 -> {0,1,2,3}.
Placement ChoiceFixture() {
  const ModelConfig c = TestConfig();
  Placement p = *EvenPlacement(c, 4);
  std::vector<std::vector<int32_t>> lists(p.shard_of.size());
  for (int l = 1; l < 5; ++l) {
    const std::vector<std::vector<int32_t>> row = {{0},    {0},    {0, 1}, {1, 2},
                                                   {1, 2}, {2, 3}, {3},    {0, 1, 2, 3}};
    for (int e = 0; e < 8; ++e) lists[l * 8 + e] = row[e];
  }
  EXPECT_TRUE(p.SetCopies(lists).ok());
  return p;
}

std::vector<int32_t> Choose(const Placement& p, std::vector<int32_t> experts, uint64_t key) {
  std::vector<int32_t> out(experts.size(), 99);
  EXPECT_TRUE(ChooseShards(p, 1, experts, key, out));
  return out;
}

TEST(PlacementTest, ChooseShardsPrefersGroupsTheRowUsesAndIsDeterministic) {
  const Placement p = ChoiceFixture();
  for (uint64_t key = 0; key < 16; ++key) {
    // Expert 2 joins expert 0's group 0; expert 5 joins expert 6's group 3.
    EXPECT_EQ(Choose(p, {0, 2, 5, 6}, key), (std::vector<int32_t>{0, 0, 3, 3})) << key;
    // 3 and 4 share their copies: both go to the same one, whichever it is.
    const std::vector<int32_t> s = Choose(p, {3, 4}, key);
    EXPECT_EQ(s[0], s[1]);
    // 2 then 3: 3 joins 2's group when 2 took group 1 (the copy they share).
    const std::vector<int32_t> t = Choose(p, {2, 3, 5}, key);
    if (t[0] == 1) {
      EXPECT_EQ(t[1], 1) << key;
    }
    // Spreading ignores the groups the row uses: expert 2 takes turns whatever the row.
    std::vector<int32_t> spread(2);
    ASSERT_TRUE(ChooseShards(p, 1, std::vector<int32_t>{0, 2}, key, spread, CopyChoice::kSpread));
    EXPECT_EQ(spread, (std::vector<int32_t>{0, static_cast<int32_t>((key + 2) % 2)})) << key;
    // Expert 7 (in every group) follows whatever the row uses.
    EXPECT_EQ(Choose(p, {6, 7}, key), (std::vector<int32_t>{3, 3}));
    EXPECT_EQ(Choose(p, {7, 1}, key), (std::vector<int32_t>{0, 0}));
    // Same inputs, same answer.
    EXPECT_EQ(Choose(p, {2, 3, 5}, key), t);
  }
  // Alone, an expert's copies share the rows evenly over consecutive keys.
  std::vector<int> hits(4, 0);
  for (uint64_t key = 0; key < 400; ++key) ++hits[Choose(p, {7}, key)[0]];
  EXPECT_EQ(hits, (std::vector<int>{100, 100, 100, 100}));
  std::vector<int> two(4, 0);
  for (uint64_t key = 0; key < 400; ++key) ++two[Choose(p, {3}, key)[0]];
  EXPECT_EQ(two, (std::vector<int>{0, 200, 200, 0}));

  // Without copies the choice is ShardOf.
  const Placement even = *EvenPlacement(TestConfig(), 3);
  const std::vector<int32_t> row = {0, 3, 5, 7};
  std::vector<int32_t> out(4);
  ASSERT_TRUE(ChooseShards(even, 2, row, 12345, out));
  for (size_t i = 0; i < row.size(); ++i) EXPECT_EQ(out[i], even.ShardOf(2, row[i]));

  // Unknown experts and mismatched spans fail; the rest is still filled.
  std::vector<int32_t> bad_out(2);
  const std::vector<int32_t> bad = {0, 8};
  EXPECT_FALSE(ChooseShards(p, 1, bad, 0, bad_out));
  EXPECT_EQ(bad_out, (std::vector<int32_t>{0, -1}));
  EXPECT_FALSE(
      ChooseShards(p, 0, std::vector<int32_t>{0}, 0, std::span<int32_t>(bad_out.data(), 1)));
  std::vector<int32_t> three(3);
  EXPECT_FALSE(ChooseShards(p, 1, row, 0, three));
}

ModelConfig GroupedConfig() {
  ModelConfig c = TestConfig();
  c.n_routed_experts = 64;
  c.n_group = 8;
  c.topk_group = 4;
  c.num_experts_per_tok = 8;
  return c;
}

TEST(PlacementTest, GroupAlignedPlacementHoldsWholeExpertGroups) {
  const ModelConfig c = GroupedConfig();
  for (int n : {1, 2, 4, 8, 16, 32}) {
    bool aligned = false;
    absl::StatusOr<Placement> p = GroupAlignedPlacement(c, n, &aligned);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_TRUE(aligned) << n;
    for (int l = 1; l < 5; ++l) {
      for (int g = 0; g < 8; ++g) {
        // Every expert of an expert group has the same copies: the group lives whole there.
        for (int e = g * 8; e < g * 8 + 8; ++e) {
          EXPECT_EQ(Copies(*p, l, e), Copies(*p, l, g * 8)) << n << " " << e;
        }
        EXPECT_EQ(Copies(*p, l, g * 8).size(), static_cast<size_t>(std::max(1, n / 8)));
      }
    }
    for (int s = 0; s < n; ++s) EXPECT_EQ(p->ExpertsOf(s).size(), 4u * std::max(8, 64 / n));
  }
  bool aligned = true;
  absl::StatusOr<Placement> three = GroupAlignedPlacement(c, 3, &aligned);
  ASSERT_TRUE(three.ok());
  EXPECT_FALSE(aligned);
  EXPECT_EQ(*three, *EvenPlacement(c, 3));
  EXPECT_FALSE(GroupAlignedPlacement(c, 65).ok());
  ModelConfig ungrouped = TestConfig();  // n_group 1
  ASSERT_TRUE(GroupAlignedPlacement(ungrouped, 2, &aligned).ok());
  EXPECT_FALSE(aligned);
}

// Random gate outputs (the real group-limited top-k): a token reaches at most topk_group shard
// groups under the group-aligned plan; the even plan does not keep that bound at 16 groups.
TEST(PlacementTest, GroupAlignedBoundsShardsPerToken) {
  const ModelConfig c = GroupedConfig();
  absl::StatusOr<GateParams> gp = GateParams::FromConfig(c);
  ASSERT_TRUE(gp.ok()) << gp.status();
  constexpr int kTokens = 4000;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> scores(static_cast<size_t>(kTokens) * 64), bias(64, 0.f);
  for (float& s : scores) s = u(rng);
  const ExpertRoutes routes = SelectExperts(*gp, scores, bias, kTokens);
  for (int n : {2, 4, 8, 16, 32}) {
    const Placement aligned = *GroupAlignedPlacement(c, n);
    const Placement even = *EvenPlacement(c, n);
    double sum_aligned = 0, sum_even = 0;
    int max_aligned = 0, max_even = 0;
    for (int r = 0; r < kTokens; ++r) {
      const std::span<const int32_t> ex(routes.experts.data() + routes.offsets[r],
                                        routes.offsets[r + 1] - routes.offsets[r]);
      ASSERT_EQ(ex.size(), 8u);
      for (const Placement* p : {&aligned, &even}) {
        std::vector<int32_t> s(ex.size());
        ASSERT_TRUE(ChooseShards(*p, 1, ex, static_cast<uint64_t>(r), s));
        std::sort(s.begin(), s.end());
        const int k = static_cast<int>(std::unique(s.begin(), s.end()) - s.begin());
        (p == &aligned ? sum_aligned : sum_even) += k;
        int& m = p == &aligned ? max_aligned : max_even;
        m = std::max(m, k);
      }
    }
    EXPECT_LE(max_aligned, c.topk_group) << n;
    EXPECT_LE(sum_aligned, sum_even) << n;
    std::printf(
        "shards/token over %2d groups: group-aligned mean %.3f max %d, even mean %.3f max %d\n", n,
        sum_aligned / kTokens, max_aligned, sum_even / kTokens, max_even);
    if (n == 16) {
      EXPECT_GT(max_even, c.topk_group);
    }
  }
}

TEST(PlacementTest, ExpertListParsing) {
  absl::StatusOr<std::vector<LayerExpert>> l = ParseExpertList("2:3,1; 1:0-2");
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(*l, (std::vector<LayerExpert>{{1, 0}, {1, 1}, {1, 2}, {2, 1}, {2, 3}}));
  EXPECT_FALSE(ParseExpertList("").ok());
  EXPECT_FALSE(ParseExpertList("1").ok());
  EXPECT_FALSE(ParseExpertList("x:1").ok());
  EXPECT_FALSE(ParseExpertList("1:3-2").ok());
  EXPECT_FALSE(ParseExpertList("1:-1").ok());
}

TEST(PlacementTest, MapRoundTripAndRejections) {
  const ModelConfig c = TestConfig();
  absl::StatusOr<Placement> p = EvenPlacement(c, 4);
  ASSERT_TRUE(p.ok());
  v1::PlacementMap map;
  FillShardGroups(*p, &map);
  absl::StatusOr<Placement> q = PlacementFromMap(map);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->shard_of, p->shard_of);
  EXPECT_EQ(q->num_shards, 4);

  // A second copy in another group is allowed; twice in one group is not.
  v1::PlacementMap copy = map;
  *copy.mutable_shards(1)->add_experts() = map.shards(0).experts(0);
  absl::StatusOr<Placement> with_copy = PlacementFromMap(copy);
  ASSERT_TRUE(with_copy.ok()) << with_copy.status();
  const LayerExpert first{map.shards(0).experts(0).layer(), map.shards(0).experts(0).expert()};
  EXPECT_EQ(std::vector<int32_t>(with_copy->ShardsOf(first.layer, first.expert).begin(),
                                 with_copy->ShardsOf(first.layer, first.expert).end()),
            (std::vector<int32_t>{0, 1}));
  v1::PlacementMap dup = map;
  *dup.mutable_shards(0)->add_experts() = map.shards(0).experts(0);
  ExpectError(PlacementFromMap(dup), "listed twice in shard 0");
  v1::PlacementMap missing = map;
  missing.mutable_shards(0)->mutable_experts()->RemoveLast();
  ExpectError(PlacementFromMap(missing), "is in no shard");
  v1::PlacementMap same_id = map;
  same_id.mutable_shards(1)->set_shard_id(0);
  ExpectError(PlacementFromMap(same_id), "appears twice");
  v1::PlacementMap out_of_range = map;
  out_of_range.mutable_shards(0)->mutable_experts(0)->set_expert(8);
  EXPECT_FALSE(PlacementFromMap(out_of_range).ok());
  v1::PlacementMap bad_id = map;
  bad_id.mutable_shards(0)->set_shard_id(7);
  EXPECT_FALSE(PlacementFromMap(bad_id).ok());
}

v1::RegisterRequest RegisterFor(const Placement& p, int shard, const std::string& address) {
  v1::RegisterRequest r;
  r.set_address(address);
  r.set_shard_id(shard);
  r.set_capacity(64);
  for (const LayerExpert& le : p.ExpertsOf(shard)) {
    v1::LayerExpert* x = r.add_experts();
    x->set_layer(le.layer);
    x->set_expert(le.expert);
  }
  return r;
}

TEST(MembershipTest, RegisterHeartbeatExpireDeregisterBumpVersions) {
  const ModelConfig c = TestConfig();
  Placement p = *EvenPlacement(c, 2);
  MembershipOptions o;
  o.heartbeat_interval = absl::Milliseconds(100);
  o.expiry = absl::Milliseconds(300);
  Membership m(p, o);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  EXPECT_EQ(m.version(), 1u);
  EXPECT_EQ(m.Map(t0).shards_size(), 2);
  EXPECT_EQ(m.Map(t0).shards(0).replicas_size(), 0);

  absl::StatusOr<v1::RegisterResponse> a = m.Register(RegisterFor(p, 0, "h:1"), t0);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->heartbeat_interval_ms(), 100u);
  EXPECT_EQ(a->expiry_ms(), 300u);
  absl::StatusOr<v1::RegisterResponse> b = m.Register(RegisterFor(p, 1, "h:2"), t0);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(m.version(), 3u);
  v1::PlacementMap map = m.Map(t0);
  EXPECT_EQ(map.version(), 3u);
  ASSERT_EQ(map.shards(0).replicas_size(), 1);
  EXPECT_EQ(map.shards(0).replicas(0).address(), "h:1");
  EXPECT_EQ(map.shards(1).replicas(0).replica_id(), b->replica_id());

  // Heartbeats keep a replica; silence beyond the expiry removes it.
  v1::HeartbeatRequest hb;
  hb.set_replica_id(a->replica_id());
  hb.set_outstanding_rows(7);
  EXPECT_TRUE(m.Heartbeat(hb, t0 + absl::Milliseconds(250)));
  EXPECT_FALSE(m.Expire(t0 + absl::Milliseconds(300)));
  EXPECT_TRUE(m.Expire(t0 + absl::Milliseconds(301)));  // b is silent since t0
  EXPECT_EQ(m.version(), 4u);
  map = m.Map(t0 + absl::Milliseconds(301));
  EXPECT_EQ(map.shards(1).replicas_size(), 0);
  EXPECT_EQ(map.shards(0).replicas(0).outstanding_rows(), 7u);
  v1::HeartbeatRequest gone;
  gone.set_replica_id(b->replica_id());
  EXPECT_FALSE(m.Heartbeat(gone, t0 + absl::Milliseconds(302)));  // must register again

  EXPECT_TRUE(m.Deregister(a->replica_id()));
  EXPECT_FALSE(m.Deregister(a->replica_id()));
  EXPECT_EQ(m.version(), 5u);
  EXPECT_EQ(m.replica_count(), 0u);
}

TEST(MembershipTest, IdsOfARestartedRouterAreNotTakenForAnotherReplicas) {
  // Router A registers replicas X and Y; it restarts as router B, where Y registers again
  // first. X's heartbeat with A's id must be unknown to B (so X registers again), never taken
  // for Y's registration at B (the ids of both counters start at 0).
  const ModelConfig c = TestConfig();
  Placement p = *EvenPlacement(c, 2);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  Membership a(p, MembershipOptions{});
  const std::string x_at_a = a.Register(RegisterFor(p, 1, "h:x"), t0)->replica_id();
  ASSERT_TRUE(a.Register(RegisterFor(p, 1, "h:y"), t0).ok());
  Membership b(p, MembershipOptions{});
  const std::string y_at_b = b.Register(RegisterFor(p, 1, "h:y"), t0)->replica_id();
  EXPECT_NE(x_at_a, y_at_b);
  v1::HeartbeatRequest hb;
  hb.set_replica_id(x_at_a);
  EXPECT_FALSE(b.Heartbeat(hb, t0));
}

TEST(MembershipTest, RegistrationMustMatchThePlacement) {
  const ModelConfig c = TestConfig();
  Placement p = *EvenPlacement(c, 2);
  Membership m(p, MembershipOptions{});
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  v1::RegisterRequest wrong = RegisterFor(p, 0, "h:1");
  wrong.set_shard_id(1);  // shard 0's experts claimed for shard 1
  EXPECT_EQ(m.Register(wrong, t0).status().code(), absl::StatusCode::kFailedPrecondition);
  v1::RegisterRequest partial = RegisterFor(p, 0, "h:1");
  partial.mutable_experts()->RemoveLast();
  EXPECT_EQ(m.Register(partial, t0).status().code(), absl::StatusCode::kFailedPrecondition);
  v1::RegisterRequest bad_shard = RegisterFor(p, 0, "h:1");
  bad_shard.set_shard_id(2);
  EXPECT_EQ(m.Register(bad_shard, t0).status().code(), absl::StatusCode::kInvalidArgument);
  v1::RegisterRequest no_address = RegisterFor(p, 0, "");
  EXPECT_EQ(m.Register(no_address, t0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m.version(), 1u);

  // The same address registering again replaces its old registration.
  ASSERT_TRUE(m.Register(RegisterFor(p, 0, "h:1"), t0).ok());
  ASSERT_TRUE(m.Register(RegisterFor(p, 0, "h:1"), t0).ok());
  EXPECT_EQ(m.replica_count(), 1u);
}

TEST(MembershipTest, LoadReportsAccumulate) {
  const ModelConfig c = TestConfig();
  Membership m(*EvenPlacement(c, 2), MembershipOptions{});
  v1::LoadReport r;
  auto* l = r.add_loads();
  l->set_layer(1);
  l->set_expert(3);
  l->set_tokens(5);
  auto* bogus = r.add_loads();
  bogus->set_layer(0);  // dense: ignored
  bogus->set_expert(0);
  bogus->set_tokens(9);
  m.AddLoad(r);
  m.AddLoad(r);
  const auto load = m.Load();
  ASSERT_EQ(load.size(), 1u);
  EXPECT_EQ(load[0].tokens(), 10u);
}

TEST(MembershipTest, ReplicasRegisterTheCopiesTheirGroupHolds) {
  const Placement p = ChoiceFixture();
  Membership m(p, MembershipOptions{});
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  for (int s = 0; s < 4; ++s) {
    ASSERT_TRUE(m.Register(RegisterFor(p, s, absl::StrCat("h:", s)), t0).ok()) << s;
  }
  v1::RegisterRequest without_copy = RegisterFor(p, 1, "h:9");
  without_copy.mutable_experts()->RemoveLast();  // drops (4, 7), a copy
  EXPECT_FALSE(m.Register(without_copy, t0).ok());
  absl::StatusOr<Placement> back = PlacementFromMap(m.Map(t0));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, p);
}

}  // namespace
}  // namespace expertmesh
