// Live placement on a shard replica (expert-service/live_placement.h), on a real ExpertServer
// (in process, real gRPC on loopback) of a random DeepSeek-shaped checkpoint (1 dense + 2 MoE
// layers of 32 experts, ~48 MiB of experts per layer). The replica starts with layer 1's
// experts; it is given a target that adds layer 2 (loaded while layer-1 requests keep being
// answered), then a committed target of layer 2 alone: layer 1 stays served while requests
// use it and is released only once unused for the grace period. Every answer equals
// LocalExperts bitwise; the resident set after gaining one layer and losing another stays
// within the experts held plus a stated overhead; a target that cannot load is reported as a
// load error and changes nothing.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "core/base/proc_status.h"
#include "core/format/wire.h"
#include "expert-service/expert_service.h"
#include "expert-service/live_placement.h"
#include "service-common/grpc_util.h"
#include "tests/cluster/shards_test_util.h"
#include "tests/common/expert_memory_config.h"
#include "tests/common/poll.h"
#include "tools/make-checkpoint/random_checkpoint.h"

namespace expertmesh {
namespace {

using testing::Batch;
using testing::RandomBatch;

constexpr const char* kConfig = testing::kExpertMemoryTestConfig;

// Allowed besides the experts held: the gRPC server and client, their threads' arenas, the
// allocator's slack and the test's own buffers.
constexpr int64_t kOverhead = 32 << 20;
const absl::Duration kGrace = absl::Seconds(1);

std::vector<LayerExpert> LayerOf(const ModelConfig& config, int layer) {
  std::vector<LayerExpert> out;
  for (int32_t e = 0; e < config.n_routed_experts; ++e) out.push_back({layer, e});
  return out;
}

v1::ExpertTarget Target(uint64_t generation, const std::vector<LayerExpert>& experts,
                        bool committed) {
  v1::ExpertTarget t;
  t.set_generation(generation);
  t.set_committed(committed);
  for (const LayerExpert& le : experts) {
    v1::LayerExpert* p = t.add_experts();
    p->set_layer(le.layer);
    p->set_expert(le.expert);
  }
  return t;
}

// A per-expert request of a random batch at `layer` (every expert of the layer may be named).
// With 4 rows or more, rows 0..3 name experts 0..31 between them: every request uses every
// expert of the layer.
v1::ExpertRequest Request(const ModelConfig& config, int layer, int64_t n_rows, uint64_t seed) {
  Batch b = RandomBatch(config, n_rows, seed);
  const int32_t k = static_cast<int32_t>(config.num_experts_per_tok);
  for (int32_t r = 0; r < 4 && r < n_rows && (r + 1) * k <= config.n_routed_experts; ++r) {
    for (int32_t j = 0; j < k; ++j) b.routes.experts[b.routes.offsets[r] + j] = r * k + j;
  }
  v1::ExpertRequest r;
  r.set_batch_id(seed);
  r.set_layer(layer);
  r.set_n_rows(static_cast<uint32_t>(n_rows));
  r.set_hidden_size(static_cast<uint32_t>(config.hidden_size));
  r.set_combine(v1::COMBINE_PER_EXPERT);
  PackAllActivations(b.x, r.mutable_activations(), r.mutable_scales());
  for (int32_t o : b.routes.offsets) r.add_row_offsets(static_cast<uint32_t>(o));
  for (int32_t e : b.routes.experts) r.add_experts(e);
  for (float w : b.routes.weights) r.add_weights(w);
  return r;
}

// One Compute stream.
class Client {
 public:
  explicit Client(const std::string& address)
      : stub_(v1::ExpertService::NewStub(MakeChannel(address))) {
    ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    stream_ = stub_->Compute(&ctx_);
  }
  ~Client() {
    stream_->WritesDone();
    (void)stream_->Finish();
  }
  v1::ExpertResponse Call(v1::ExpertRequest r) {
    r.set_request_id(++next_id_);
    v1::ExpertResponse resp;
    if (!stream_->Write(r) || !stream_->Read(&resp)) resp.set_error_message("stream broken");
    return resp;
  }

