// router-service and expert-service as real processes on loopback (shard 0: one replica,
// shard 1: two): start-up (NOT_SERVING until loaded, then registered), /metrics over HTTP, a
// dispatcher step through them, a bad message answered with its own error by the process, a
// replica frozen with SIGSTOP (the step fails over after the attempt timeout, same output; the
// frozen replica is cut and, after SIGCONT, taken back when the other one freezes),
// and SIGTERM: a replica deregisters before it exits (the router's map drops it at once, not
// at expiry) and exits with 0; with none left the step is UNAVAILABLE naming the shard.
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>

#include <gtest/gtest.h>

#include "dispatcher/dispatcher.h"
#include "expertmesh/v1/expert.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "service-common/handshake.h"
#include "service-common/metrics_http.h"
#include "service-common/process.h"
#include "tests/cluster/shards_test_util.h"
#include "tests/common/poll.h"
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

// Whether every thread of process `pid` is stopped (state T in /proc/<pid>/task/*/stat): a
// SIGSTOP has taken effect, not merely been sent.
bool AllThreadsStopped(pid_t pid) {
  std::error_code ec;
  int threads = 0;
  for (const auto& task :
       std::filesystem::directory_iterator(absl::StrCat("/proc/", pid, "/task"), ec)) {
    std::ifstream in(task.path() / "stat");
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t paren = stat.rfind(')');
    if (paren == std::string::npos || paren + 2 >= stat.size()) return false;
    const char state = stat[paren + 2];
    if (state != 'T' && state != 't') return false;
    ++threads;
  }
  return !ec && threads > 0;
}

// Polls the router until shard group s has want[s] replicas (bounded by the network).
absl::StatusOr<v1::StatusResponse> WaitForReplicas(v1::RouterService::Stub& stub,
                                                   const std::vector<int>& want,
                                                   absl::Duration timeout) {
  absl::StatusOr<v1::StatusResponse> st;
  const bool registered = testing::PollUntil(
      [&] {
        st = RouterStatus(stub);
        if (!st.ok() || st->placement().shards_size() != static_cast<int>(want.size())) {
          return false;
        }
        for (size_t s = 0; s < want.size(); ++s) {
          if (st->placement().shards(static_cast<int>(s)).replicas_size() != want[s]) return false;
        }
        return true;
      },
      timeout, absl::Milliseconds(50));
  if (!registered) return absl::DeadlineExceededError("replicas did not register");
  return st;
}

class ShardProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::string> dir = testing::ShardTestModel();
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *dir;
    absl::StatusOr<ModelConfig> config = LoadModelConfig(dir_ + "/config.json");
    ASSERT_TRUE(config.ok());
    config_ = *config;
    placement_ = *EvenPlacement(config_, 2);
    absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir_);
    ASSERT_TRUE(ckpt.ok());
    ckpt_ = *std::move(ckpt);
    absl::StatusOr<std::unique_ptr<LocalExperts>> all =
        LocalExperts::Create(*ckpt_, config_, AllExperts(config_));
    ASSERT_TRUE(all.ok());
    all_ = *std::move(all);
  }

  std::unique_ptr<ChildProcess> Start(const std::string& name, const std::string& binary,
                                      std::vector<std::string> args) {
    absl::StatusOr<std::unique_ptr<ChildProcess>> p =
        ChildProcess::Start(ProcessSpec{name, std::string(EXPERTMESH_BINARY_DIR) + binary,
                                        std::move(args), dir_ + "/" + name + ".log"});
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? *std::move(p) : nullptr;
  }
  std::string Log(const std::string& name) {
    return launcher::TailOfFile(dir_ + "/" + name + ".log");
  }

  // One step through the dispatcher, compared with LocalExperts' sharded computation.
  absl::Status RunAndCheck(Dispatcher& d, int layer, int64_t n_rows, uint64_t seed) {
    const testing::Batch b = testing::RandomBatch(config_, n_rows, seed);
    std::vector<float> got(n_rows * config_.hidden_size);
    if (absl::Status s = d.Run(layer, b.x, b.routes, got); !s.ok()) return s;
    absl::StatusOr<std::vector<float>> want =
        testing::ExpectedShardedOutput(*all_, placement_, layer, b, config_.hidden_size);
    if (!want.ok()) return want.status();
    EXPECT_EQ(got, *want) << "layer " << layer << " seed " << seed;
    return absl::OkStatus();
  }

  std::string dir_;
  ModelConfig config_;
  Placement placement_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::unique_ptr<LocalExperts> all_;
};

