// router-service and expert-service as real processes on loopback: start-up (NOT_SERVING
// until loaded, then registered), /metrics over HTTP, a dispatcher step through them, a bad
// message answered with its own error by the process, and SIGTERM: the replica deregisters
// before it exits (the router's map drops it at once, not at expiry) and exits with 0.
#include <csignal>
#include <thread>

#include <gtest/gtest.h>

#include "expertmesh/v1/expert.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "router/dispatcher.h"
#include "service-common/handshake.h"
#include "service-common/metrics_http.h"
#include "service-common/process.h"
#include "tests/cluster/shards_test_util.h"
#include "tools/launcher/process.h"

namespace expertmesh {
namespace {

using launcher::ChildProcess;
using launcher::ProcessSpec;

absl::StatusOr<v1::StatusResponse> RouterStatus(v1::RouterService::Stub& stub) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::StatusResponse resp;
  const grpc::Status s = stub.GetStatus(&ctx, v1::StatusRequest{}, &resp);
  if (!s.ok()) return FromGrpcStatus(s);
  return resp;
}

// Polls the router until every shard group has `want` replicas (bounded by the network).
absl::StatusOr<v1::StatusResponse> WaitForReplicas(v1::RouterService::Stub& stub, int want,
                                                   absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::StatusOr<v1::StatusResponse> st;
  while (absl::Now() < deadline) {
    st = RouterStatus(stub);
    if (st.ok()) {
      bool all = true;
      for (const auto& g : st->placement().shards()) all &= g.replicas_size() == want;
      if (all) return st;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return absl::DeadlineExceededError("replicas did not register");
}

TEST(ShardProcessTest, RegisterServeAndDeregisterOnSigterm) {
  absl::StatusOr<std::string> dir = testing::ShardTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  const std::string bin = EXPERTMESH_BINARY_DIR;
  const std::string logs = *dir;
  absl::StatusOr<int> router_port = PickFreePort();
  absl::StatusOr<int> router_metrics = PickFreePort();
  absl::StatusOr<int> expert_metrics = PickFreePort();
  ASSERT_TRUE(router_port.ok() && router_metrics.ok() && expert_metrics.ok());
  const std::string router_addr = LoopbackAddress(*router_port);

  absl::StatusOr<std::unique_ptr<ChildProcess>> router = ChildProcess::Start(ProcessSpec{
      "router-service",
      bin + "/router/router-service",
      {"--model", *dir, "--num-shards", "2", "--listen", router_addr, "--metrics-port",
       std::to_string(*router_metrics), "--heartbeat-interval-ms", "100", "--expiry-ms", "30000"},
      logs + "/router.log"});
  ASSERT_TRUE(router.ok()) << router.status();
  auto router_channel = MakeChannel(router_addr);
  ASSERT_TRUE(WaitForServing(*router_channel, absl::Seconds(30)).ok())
      << launcher::TailOfFile(logs + "/router.log");
  auto router_stub = v1::RouterService::NewStub(router_channel);

  std::vector<std::unique_ptr<ChildProcess>> experts;
  for (int s = 0; s < 2; ++s) {
    std::vector<std::string> args = {"--model",      *dir,         "--shard-id", std::to_string(s),
                                     "--num-shards", "2",          "--router",   router_addr,
                                     "--listen",     "127.0.0.1:0"};
    if (s == 0) {
      args.push_back("--metrics-port");
      args.push_back(std::to_string(*expert_metrics));
    }
    absl::StatusOr<std::unique_ptr<ChildProcess>> p = ChildProcess::Start(
        ProcessSpec{absl::StrCat("expert-service[", s, "]"), bin + "/expert-service/expert-service",
                    args, absl::StrCat(logs, "/expert", s, ".log")});
    ASSERT_TRUE(p.ok()) << p.status();
    experts.push_back(*std::move(p));
  }
  absl::StatusOr<v1::StatusResponse> st = WaitForReplicas(*router_stub, 1, absl::Seconds(60));
  ASSERT_TRUE(st.ok()) << launcher::TailOfFile(logs + "/expert0.log");
  ASSERT_EQ(st->placement().shards_size(), 2);
  const std::string shard1_addr = st->placement().shards(1).replicas(0).address();
  auto expert_channel = MakeChannel(shard1_addr);
  ASSERT_TRUE(WaitForServing(*expert_channel, absl::Seconds(10)).ok());
  ASSERT_TRUE(
      WaitForServing(*expert_channel, absl::Seconds(10), "expertmesh.v1.ExpertService").ok());

  absl::StatusOr<std::string> metrics = HttpGet("127.0.0.1", *expert_metrics, "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_NE(metrics->find("expertmesh_expert_bytes_mapped "), std::string::npos);

  // One step through the processes equals LocalExperts' sharded computation.
  absl::StatusOr<ModelConfig> config = LoadModelConfig(*dir + "/config.json");
  ASSERT_TRUE(config.ok());
  absl::StatusOr<Placement> placement = EvenPlacement(*config, 2);
  DispatcherOptions d;
  d.identity = *MakeLocalIdentity(*dir, "test", "process-test");
  d.step_deadline = absl::Seconds(10);
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher = Dispatcher::Create(*config, d);
  ASSERT_TRUE(dispatcher.ok());
  (*dispatcher)->WatchRouter(router_addr);
  ASSERT_TRUE((*dispatcher)->WaitCovered(absl::Seconds(10)).ok());
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(*dir);
  ASSERT_TRUE(ckpt.ok());
  absl::StatusOr<std::unique_ptr<LocalExperts>> all =
      LocalExperts::Create(**ckpt, *config, AllExperts(*config));
  ASSERT_TRUE(all.ok());
  const testing::Batch b = testing::RandomBatch(*config, 12, 9);
  std::vector<float> got(12 * config->hidden_size);
  ASSERT_TRUE((*dispatcher)->Run(2, b.x, b.routes, got).ok());
  absl::StatusOr<std::vector<float>> want =
      testing::ExpectedShardedOutput(**all, *placement, 2, b, config->hidden_size);
  ASSERT_TRUE(want.ok());
  EXPECT_EQ(got, *want);

  // A malformed message to the process: its own error, then the same stream still serves.
  {
    auto stub = v1::ExpertService::NewStub(expert_channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto stream = stub->Compute(&ctx);
    v1::ExpertRequest bad;
    bad.set_request_id(1);
    bad.set_layer(2);
    bad.set_n_rows(1);
    bad.set_hidden_size(static_cast<uint32_t>(config->hidden_size));
    bad.set_activations("short");
    ASSERT_TRUE(stream->Write(bad));
    v1::ExpertResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
    EXPECT_EQ(resp.error_code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
    EXPECT_EQ(resp.request_id(), 1u);
    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
  }

  // SIGTERM: the replica of shard 1 deregisters, then exits 0; the router drops it at once
  // (expiry is 30 s here, so only the deregistration can explain it).
  const absl::Time term = absl::Now();
  experts[1]->Signal(SIGTERM);
  ASSERT_TRUE(experts[1]->WaitFor(absl::Seconds(20)));
  EXPECT_EQ(experts[1]->ExitDescription(), "exited with 0");
  st = RouterStatus(*router_stub);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->placement().shards(1).replicas_size(), 0);
  EXPECT_EQ(st->placement().shards(0).replicas_size(), 1);
  EXPECT_LT(absl::Now() - term, absl::Seconds(20));
  // The dispatcher learns the new map; the step then fails naming the shard.
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while ((*dispatcher)->Covered() && absl::Now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const absl::Status s = (*dispatcher)->Run(2, b.x, b.routes, got);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("shard 1"), std::string::npos) << s;

  absl::StatusOr<std::string> router_metrics_text =
      HttpGet("127.0.0.1", *router_metrics, "/metrics");
  ASSERT_TRUE(router_metrics_text.ok()) << router_metrics_text.status();
  EXPECT_NE(router_metrics_text->find("expertmesh_router_replicas 1\n"), std::string::npos)
      << *router_metrics_text;

  dispatcher->reset();
  EXPECT_TRUE(experts[0]->Stop(absl::Seconds(20)).ok());
  EXPECT_TRUE((*router)->Stop(absl::Seconds(20)).ok());
}

}  // namespace
}  // namespace expertmesh
