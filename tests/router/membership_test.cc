// The router's membership (router/membership.h) and a replica's framed TCP data-plane address:
// RegisterRequest.data_address must be empty (no data plane) or host:port of at most 256 bytes
// (else INVALID_ARGUMENT, nothing registered); the maps carry it to ShardReplica.data_address,
// and a replica registering again on its address (a restart) replaces it.
#include <gtest/gtest.h>

#include <string>

#include "placement/placement.h"
#include "router/membership.h"

namespace expertmesh {
namespace {

ModelConfig TestConfig() {  // 2 MoE layers (1, 2) of 8 experts, top-2
  ModelConfig c;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  c.n_group = 1;
  c.topk_group = 1;
  return c;
}

v1::RegisterRequest RegisterFor(const Placement& p, int shard, const std::string& address,
                                const std::string& data_address) {
  v1::RegisterRequest r;
  r.set_address(address);
  r.set_data_address(data_address);
  r.set_shard_id(shard);
  for (const LayerExpert& le : p.ExpertsOf(shard)) {
    v1::LayerExpert* x = r.add_experts();
    x->set_layer(le.layer);
    x->set_expert(le.expert);
  }
  return r;
}

TEST(MembershipDataAddressTest, EmptyOrHostPortAcceptedOthersRefused) {
  const Placement p = *EvenPlacement(TestConfig(), 2);
  Membership m(p, MembershipOptions{});
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  const uint64_t v0 = m.version();

  // Refused: no colon, longer than 256 bytes. Nothing registered, no new map.
  for (const std::string& bad : {std::string("hostonly"), std::string("h:") + std::string(255, '1'),
                                 std::string(300, 'a') + ":1"}) {
    absl::StatusOr<v1::RegisterResponse> r = m.Register(RegisterFor(p, 0, "h:1", bad), t0);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad.size() << " bytes";
    EXPECT_NE(r.status().message().find("data_address"), std::string::npos) << r.status();
  }
  EXPECT_EQ(m.version(), v0);
  EXPECT_EQ(m.replica_count(), 0u);

  // Accepted: empty (no data plane), host:port, [IPv6]:port, and exactly 256 bytes.
  const std::string at_limit = std::string(250, 'h') + ":12345";
  ASSERT_EQ(at_limit.size(), 256u);
  ASSERT_TRUE(m.Register(RegisterFor(p, 0, "h:1", ""), t0).ok());
  ASSERT_TRUE(m.Register(RegisterFor(p, 0, "h:2", "10.0.0.2:7001"), t0).ok());
  ASSERT_TRUE(m.Register(RegisterFor(p, 1, "h:3", "[::1]:7002"), t0).ok());
  ASSERT_TRUE(m.Register(RegisterFor(p, 1, "h:4", at_limit), t0).ok());
  EXPECT_EQ(m.replica_count(), 4u);

  // The map carries each replica's data address to its ShardReplica.
  const v1::PlacementMap map = m.Map(t0);
  ASSERT_EQ(map.shards_size(), 2);
  ASSERT_EQ(map.shards(0).replicas_size(), 2);
  EXPECT_EQ(map.shards(0).replicas(0).address(), "h:1");
  EXPECT_EQ(map.shards(0).replicas(0).data_address(), "");
  EXPECT_EQ(map.shards(0).replicas(1).address(), "h:2");
  EXPECT_EQ(map.shards(0).replicas(1).data_address(), "10.0.0.2:7001");
  ASSERT_EQ(map.shards(1).replicas_size(), 2);
  EXPECT_EQ(map.shards(1).replicas(0).data_address(), "[::1]:7002");
  EXPECT_EQ(map.shards(1).replicas(1).data_address(), at_limit);
  // GetStatus's map (loading replicas included) carries it too.
  EXPECT_EQ(m.Map(t0, /*include_loading=*/true).shards(0).replicas(1).data_address(),
            "10.0.0.2:7001");
}

TEST(MembershipDataAddressTest, ARestartOnTheSameAddressReplacesTheDataAddress) {
  const Placement p = *EvenPlacement(TestConfig(), 2);
  Membership m(p, MembershipOptions{});
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  ASSERT_TRUE(m.Register(RegisterFor(p, 1, "h:1", "h:5001"), t0).ok());
  const uint64_t v = m.version();
  // Restarted with its data plane on a new port; then without one.
  ASSERT_TRUE(m.Register(RegisterFor(p, 1, "h:1", "h:5002"), t0).ok());
  EXPECT_GT(m.version(), v);
  v1::PlacementMap map = m.Map(t0);
  ASSERT_EQ(map.shards(1).replicas_size(), 1);
  EXPECT_EQ(map.shards(1).replicas(0).data_address(), "h:5002");
  ASSERT_TRUE(m.Register(RegisterFor(p, 1, "h:1", ""), t0).ok());
  map = m.Map(t0);
  ASSERT_EQ(map.shards(1).replicas_size(), 1);
  EXPECT_EQ(map.shards(1).replicas(0).data_address(), "");
}

}  // namespace
}  // namespace expertmesh