TEST_F(ShardProcessTest, RegisterServeFailOverAndDeregisterOnSigterm) {
  absl::StatusOr<int> router_port = PickFreePort();
  absl::StatusOr<int> router_metrics = PickFreePort();
  absl::StatusOr<int> expert_metrics = PickFreePort();
  ASSERT_TRUE(router_port.ok() && router_metrics.ok() && expert_metrics.ok());
  const std::string router_addr = LoopbackAddress(*router_port);
  std::unique_ptr<ChildProcess> router = Start(
      "router", "/router/router-service",
      {"--model", dir_, "--num-shards", "2", "--listen", router_addr, "--metrics-port",
       std::to_string(*router_metrics), "--heartbeat-interval-ms", "100", "--expiry-ms", "30000"});
  ASSERT_NE(router, nullptr);
  auto router_channel = MakeChannel(router_addr);
  ASSERT_TRUE(WaitForServing(*router_channel, absl::Seconds(30)).ok()) << Log("router");
  auto router_stub = v1::RouterService::NewStub(router_channel);

  // experts[0]: shard 0; experts[1] and experts[2]: shard 1; on known ports.
  std::vector<std::unique_ptr<ChildProcess>> experts;
  std::vector<std::string> addresses;
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<int> port = PickFreePort();
    ASSERT_TRUE(port.ok());
    addresses.push_back(LoopbackAddress(*port));
    std::vector<std::string> args = {
        "--model", dir_,       "--shard-id", i == 0 ? "0" : "1", "--num-shards",
        "2",       "--router", router_addr,  "--listen",         addresses.back()};
    if (i == 0) {
      args.push_back("--metrics-port");
      args.push_back(std::to_string(*expert_metrics));
    }
    experts.push_back(Start(absl::StrCat("expert", i), "/expert-service/expert-service", args));
    ASSERT_NE(experts.back(), nullptr);
  }
  absl::StatusOr<v1::StatusResponse> st = WaitForReplicas(*router_stub, {1, 2}, absl::Seconds(60));
  ASSERT_TRUE(st.ok()) << Log("expert1");
  const std::string first_addr = st->placement().shards(1).replicas(0).address();
  auto expert_channel = MakeChannel(first_addr);
  ASSERT_TRUE(WaitForServing(*expert_channel, absl::Seconds(10)).ok());
  ASSERT_TRUE(
      WaitForServing(*expert_channel, absl::Seconds(10), "expertmesh.v1.ExpertService").ok());

  absl::StatusOr<std::string> metrics = HttpGet("127.0.0.1", *expert_metrics, "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_NE(metrics->find("expertmesh_expert_bytes_mapped "), std::string::npos);

  DispatcherOptions d;
  d.identity = *MakeLocalIdentity(dir_, "test", "process-test");
  d.step_deadline = absl::Seconds(10);
  d.attempt_timeout = absl::Seconds(1);
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher = Dispatcher::Create(config_, d);
  ASSERT_TRUE(dispatcher.ok());
  (*dispatcher)->WatchRouter(router_addr);
  ASSERT_TRUE((*dispatcher)->WaitCovered(absl::Seconds(10), st->placement().version()).ok());
  ASSERT_TRUE(RunAndCheck(**dispatcher, 2, 12, 9).ok());

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
    bad.set_hidden_size(static_cast<uint32_t>(config_.hidden_size));
    bad.set_activations("short");
    ASSERT_TRUE(stream->Write(bad));
    v1::ExpertResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
    EXPECT_EQ(resp.error_code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
    EXPECT_EQ(resp.request_id(), 1u);
    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
  }

  // A stalled replica (SIGSTOP), not a dead one. The replicas of a shard take turns, so with
  // replica 1 frozen (every thread of the process stopped) a step reaches it within two steps:
  // that step times out there after attempt_timeout (1 s) and fails over to replica 2 with the
  // same output, and replica 1 is marked failed (its stream cut).
  const auto open_replica_of_shard1 = [&]() -> int {
    int found = -1;
    for (const Dispatcher::ReplicaState& r : (*dispatcher)->Replicas()) {
      if (r.shard != 1 || !r.open) continue;
      if (found != -1) return -2;  // more than one
      found = r.address == addresses[1] ? 1 : r.address == addresses[2] ? 2 : -3;
    }
    return found;
  };
  const auto freeze = [&](int i) {
    experts[i]->Signal(SIGSTOP);
    ASSERT_TRUE(testing::PollUntil([&] { return AllThreadsStopped(experts[i]->pid()); },
                                   absl::Seconds(10)));
  };
  // Both replicas of shard 1 in the dispatcher's map (a map may name one of them only for a
  // moment after both registered) before one is frozen.
  ASSERT_TRUE(testing::PollUntil(
      [&] {
        int n = 0;
        for (const Dispatcher::ReplicaState& r : (*dispatcher)->Replicas()) n += r.shard == 1;
        return n == 2;
      },
      absl::Seconds(10)));
  // Freeze a replica and run steps until one reaches it (at most 4: they take turns); if none
  // does (a replica the dispatcher ranks last, e.g. one whose first handshake failed), thaw it
  // and freeze the other instead, which the steps then must reach.
  int used = 0;
  uint64_t failovers = 0;
  absl::Duration took;
  for (int candidate : {1, 2}) {
    freeze(candidate);
    ASSERT_FALSE(HasFatalFailure());
    failovers = (*dispatcher)->failovers();
    for (int step = 0; step < 4 && (*dispatcher)->failovers() == failovers; ++step) {
      const absl::Time start = absl::Now();
      const absl::Status frozen = RunAndCheck(**dispatcher, 1, 5, 10 + step);
      took = absl::Now() - start;
      ASSERT_TRUE(frozen.ok()) << frozen;
    }
    if ((*dispatcher)->failovers() != failovers) {
      used = candidate;
      break;
    }
    experts[candidate]->Signal(SIGCONT);
  }
  ASSERT_NE(used, 0) << "no step reached a frozen replica of shard 1";
  const int other = 3 - used;
  experts[used]->Signal(SIGCONT);
  EXPECT_GE(took, absl::Seconds(1));
  EXPECT_LT(took, absl::Seconds(10));
  EXPECT_EQ((*dispatcher)->failovers(), failovers + 1);
  EXPECT_EQ(open_replica_of_shard1(), other);
  // Taken back once it recovers: with the other replica frozen now, the step times out there
  // and goes to the recovered one (its stream opened again with a handshake); same output.
  freeze(other);
  ASSERT_FALSE(HasFatalFailure());
  failovers = (*dispatcher)->failovers();
  const absl::Time start = absl::Now();
  const absl::Status recovered = RunAndCheck(**dispatcher, 2, 7, 12);
  took = absl::Now() - start;
  experts[other]->Signal(SIGCONT);
  ASSERT_TRUE(recovered.ok()) << recovered;
  EXPECT_GE(took, absl::Seconds(1));
  EXPECT_LT(took, absl::Seconds(10));
  EXPECT_EQ((*dispatcher)->failovers(), failovers + 1);
  EXPECT_EQ(open_replica_of_shard1(), used);
  // Both answer again; a step with no frozen replica takes no failover.
  failovers = (*dispatcher)->failovers();
  ASSERT_TRUE(RunAndCheck(**dispatcher, 3, 4, 13).ok());
  EXPECT_EQ((*dispatcher)->failovers(), failovers);
  const int first = used, second = other;

  // SIGTERM: each replica of shard 1 deregisters, then exits 0; the router drops it at once
  // (expiry is 30 s here, so only the deregistration can explain it).
  for (int i : {first, second}) {
    experts[i]->Signal(SIGTERM);
    ASSERT_TRUE(experts[i]->WaitFor(absl::Seconds(20)));
    EXPECT_EQ(experts[i]->ExitDescription(), "exited with 0") << Log(absl::StrCat("expert", i));
    st = RouterStatus(*router_stub);
    ASSERT_TRUE(st.ok());
    EXPECT_EQ(st->placement().shards(1).replicas_size(), i == first ? 1 : 0);
    EXPECT_EQ(st->placement().shards(0).replicas_size(), 1);
  }
  // The dispatcher learns the map without shard 1; the step then fails naming the shard.
  ASSERT_TRUE(st.ok());
  testing::PollUntil(
      [&] { return (*dispatcher)->placement_version() >= st->placement().version(); },
      absl::Seconds(10));
  EXPECT_FALSE((*dispatcher)->Covered());
  const absl::Status gone = RunAndCheck(**dispatcher, 2, 3, 11);
  EXPECT_EQ(gone.code(), absl::StatusCode::kUnavailable) << gone;
  EXPECT_NE(gone.message().find("shard 1"), std::string::npos) << gone;

  absl::StatusOr<std::string> router_text = HttpGet("127.0.0.1", *router_metrics, "/metrics");
  ASSERT_TRUE(router_text.ok()) << router_text.status();
  EXPECT_NE(router_text->find("expertmesh_router_replicas 1\n"), std::string::npos) << *router_text;
  EXPECT_NE(router_text->find("expertmesh_router_shard_replicas{shard=\"1\"} 0\n"),
            std::string::npos)
      << *router_text;

  dispatcher->reset();
  EXPECT_TRUE(experts[0]->Stop(absl::Seconds(20)).ok());
  EXPECT_TRUE(router->Stop(absl::Seconds(20)).ok());
}

}  // namespace
}  // namespace expertmesh
