// The gateway's and the attention service's edges against a real cluster on loopback (router,
// one expert shard and the attention service as processes, started by the launcher; the
// gateway in process with short, test-set timeouts): grpc.health.v1 answers for each
// service's own name and follows SERVING.
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>

#include "gateway/gateway_server.h"
#include "gtest/gtest.h"
#include "service-common/grpc_util.h"
#include "tests/common/poll.h"
#include "tests/gateway/gateway_test_util.h"
#include "tools/launcher/cluster.h"

namespace expertmesh::gateway {
namespace {

using expertmesh::testing::PollUntil;

class GatewayConnectionTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> dir = testing::MakeGatewayTestModel();
    ASSERT_TRUE(dir.ok()) << dir.status();
    model_dir_ = new std::string(*dir);
    launcher::ClusterOptions co;
    co.model_dir = *dir;
    co.bin_dir = EXPERTMESH_BINARY_DIR;
    co.shards = 1;
    co.max_batch = 4;
    co.max_waiting = 16;
    absl::StatusOr<std::unique_ptr<launcher::Cluster>> cluster = launcher::Cluster::Start(co);
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    cluster_ = cluster->release();

    GatewayOptions go;
    go.model_dir = *dir;
    go.attention = {cluster_->attention().grpc_address};
    go.http_host = "127.0.0.1";
    absl::StatusOr<std::unique_ptr<GatewayServer>> gateway = GatewayServer::Create(go);
    ASSERT_TRUE(gateway.ok()) << gateway.status();
    gateway_ = gateway->release();
    ASSERT_TRUE(gateway_->pool().WaitReady(std::chrono::seconds(60)));
  }
  static void TearDownTestSuite() {
    delete gateway_;  // before the cluster it talks to
    gateway_ = nullptr;
    delete cluster_;
    cluster_ = nullptr;
    if (model_dir_ != nullptr) std::filesystem::remove_all(*model_dir_);
    delete model_dir_;
    model_dir_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(cluster_, nullptr);
    ASSERT_NE(gateway_, nullptr);
  }

  static std::string* model_dir_;
  static launcher::Cluster* cluster_;
  static GatewayServer* gateway_;
};
std::string* GatewayConnectionTest::model_dir_ = nullptr;
launcher::Cluster* GatewayConnectionTest::cluster_ = nullptr;
GatewayServer* GatewayConnectionTest::gateway_ = nullptr;

// Last in this file: it stops and restarts the cluster's only shard.
TEST_F(GatewayConnectionTest, HealthAnswersForEachServiceNameAndFollowsServing) {
  struct Named {
    std::shared_ptr<grpc::Channel> channel;
    std::string name;
  };
  const Named named[] = {
      {MakeChannel(cluster_->attention().grpc_address), "expertmesh.v1.AttentionService"},
      {MakeChannel(LoopbackAddress(gateway_->grpc_port())), "expertmesh.v1.Gateway"},
  };
  const auto serving = [&](const Named& n, bool want) {
    return PollUntil(
        [&] {
          absl::StatusOr<bool> s = CheckHealth(*n.channel, n.name, absl::Seconds(2));
          return s.ok() && *s == want;
        },
        absl::Seconds(30), absl::Milliseconds(50));
  };
  for (const Named& n : named) {
    absl::StatusOr<bool> s = CheckHealth(*n.channel, n.name, absl::Seconds(5));
    ASSERT_TRUE(s.ok()) << n.name << ": " << s.status();
    EXPECT_TRUE(*s) << n.name;
    // A name nobody registered stays NOT_FOUND: the check above can tell them apart.
    absl::StatusOr<bool> unknown =
        CheckHealth(*n.channel, "expertmesh.v1.NoSuchService", absl::Seconds(5));
    EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound) << n.name;
  }
  // The only shard stops: both names go NOT_SERVING with the whole server, then come back.
  ASSERT_TRUE(cluster_->KillExpert(0, 0, SIGTERM).ok());
  for (const Named& n : named) {
    EXPECT_TRUE(serving(n, false)) << n.name << " still SERVING without a shard";
    absl::StatusOr<bool> whole = CheckHealth(*n.channel, "", absl::Seconds(5));
    ASSERT_TRUE(whole.ok()) << whole.status();
    EXPECT_FALSE(*whole) << n.name;
  }
  ASSERT_TRUE(cluster_->RestartExpert(0, 0).ok());
  for (const Named& n : named) EXPECT_TRUE(serving(n, true)) << n.name;
}

}  // namespace
}  // namespace expertmesh::gateway
