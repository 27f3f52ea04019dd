// Speculative decoding through the cluster: router + 3 shard groups + attention service as
// processes on loopback, the attention service drafting every step with the MTP module
// (--mtp-always; the MTP layer's experts are dispatched to the shards like the others), for
// draft_k 1 and 2. Greedy tokens of 8 prompts, submitted concurrently, equal those of the
// in-process reference engine without drafting (the exact combine makes the placement
// irrelevant: the plain engine, no per-placement numerics), and equal
// those of the same cluster with disable_mtp; the TokenEvents report the drafts verified.
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/format/config.h"
#include "expertmesh/v1/attention.grpc.pb.h"
#include "gtest/gtest.h"
#include "service-common/grpc_util.h"
#include "tests/cluster/cluster_test_util.h"
#include "tools/launcher/cluster.h"

namespace expertmesh {
namespace {

constexpr int kShards = 3;  // 8 experts over 3 groups: an uneven split
constexpr int kMaxTokens = 20;
constexpr int kPrompts = 8;

struct Collected {
  grpc::Status status;
  std::vector<int32_t> tokens;
  uint32_t drafted = 0, accepted = 0;
};

Collected Submit(v1::AttentionService::Stub& stub, const v1::SubmitRequest& r) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(2));
  auto reader = stub.Submit(&ctx, r);
  v1::TokenEvent e;
  Collected c;
  while (reader->Read(&e)) {
    c.tokens.insert(c.tokens.end(), e.token_ids().begin(), e.token_ids().end());
    if (e.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      c.drafted = e.drafted_tokens();
      c.accepted = e.accepted_draft_tokens();
    }
  }
  c.status = reader->Finish();
  return c;
}

class MtpClusterTest : public ::testing::TestWithParam<int> {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> dir = testing::MakeClusterTestModel();
    ASSERT_TRUE(dir.ok()) << dir.status();
    model_dir_ = new std::string(*dir);
    absl::StatusOr<ModelConfig> config = LoadModelConfig(*dir + "/config.json");
    ASSERT_TRUE(config.ok());
    ASSERT_GE(config->num_nextn_predict_layers, 1) << "the cluster test model lost its MTP module";
    prompts_ = new std::vector<std::vector<int32_t>>(
        testing::MakePrompts(kPrompts, 30, static_cast<int>(config->vocab_size), 2027));
    absl::StatusOr<std::vector<std::vector<int32_t>>> want =
        testing::ReferenceGreedy(*dir, *prompts_, kMaxTokens);
    ASSERT_TRUE(want.ok()) << want.status();
    want_ = new std::vector<std::vector<int32_t>>(*std::move(want));
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*model_dir_);
    delete model_dir_;
    delete prompts_;
    delete want_;
  }
  static std::string* model_dir_;
  static std::vector<std::vector<int32_t>>* prompts_;
  static std::vector<std::vector<int32_t>>* want_;
};
std::string* MtpClusterTest::model_dir_ = nullptr;
std::vector<std::vector<int32_t>>* MtpClusterTest::prompts_ = nullptr;
std::vector<std::vector<int32_t>>* MtpClusterTest::want_ = nullptr;

TEST_P(MtpClusterTest, GreedyTokensEqualTheReferenceWithoutDrafting) {
  const int draft_k = GetParam();
  launcher::ClusterOptions o;
  o.model_dir = *model_dir_;
  o.shards = kShards;
  o.bin_dir = EXPERTMESH_BINARY_DIR;
  o.prefill_chunk = 16;  // prompts up to 30 tokens: MTP rows fed chunk by chunk
  o.step_deadline_ms = 5000;
  o.extra_attention_args = {"--draft-k", std::to_string(draft_k), "--mtp-always"};
  absl::StatusOr<std::unique_ptr<launcher::Cluster>> cluster = launcher::Cluster::Start(o);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto stub = v1::AttentionService::NewStub(MakeChannel((*cluster)->attention().grpc_address));

  for (bool disable_mtp : {false, true}) {
    std::vector<Collected> results(kPrompts);
    std::vector<std::thread> threads;
    for (int i = 0; i < kPrompts; ++i) {
      threads.emplace_back([&, i] {
        v1::SubmitRequest r = testing::GreedyRequest(
            "k" + std::to_string(draft_k) + (disable_mtp ? "-plain-" : "-mtp-") + std::to_string(i),
            (*prompts_)[i], kMaxTokens);
        r.set_disable_mtp(disable_mtp);
        results[i] = Submit(*stub, r);
      });
    }
    for (std::thread& t : threads) t.join();
    uint32_t drafted = 0, accepted = 0;
    for (int i = 0; i < kPrompts; ++i) {
      ASSERT_TRUE(results[i].status.ok()) << results[i].status.error_message();
      EXPECT_EQ(results[i].tokens, (*want_)[i])
          << "draft_k " << draft_k << (disable_mtp ? " without" : " with") << " MTP, prompt " << i;
      EXPECT_LE(results[i].accepted, results[i].drafted);
      drafted += results[i].drafted;
      accepted += results[i].accepted;
    }
    if (disable_mtp) {
      EXPECT_EQ(drafted, 0u);
    } else {
      // Every step drafts draft_k while that many tokens are still wanted.
      EXPECT_GE(drafted,
                static_cast<uint32_t>(kPrompts * (kMaxTokens - draft_k - 1) / (draft_k + 1)));
      std::printf("draft_k %d: %u drafts verified, %u accepted\n", draft_k, drafted, accepted);
    }
  }
  EXPECT_TRUE((*cluster)->UnexpectedExits().empty());
  EXPECT_TRUE((*cluster)->Stop().ok());
}

INSTANTIATE_TEST_SUITE_P(DraftK, MtpClusterTest, ::testing::Values(1, 2));

}  // namespace
}  // namespace expertmesh
