// The router's live placement change (router/membership.h: targets, generations, commit,
// abort, joining replicas) and the rebalancer's decision (router/rebalancer.h) on skewed
// loads, as plain logic with injected time.
#include <gtest/gtest.h>

#include <algorithm>

#include "placement/eplb.h"
#include "router/load_window.h"
#include "router/membership.h"
#include "router/rebalancer.h"

namespace expertmesh {
namespace {

ModelConfig TestConfig() {  // 4 MoE layers (1..4) of 16 experts in 4 groups, top-4
  ModelConfig c;
  c.num_hidden_layers = 5;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.n_routed_experts = 16;
  c.num_experts_per_tok = 4;
  c.n_group = 4;
  c.topk_group = 2;
  return c;
}

v1::RegisterRequest RegisterFor(const std::vector<LayerExpert>& experts, int shard,
                                const std::string& address, bool live = true) {
  v1::RegisterRequest r;
  r.set_address(address);
  r.set_shard_id(shard);
  r.set_live_placement(live);
  r.set_device_kind("cpu");
  for (const LayerExpert& le : experts) {
    v1::LayerExpert* p = r.add_experts();
    p->set_layer(le.layer);
    p->set_expert(le.expert);
  }
  return r;
}

std::vector<LayerExpert> Experts(const v1::ExpertTarget& t) {
  std::vector<LayerExpert> out;
  for (const v1::LayerExpert& le : t.experts()) out.push_back({le.layer(), le.expert()});
  return out;
}

v1::HeartbeatRequest Beat(const std::string& id, uint64_t held) {
  v1::HeartbeatRequest hb;
  hb.set_replica_id(id);
  hb.set_held_generation(held);
  return hb;
}

// Expert 0 of each layer moves from shard 0 to shard 1 and keeps a copy on shard 0.
Placement Moved(const Placement& p) {
  Placement next = p;
  std::vector<std::vector<int32_t>> lists(p.shard_of.size());
  for (int32_t l = 0; l < p.n_layers; ++l) {
    for (int32_t e = 0; e < p.n_routed_experts; ++e) {
      const std::span<const int32_t> s = p.ShardsOf(l, e);
      lists[l * p.n_routed_experts + e].assign(s.begin(), s.end());
    }
    if (p.ShardOf(l, 0) >= 0) lists[l * p.n_routed_experts + 0] = {0, 1};
  }
  EXPECT_TRUE(next.SetCopies(lists).ok());
  return next;
}

TEST(LivePlacementTest, ChangeLoadsUnionThenCommitsThenReleases) {
  const ModelConfig c = TestConfig();
  const Placement p = *EvenPlacement(c, 2);
  Membership m(p, MembershipOptions{});
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  auto a = m.Register(RegisterFor(p.ExpertsOf(0), 0, "h:1"), t0);
  auto b = m.Register(RegisterFor(p.ExpertsOf(1), 1, "h:2"), t0);
  ASSERT_TRUE(a.ok() && b.ok());
  const uint64_t g0 = m.target_generation();
  EXPECT_EQ(a->target().generation(), g0);
  EXPECT_TRUE(a->target().committed());
  EXPECT_EQ(Experts(a->target()), p.ExpertsOf(0));

  const Placement next = Moved(p);
  ASSERT_TRUE(m.BeginChange(next, t0).ok());
  EXPECT_FALSE(m.BeginChange(next, t0).ok());  // one at a time
  const uint64_t v_before = m.version();
  // Shard 1 is told to hold its experts plus every expert 0; nothing is published yet.
  Membership::HeartbeatResult hb = m.Heartbeat(Beat(b->replica_id(), g0), t0);
  ASSERT_TRUE(hb.target.has_value());
  EXPECT_FALSE(hb.target->committed());
  const uint64_t g1 = hb.target->generation();
  EXPECT_GT(g1, g0);
  const std::vector<LayerExpert> union1 = Experts(*hb.target);
  EXPECT_EQ(union1, next.ExpertsOf(1));
  EXPECT_EQ(m.version(), v_before);
  EXPECT_EQ(m.placement(), p);
  // Shard 0 already holds all it needs (its copies stay); it reports the generation. Shard 1
  // still loading: no commit.
  EXPECT_FALSE(m.Heartbeat(Beat(a->replica_id(), g1), t0).map_changed);
  EXPECT_EQ(m.placement(), p);
  // Shard 1 holds the union: the change commits, a new map version, targets committed.
  hb = m.Heartbeat(Beat(b->replica_id(), g1), t0);
  EXPECT_TRUE(hb.map_changed);
  EXPECT_EQ(m.placement(), next);
  EXPECT_GT(m.version(), v_before);
  EXPECT_FALSE(m.ChangePending());
  ASSERT_TRUE(hb.target.has_value());  // the committed target follows
  EXPECT_TRUE(hb.target->committed());
  EXPECT_EQ(Experts(*hb.target), next.ExpertsOf(1));
  // Both replicas stay in the map throughout.
  const v1::PlacementMap map = m.Map(t0);
  EXPECT_EQ(map.shards(0).replicas_size(), 1);
  EXPECT_EQ(map.shards(1).replicas_size(), 1);
  EXPECT_EQ(map.shards(1).experts_size(), static_cast<int>(next.ExpertsOf(1).size()));
}

TEST(LivePlacementTest, AJoiningReplicaLoadsBeforeItIsMapped) {
  const ModelConfig c = TestConfig();
  const Placement p = *EvenPlacement(c, 2);
  Membership m(p, MembershipOptions{});
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  ASSERT_TRUE(m.Register(RegisterFor(p.ExpertsOf(0), 0, "h:1"), t0).ok());
  // Offers shard 1's experts for shard 0: registered, told its target, but not mapped.
  auto j = m.Register(RegisterFor(p.ExpertsOf(1), 0, "h:3"), t0);
  ASSERT_TRUE(j.ok()) << j.status();
  EXPECT_EQ(Experts(j->target()), p.ExpertsOf(0));
  EXPECT_EQ(m.Map(t0).shards(0).replicas_size(), 1);
  const v1::PlacementMap status = m.Map(t0, /*include_loading=*/true);
  ASSERT_EQ(status.shards(0).replicas_size(), 2);
  EXPECT_TRUE(status.shards(0).replicas(1).loading());
  // Still loading (held 0): stays out; once it holds the target it is mapped.
  EXPECT_FALSE(m.Heartbeat(Beat(j->replica_id(), 0), t0).map_changed);
  EXPECT_TRUE(m.Heartbeat(Beat(j->replica_id(), j->target().generation()), t0).map_changed);
  EXPECT_EQ(m.Map(t0).shards(0).replicas_size(), 2);
  // A replica without live placement must still match exactly.
  EXPECT_FALSE(m.Register(RegisterFor(p.ExpertsOf(1), 0, "h:4", /*live=*/false), t0).ok());
}

TEST(LivePlacementTest, LoadErrorsTimeoutsAndFixedReplicasAbortOrRefuse) {
  const ModelConfig c = TestConfig();
  const Placement p = *EvenPlacement(c, 2);
  MembershipOptions o;
  o.expiry = absl::Seconds(100);
  o.change_timeout = absl::Seconds(30);
  Membership m(p, o);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  auto a = m.Register(RegisterFor(p.ExpertsOf(0), 0, "h:1"), t0);
  auto b = m.Register(RegisterFor(p.ExpertsOf(1), 1, "h:2"), t0);
  ASSERT_TRUE(a.ok() && b.ok());
  const Placement next = Moved(p);
  // A load error aborts: targets go back to the published placement, nothing changes.
  ASSERT_TRUE(m.BeginChange(next, t0).ok());
  v1::HeartbeatRequest bad = Beat(b->replica_id(), 0);
  bad.set_load_error("out of memory");
  Membership::HeartbeatResult hb = m.Heartbeat(bad, t0);
  EXPECT_FALSE(m.ChangePending());
  EXPECT_NE(m.last_change().find("out of memory"), std::string::npos) << m.last_change();
  ASSERT_TRUE(hb.target.has_value());
  EXPECT_TRUE(hb.target->committed());
  EXPECT_EQ(Experts(*hb.target), p.ExpertsOf(1));
  EXPECT_EQ(m.placement(), p);
  // A change nobody completes is aborted after the timeout.
  ASSERT_TRUE(m.BeginChange(next, t0).ok());
  m.Expire(t0 + absl::Seconds(29));
  EXPECT_TRUE(m.ChangePending());
  m.Expire(t0 + absl::Seconds(31));
  EXPECT_FALSE(m.ChangePending());
  EXPECT_EQ(m.placement(), p);
  // A replica that cannot change its experts blocks changes.
  ASSERT_TRUE(m.Register(RegisterFor(p.ExpertsOf(0), 0, "h:5", /*live=*/false), t0).ok());
  absl::Status s = m.BeginChange(next, t0);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  // A placement of another shape is refused.
  EXPECT_FALSE(m.BeginChange(*EvenPlacement(c, 3), t0).ok());
}

LoadWindow::Sums SkewedLoad(const ModelConfig& c, uint64_t scale) {
  LoadWindow::Sums s;
  const int64_t E = c.n_routed_experts;
  s.tokens.assign(static_cast<size_t>((c.num_hidden_layers) * E), 0);
  for (int32_t l = 1; l < c.num_hidden_layers; ++l) {
    for (int64_t e = 0; e < E; ++e) {
      // The first quarter of the experts (all on shard 0 of the even plan) 6x as hot.
      s.tokens[l * E + e] = scale * (e < E / 4 ? 6 : 1);
    }
  }
  s.length = s.span = absl::Seconds(60);
  return s;
}

TEST(RebalancerTest, SkewedLoadGetsAPlacementWithinTheGoal) {
  const ModelConfig c = TestConfig();
  const Placement p = *EvenPlacement(c, 4);
  const std::vector<double> capacity(4, 1.0);
  RebalancerOptions o;
  absl::StatusOr<RebalancePlan> plan =
      PlanRebalance(c, p, p, SkewedLoad(c, 100), capacity, o, /*force=*/false);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_TRUE(plan->change) << plan->reason;
  EXPECT_GT(plan->before, 2.0);  // shard 0: 24 of 36 units against a mean of 9
  EXPECT_LE(plan->after, 1.15) << plan->reason;
  EXPECT_GT(plan->redundant, 0u);
  EXPECT_GT(plan->moved, 0u);
  // Every expert keeps a copy; no group exceeds its slots (4 + 1 per layer).
  for (int32_t l = 1; l < c.num_hidden_layers; ++l) {
    std::vector<int> count(4, 0);
    for (int32_t e = 0; e < c.n_routed_experts; ++e) {
      ASSERT_FALSE(plan->placement.ShardsOf(l, e).empty());
      for (int32_t s : plan->placement.ShardsOf(l, e)) ++count[s];
    }
    EXPECT_LE(*std::max_element(count.begin(), count.end()), 5);
  }
  // Applying it again finds nothing to gain.
  absl::StatusOr<RebalancePlan> again =
      PlanRebalance(c, plan->placement, p, SkewedLoad(c, 100), capacity, o, /*force=*/false);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->change) << again->reason;
}

TEST(RebalancerTest, NoActionWithoutLoadBelowThresholdOrWithoutCapacity) {
  const ModelConfig c = TestConfig();
  const Placement p = *EvenPlacement(c, 4);
  RebalancerOptions o;
  // Too few tokens.
  auto plan = PlanRebalance(c, p, p, SkewedLoad(c, 1), std::vector<double>(4, 1.0), o, false);
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE(plan->change);
  EXPECT_NE(plan->reason.find("tokens"), std::string::npos) << plan->reason;
  // Uniform load: within the threshold.
  LoadWindow::Sums flat = SkewedLoad(c, 100);
  for (uint64_t& t : flat.tokens) t = t > 0 ? 100 : 0;
  plan = PlanRebalance(c, p, p, flat, std::vector<double>(4, 1.0), o, false);
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE(plan->change);
  EXPECT_NEAR(plan->before, 1.0, 1e-9);
  // A group without a replica: no placement can be judged.
  plan = PlanRebalance(c, p, p, SkewedLoad(c, 100), {1.0, 0.0, 1.0, 1.0}, o, false);
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE(plan->change);
  EXPECT_NE(plan->reason.find("no serving replica"), std::string::npos);
  // Unequal capacities: a group twice as fast gets about twice the load (given the slots:
  // 16 experts of equal load need 7 slots on the faster group).
  o.extra_slots = 3;
  plan = PlanRebalance(c, p, p, flat, {2.0, 1.0, 1.0, 1.0}, o, /*force=*/true);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_LE(plan->after, 1.15) << plan->reason;
}

}  // namespace
}  // namespace expertmesh
