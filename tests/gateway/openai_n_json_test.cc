// n > 1, best_of and JSON mode through the official `openai` Python client, against a real
// cluster on loopback (router, expert shard and attention service as processes; the gateway
// in-process):
// every greedy choice equals the reference engine's greedy tokens, seeded choices differ and
// choice i equals a single completion with seed + i, streamed chunks carry each choice's
// index, best_of returns the choice with the highest cumulative logprob, the choices share
// the prompt's KV blocks (the attention service's prefix-cache metrics), out-of-range values
// get 400, and a client that leaves a stream cancels every choice at the attention service.
// JSON mode: every answer of the (random) test model that ends by "stop" parses as a JSON
// object (json.loads), whole, streamed and through /v1/completions.
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <boost/json.hpp>

#include "core/text/tokenizer.h"
#include "gateway/gateway_server.h"
#include "gateway/strings.h"
#include "gtest/gtest.h"
#include "tests/cluster/cluster_test_util.h"
#include "tests/gateway/gateway_test_util.h"
#include "tools/launcher/cluster.h"

namespace expertmesh::gateway {
namespace {
namespace json = boost::json;
namespace fs = std::filesystem;

constexpr int kMaxTokens = 10;

TEST(OpenAiNAndJson, ChoicesBestOfAndJsonModeThroughTheOfficialClient) {
  const std::string python = testing::TestPython();
  ASSERT_TRUE(fs::exists(python)) << python << " is missing (tools/requirements-test.txt)";

  absl::StatusOr<std::string> dir = testing::MakeGatewayTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<std::unique_ptr<launcher::Cluster>> cluster = testing::StartOneShardCluster(*dir);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  ASSERT_GT((*cluster)->attention().metrics_port, 0);

  GatewayOptions go;
  go.model_dir = *dir;
  go.served_model_name = "deepseek-test";
  go.attention = {(*cluster)->attention().grpc_address};
  go.http_host = "127.0.0.1";
  go.request_timeout = std::chrono::seconds(120);
  absl::StatusOr<std::unique_ptr<GatewayServer>> g = GatewayServer::Create(go);
  ASSERT_TRUE(g.ok()) << g.status();
  ASSERT_TRUE((*g)->pool().WaitReady(std::chrono::seconds(60)));

  auto tokenizer = Tokenizer::Load(*dir + "/tokenizer.json");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  // Long enough for several full KV blocks (16 tokens each by default).
  const std::string prompt =
      "In the beginning God created the heaven and the earth. And the earth was without form, "
      "and void; and darkness was upon the face of the deep. And the Spirit of God moved upon "
      "the face of the waters.";
  const std::vector<int32_t> ids = *tokenizer->get()->Encode(prompt, true);
  ASSERT_GE(ids.size(), 48u);
  auto ref = expertmesh::testing::ReferenceGreedy(*dir, {ids}, kMaxTokens);
  ASSERT_TRUE(ref.ok()) << ref.status();

  json::object spec;
  spec["model"] = (*g)->card().id;
  spec["max_tokens"] = kMaxTokens;
  spec["url"] = Cat("http://127.0.0.1:", (*g)->http_port(), "/v1");
  spec["metrics_url"] = Cat("http://127.0.0.1:", (*cluster)->attention().metrics_port, "/metrics");
  spec["prompt"] = prompt;
  spec["prompt_tokens"] = ids.size();
  spec["greedy"] = tokenizer->get()->Decode((*ref)[0], true);
  spec["json_max_tokens"] = 192;
  const std::string expected = *dir + "/n_json_expected.json";
  std::ofstream(expected) << json::serialize(spec);
  const std::string command = Cat(python, " ", EXPERTMESH_SOURCE_DIR,
                                  "/tests/gateway/openai_n_json_test.py --expected ", expected);
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
  g->reset();
  cluster->reset();
  fs::remove_all(*dir);
}

}  // namespace
}  // namespace expertmesh::gateway
