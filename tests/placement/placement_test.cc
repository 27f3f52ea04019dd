// Placement plans (even spread, JSON files, expert lists, map round trip) and the router's
// membership state (registration checks, heartbeats, expiry with injected time, versions).
#include "placement/placement.h"

#include <gtest/gtest.h>

#include "router/membership.h"

namespace expertmesh {
namespace {

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

  v1::PlacementMap dup = map;
  *dup.mutable_shards(1)->add_experts() = map.shards(0).experts(0);
  EXPECT_FALSE(PlacementFromMap(dup).ok());
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

}  // namespace
}  // namespace expertmesh
