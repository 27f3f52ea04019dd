// Ping-pong micro-batches end to end (issue 14 part 5): a cluster on loopback (router, 2 shard
// groups, attention-service --micro-batches 2 and 3, MTP drafting on and off) serves 16
// concurrent greedy sequences of different prompt lengths with exactly the in-process engine's
// tokens, and its steps were really split (the attention service's
// expertmesh_attention_step_micro_batches histogram).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "expertmesh/v1/attention.grpc.pb.h"
#include "gtest/gtest.h"
#include "service-common/grpc_util.h"
#include "service-common/metrics_http.h"
#include "tests/cluster/cluster_test_util.h"
#include "tools/launcher/cluster.h"

namespace expertmesh {
namespace {

using launcher::Cluster;
using launcher::ClusterOptions;
using testing::GreedyRequest;
using testing::SubmitAndCollect;
using testing::SubmitResult;

constexpr int kMaxTokens = 10;
constexpr int kPrompts = 16;

// A series' value in the attention service's /metrics (NaN when absent or unreadable).
double Metric(const Cluster& c, const std::string& name) {
  absl::StatusOr<std::string> text = HttpGet("127.0.0.1", c.attention().metrics_port, "/metrics");
  if (!text.ok()) return NAN;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    if (absl::StartsWith(line, name + " ")) {
      double v = 0;
      if (absl::SimpleAtod(line.substr(name.size() + 1), &v)) return v;
    }
  }
  return NAN;
}

TEST(MicroBatchClusterTest, SplitStepsGiveTheInProcessEnginesTokens) {
  absl::StatusOr<std::string> dir = testing::MakeClusterTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  const std::vector<std::vector<int32_t>> prompts = testing::MakePrompts(kPrompts, 40, 320, 31);
  absl::StatusOr<std::vector<std::vector<int32_t>>> want =
      testing::ReferenceGreedy(*dir, prompts, kMaxTokens);
  ASSERT_TRUE(want.ok()) << want.status();
  for (int micro_batches : {2, 3}) {
    for (bool mtp : {true, false}) {
      SCOPED_TRACE(::testing::Message()
                   << "--micro-batches " << micro_batches << ", MTP " << (mtp ? "on" : "off"));
      ClusterOptions o;
      o.model_dir = *dir;
      o.shards = 2;
      o.bin_dir = EXPERTMESH_BINARY_DIR;
      o.max_batch = 64;
      o.max_waiting = 64;
      o.prefill_chunk = 16;  // prompts of up to 40 tokens: up to 3 chunks
      o.step_deadline_ms = 5000;
      o.micro_batches = micro_batches;
      o.extra_attention_args = {"--micro-batch-min-rows", "1"};
      if (!mtp) o.extra_attention_args.push_back("--no-mtp");
      absl::StatusOr<std::unique_ptr<Cluster>> c = Cluster::Start(o);
      ASSERT_TRUE(c.ok()) << c.status();
      auto stub = v1::AttentionService::NewStub(MakeChannel((*c)->attention().grpc_address));
      std::vector<SubmitResult> results(kPrompts);
      std::vector<std::thread> threads;
      for (int i = 0; i < kPrompts; ++i) {
        threads.emplace_back([&, i] {
          results[i] = SubmitAndCollect(
              *stub, GreedyRequest("mb" + std::to_string(i), prompts[i], kMaxTokens));
        });
      }
      for (std::thread& t : threads) t.join();
      for (int i = 0; i < kPrompts; ++i) {
        EXPECT_TRUE(results[i].status.ok())
            << "prompt " << i << ": " << results[i].status.error_message();
        EXPECT_EQ(results[i].tokens, (*want)[i]) << "prompt " << i;
      }
      const double steps = Metric(**c, "expertmesh_attention_step_micro_batches_count");
      const double parts = Metric(**c, "expertmesh_attention_step_micro_batches_sum");
      EXPECT_GT(parts, steps) << "no step was split";
      if (mtp) EXPECT_GT(Metric(**c, "expertmesh_attention_drafted_tokens_total"), 0.0);
      EXPECT_TRUE((*c)->UnexpectedExits().empty());
      EXPECT_TRUE((*c)->Stop().ok());
      if (::testing::Test::HasFailure()) {
        std::printf("[ info ] service logs kept in %s\n", (*c)->log_dir().c_str());
      } else {
        std::filesystem::remove_all((*c)->log_dir());
      }
    }
  }
  std::filesystem::remove_all(*dir);
}

}  // namespace
}  // namespace expertmesh