 private:
  std::unique_ptr<v1::ExpertService::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::ExpertRequest, v1::ExpertResponse>> stream_;
  uint64_t next_id_ = 0;
};

// The answer LocalExperts gives: per-pair BF16 outputs.
std::string Expected(LocalExperts& all, const v1::ExpertRequest& r) {
  absl::StatusOr<QuantizedActivations> x =
      UnpackActivations(r.activations(), r.scales(), r.n_rows(), r.hidden_size());
  EXPECT_TRUE(x.ok()) << x.status();
  ExpertRoutes routes;
  routes.offsets.assign(r.row_offsets().begin(), r.row_offsets().end());
  routes.experts.assign(r.experts().begin(), r.experts().end());
  routes.weights.assign(r.weights().begin(), r.weights().end());
  std::vector<uint16_t> out(routes.experts.size() * r.hidden_size());
  EXPECT_TRUE(all.RunPerExpert(r.layer(), *x, routes, out).ok());
  return std::string(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(uint16_t));
}

TEST(LivePlacementTest, GainsServesAndReleasesAfterTheGrace) {
  const std::string dir =
      (std::filesystem::path(::testing::TempDir()) / ("live_placement_" + std::to_string(getpid())))
          .string();
  const ModelConfig config = *ParseModelConfig(kConfig);
  ASSERT_TRUE(WriteRandomCheckpoint(config, kConfig, dir, 11).ok());
  struct Cleanup {
    std::string dir;
    ~Cleanup() { std::filesystem::remove_all(dir); }
  } cleanup{dir};
  const std::vector<LayerExpert> layer1 = LayerOf(config, 1), layer2 = LayerOf(config, 2);
  std::vector<LayerExpert> both = layer1;
  both.insert(both.end(), layer2.begin(), layer2.end());

  const int64_t before = base::ProcStatusBytes("VmRSS");
  MetricsRegistry metrics;
  ExpertServerOptions o;
  o.model_dir = dir;
  o.experts = layer1;
  o.release_grace = kGrace;
  o.metrics = &metrics;
  absl::StatusOr<std::unique_ptr<ExpertServer>> server = ExpertServer::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  LivePlacement* live = (*server)->live_placement();
  ASSERT_NE(live, nullptr);
  const uint64_t layer_bytes = (*server)->bytes_mapped();
  ASSERT_GT(layer_bytes, 40u << 20);
  EXPECT_EQ(live->held_generation(), 0u);

  // Layer-1 traffic all along, until told to stop; every answer must be OK.
  std::vector<v1::ExpertRequest> l1_requests, l2_requests;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    l1_requests.push_back(Request(config, 1, 4 + seed, seed));
    l2_requests.push_back(Request(config, 2, 2 + seed, 100 + seed));
  }
  std::atomic<bool> stop_traffic{false};
  std::atomic<int> l1_calls{0}, l1_failures{0};
  std::vector<v1::ExpertResponse> l1_answers(l1_requests.size());
  std::mutex answers_mu;
  // When each layer-1 request was sent (the shard sees it later), and the longest pause
  // between two sends since `gap_from` (a machine overloaded enough to pause the traffic for a
  // whole grace period makes a release legitimate: the checks below say so instead of failing).
  std::atomic<int64_t> last_sent_ns{0}, longest_gap_ns{0}, gap_from_ns{INT64_MAX};
  std::thread traffic([&] {
    Client c((*server)->address());
    for (size_t i = 0; !stop_traffic.load(); i = (i + 1) % l1_requests.size()) {
      const int64_t now = absl::GetCurrentTimeNanos(), previous = last_sent_ns.exchange(now);
      if (previous >= gap_from_ns.load()) {
        longest_gap_ns = std::max(longest_gap_ns.load(), now - previous);
      }
      v1::ExpertResponse resp = c.Call(l1_requests[i]);
      if (resp.error_code() != 0 || !resp.error_message().empty()) {
        if (longest_gap_ns.load() >= absl::ToInt64Nanoseconds(kGrace)) break;  // see above
        ADD_FAILURE() << "layer-1 request refused while in use: " << resp.error_message();
        ++l1_failures;
      }
      std::lock_guard<std::mutex> lock(answers_mu);
      l1_answers[i] = std::move(resp);
      ++l1_calls;
    }
  });
  ASSERT_TRUE(testing::PollUntil([&] { return l1_calls.load() > 3; }, absl::Seconds(30)));

  // Gain layer 2 (not committed: nothing may be released).
  live->OnTarget(Target(1, both, false));
  ASSERT_TRUE(testing::PollUntil([&] { return live->held_generation() == 1; }, absl::Seconds(60)));
  EXPECT_EQ((*server)->bytes_mapped(), 2 * layer_bytes);
  EXPECT_TRUE(live->load_error().empty());
  Client client((*server)->address());
  std::vector<v1::ExpertResponse> l2_answers;
  for (const v1::ExpertRequest& r : l2_requests) {
    l2_answers.push_back(client.Call(r));
    EXPECT_EQ(l2_answers.back().error_code(), 0) << l2_answers.back().error_message();
  }
  const int64_t peak = base::ProcStatusBytes("VmRSS") - before;

