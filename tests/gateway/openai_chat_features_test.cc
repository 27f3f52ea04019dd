// DeepSeek chat features through the official `openai` Python client, against a real cluster
// on loopback (router, expert shard and attention service as processes; gateways in-process):
// R1's reasoning_content with R1's released chat template, V3's tool calls with V3's template
// (tools, tool_choice named / required, a history with assistant tool_calls and tool results).
// The bundled tokenizer's random test model never writes the markers by itself, so the test
// drives the paths the gateway owns end to end: with R1's template the output starts inside
// the reasoning (no <think> written, no </think> reached: all of it is reasoning_content),
// and a forced tool_choice opens the call in the prompt, so the model's real tokens are the
// call's name or arguments. The expected values come from the in-process reference engine's
// greedy tokens, split by the same parsers (their own unit tests cover the markers).
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <boost/json.hpp>

#include "core/text/chat_template.h"
#include "core/text/tokenizer.h"
#include "gateway/gateway_server.h"
#include "gateway/reasoning_parser.h"
#include "gateway/strings.h"
#include "gateway/tool_calls.h"
#include "gtest/gtest.h"
#include "tests/cluster/cluster_test_util.h"
#include "tests/gateway/gateway_test_util.h"
#include "tools/launcher/cluster.h"

namespace expertmesh::gateway {
namespace {
namespace json = boost::json;
namespace fs = std::filesystem;

constexpr int kMaxTokens = 12;

std::unique_ptr<GatewayServer> StartGateway(const std::string& model_dir,
                                            const std::string& attention) {
  GatewayOptions go;
  go.model_dir = model_dir;
  go.served_model_name = "deepseek-test";
  go.attention = {attention};
  go.http_host = "127.0.0.1";
  go.request_timeout = std::chrono::seconds(120);
  absl::StatusOr<std::unique_ptr<GatewayServer>> g = GatewayServer::Create(go);
  EXPECT_TRUE(g.ok()) << g.status();
  if (!g.ok()) return nullptr;
  EXPECT_TRUE((*g)->pool().WaitReady(std::chrono::seconds(60)));
  return *std::move(g);
}

TEST(OpenAiChatFeatures, ReasoningAndToolCallsThroughTheOfficialClient) {
  const std::string python = testing::TestPython();
  ASSERT_TRUE(fs::exists(python)) << python << " is missing (tools/requirements-test.txt)";

  absl::StatusOr<std::string> dir = testing::MakeGatewayTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  // The same checkpoint with DeepSeek-R1's released tokenizer_config.json (its chat template).
  const std::string r1_dir = *dir + "-r1";
  fs::create_directories(r1_dir);
  for (const fs::directory_entry& e : fs::directory_iterator(*dir)) {
    if (e.path().filename() != "tokenizer_config.json") {
      fs::create_symlink(e.path(), fs::path(r1_dir) / e.path().filename());
    }
  }
  fs::copy_file(std::string(EXPERTMESH_SOURCE_DIR) +
                    "/tests/data/reference/deepseek-r1/tokenizer_config.json",
                r1_dir + "/tokenizer_config.json");

  absl::StatusOr<std::unique_ptr<launcher::Cluster>> cluster = testing::StartOneShardCluster(*dir);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const std::string attention = (*cluster)->attention().grpc_address;
  std::unique_ptr<GatewayServer> v3 = StartGateway(*dir, attention);
  std::unique_ptr<GatewayServer> r1 = StartGateway(r1_dir, attention);
  ASSERT_TRUE(v3 && r1);
  // --reasoning-parser auto: on for R1's template (it mentions </think>), off for V3's.
  EXPECT_TRUE(r1->card().reasoning_parser);
  EXPECT_FALSE(v3->card().reasoning_parser);

  auto tokenizer = Tokenizer::Load(*dir + "/tokenizer.json");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto v3_tmpl = ChatTemplate::FromTokenizerConfig(*dir + "/tokenizer_config.json");
  auto r1_tmpl = ChatTemplate::FromTokenizerConfig(r1_dir + "/tokenizer_config.json");
  ASSERT_TRUE(v3_tmpl.ok() && r1_tmpl.ok());

  const json::array tools = json::parse(R"([
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}])")
                                .as_array();
  const json::array ask =
      json::parse(R"([{"role": "user", "content": "What is 2+2?"}])").as_array();
  const json::array weather =
      json::parse(R"([{"role": "user", "content": "Weather in Paris?"}])").as_array();
  // A history with the assistant's call (content null, as the client sends it) and its result.
  const json::array history = json::parse(R"([
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
      "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"}])")
                                  .as_array();
  const json::object with_tools{{"tools", tools}};
  const std::vector<std::string> prompts = {
      *r1_tmpl->Apply(ask, true, {}, false),
      *v3_tmpl->Apply(weather, true, with_tools, false) + ForcedToolCallPrefix("get_weather"),
      *v3_tmpl->Apply(weather, true, with_tools, false) + ForcedToolCallPrefix(std::nullopt),
      *v3_tmpl->Apply(history, true, with_tools, false),
  };
  // V3's template renders the call of the history and the tool's result.
  EXPECT_NE(prompts[3].find(Cat(kToolCallBegin, "function", kToolSep, "get_weather\n```json\n")),
            std::string::npos)
      << prompts[3];
  EXPECT_NE(prompts[3].find("<｜tool▁output▁begin｜>{\"temp\": 21}"), std::string::npos);
  std::vector<std::vector<int32_t>> ids;
  for (const std::string& p : prompts) ids.push_back(*tokenizer->get()->Encode(p, false));
  auto ref = expertmesh::testing::ReferenceGreedy(*dir, ids, kMaxTokens);
  ASSERT_TRUE(ref.ok()) << ref.status();
  std::vector<std::string> text;
  for (const auto& r : *ref) text.push_back(tokenizer->get()->Decode(r, true));

  json::object spec;
  spec["model"] = v3->card().id;
  spec["max_tokens"] = kMaxTokens;
  spec["v3_url"] = Cat("http://127.0.0.1:", v3->http_port(), "/v1");
  spec["r1_url"] = Cat("http://127.0.0.1:", r1->http_port(), "/v1");
  spec["tools"] = tools;
  {
    ReasoningParser p;
    ReasoningParser::Split s = p.Feed(text[0]);
    ReasoningParser::Split rest = p.Finish();
    spec["r1"] = json::object{{"messages", ask},
                              {"reasoning", s.reasoning + rest.reasoning},
                              {"content", s.content + rest.content},
                              {"raw", text[0]}};
  }
  auto call = [&](const std::string& generated, const std::string& name) {
    ToolCallParser p(true, name);
    ToolCallParser::Output o = p.Feed(generated);
    ToolCallParser::Output rest = p.Finish();
    std::string call_name, args;
    for (const auto* out : {&o, &rest}) {
      for (const ToolCallEvent& e : out->calls) {
        if (e.index != 0) continue;
        if (e.start) call_name = e.name;
        args += e.arguments;
      }
    }
    return json::object{{"name", call_name}, {"arguments", args}, {"calls", p.calls()}};
  };
  spec["named"] = call(text[1], "get_weather");
  spec["required"] = call(text[2], "");
  spec["history"] =
      json::object{{"messages", history}, {"prompt_tokens", ids[3].size()}, {"content", text[3]}};
  const std::string expected = *dir + "/chat_features_expected.json";
  std::ofstream(expected) << json::serialize(spec);
  const std::string command =
      Cat(python, " ", EXPERTMESH_SOURCE_DIR,
          "/tests/gateway/openai_chat_features_test.py --expected ", expected);
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
  v3.reset();
  r1.reset();
  cluster->reset();
  fs::remove_all(r1_dir);
  fs::remove_all(*dir);
}

}  // namespace
}  // namespace expertmesh::gateway