  // Commit layer 2 alone. Layer 1 stays while requests use it.
  const absl::Time committed_at = absl::Now();
  gap_from_ns = absl::ToUnixNanos(committed_at);
  live->OnTarget(Target(2, layer2, true));
  ASSERT_TRUE(testing::PollUntil([&] { return live->applied() >= 2; }, absl::Seconds(30)));
  EXPECT_EQ(live->held_generation(), 2u);
  absl::SleepFor(kGrace * 1.5);
  const bool traffic_paused = longest_gap_ns.load() >= absl::ToInt64Nanoseconds(kGrace);
  if (traffic_paused) {
    std::printf(
        "[not checked] the layer-1 traffic paused %lld ms (> the grace) on this loaded "
        "machine: a release during the test is then correct\n",
        static_cast<long long>(longest_gap_ns.load() / 1000000));
  } else {
    EXPECT_EQ(live->releases(), 0u) << "released while requests still used the experts";
    EXPECT_EQ((*server)->bytes_mapped(), 2 * layer_bytes);
  }
  stop_traffic = true;
  traffic.join();
  EXPECT_EQ(l1_failures.load(), 0);
  // The shard saw the last layer-1 request after it was sent.
  const absl::Time last_use = absl::FromUnixNanos(last_sent_ns.load());

  ASSERT_TRUE(testing::PollUntil([&] { return (*server)->bytes_mapped() == layer_bytes; },
                                 absl::Seconds(30)));
  const absl::Time released = absl::Now();
  // The pass that released them ends after its counter and gauges are updated (the memory goes
  // first): the metrics below are read once it has ended.
  ASSERT_TRUE(testing::PollUntil([&] { return live->releases() >= 1; }, absl::Seconds(30)));
  EXPECT_GE(released - last_use, kGrace);
  EXPECT_GE(released - committed_at, kGrace);
  EXPECT_EQ((*server)->bytes_mapped(), layer_bytes);
  // Layer 1 is refused now; layer 2 still served.
  const v1::ExpertResponse refused = client.Call(l1_requests[0]);
  EXPECT_EQ(refused.error_code(), static_cast<int>(absl::StatusCode::kFailedPrecondition))
      << refused.error_message();
  const v1::ExpertResponse again = client.Call(l2_requests[0]);
  EXPECT_EQ(again.error_code(), 0) << again.error_message();
  EXPECT_EQ(again.outputs(), l2_answers[0].outputs());

  const int64_t grown = base::ProcStatusBytes("VmRSS") - before;
  std::printf(
      "[measured] shard gaining layer 2 and losing layer 1: %lld MiB of experts held, RSS "
      "grew %lld MiB since before start (peak %lld MiB with both layers)\n",
      static_cast<long long>(layer_bytes >> 20), static_cast<long long>(grown >> 20),
      static_cast<long long>(peak >> 20));
  EXPECT_LE(grown, static_cast<int64_t>(layer_bytes) * 105 / 100 + kOverhead);

  EXPECT_EQ(metrics.GetCounter("expertmesh_expert_placement_loads_total", "").value(), 32);
  EXPECT_EQ(metrics.GetCounter("expertmesh_expert_placement_releases_total", "").value(), 32);
  EXPECT_EQ(metrics.GetGauge("expertmesh_expert_held_experts", "").value(), 32);

  // A target that cannot load (layer 0 is dense): reported, nothing changes.
  std::vector<LayerExpert> bad = layer2;
  bad.push_back({0, 0});
  live->OnTarget(Target(3, bad, false));
  ASSERT_TRUE(testing::PollUntil([&] { return !live->load_error().empty(); }, absl::Seconds(30)));
  EXPECT_EQ(live->held_generation(), 2u);
  EXPECT_EQ((*server)->bytes_mapped(), layer_bytes);
  EXPECT_EQ(client.Call(l2_requests[1]).error_code(), 0);

  // Every answer equals LocalExperts holding every expert, bitwise.
  std::unique_ptr<Checkpoint> ckpt = *Checkpoint::Open(dir);
  std::unique_ptr<LocalExperts> all = *LocalExperts::Create(*ckpt, config, both);
  for (size_t i = 0; i < l1_requests.size(); ++i) {
    EXPECT_EQ(l1_answers[i].outputs(), Expected(*all, l1_requests[i])) << "layer 1, " << i;
    EXPECT_EQ(l2_answers[i].outputs(), Expected(*all, l2_requests[i])) << "layer 2, " << i;
  }
}

}  // namespace
}  // namespace expertmesh
