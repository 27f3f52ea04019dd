// OpenAI response shapes: whole responses and SSE chunks for both endpoints, logprobs in each
// endpoint's form, usage; and API keys from a file and the environment.
#include "gateway/openai_response.h"

#include <stdlib.h>

#include <fstream>

#include <boost/json.hpp>

#include "gateway/gateway_server.h"
#include "gtest/gtest.h"

namespace expertmesh::gateway {
namespace {
namespace json = boost::json;

Delta MakeDelta(std::string text, std::vector<int32_t> ids, bool with_logprobs) {
  Delta d;
  d.text = std::move(text);
  d.token_ids = std::move(ids);
  if (with_logprobs) {
    for (int32_t id : d.token_ids) {
      d.logprobs.push_back({id,
                            "t" + std::to_string(id),
                            -0.5f,
                            {{id, "t" + std::to_string(id), -0.5f}, {99, "alt", -1.5f}}});
    }
  }
  return d;
}

GenerationRequest Req(Endpoint endpoint, bool logprobs) {
  GenerationRequest r;
  r.endpoint = endpoint;
  r.model = "tiny";
  r.sampling.logprobs = logprobs;
  return r;
}

TEST(OpenAiResponse, CompletionWholeAndChunks) {
  OpenAiResponder r(Req(Endpoint::kCompletions, true), "cmpl-1", 1700000000);
  r.Collect(MakeDelta("Hel", {5}, true));
  r.Collect(MakeDelta("lo", {6, 7}, true));
  Outcome out{"stop", "!", {3, 3, 0}};
  json::value v = json::parse(r.Full(out));
  EXPECT_EQ(v.at("id").as_string(), "cmpl-1");
  EXPECT_EQ(v.at("object").as_string(), "text_completion");
  EXPECT_EQ(v.at("created").as_int64(), 1700000000);
  EXPECT_EQ(v.at("model").as_string(), "tiny");
  const json::value& c = v.at("choices").at(0);
  EXPECT_EQ(c.at("text").as_string(), "Hello");
  EXPECT_EQ(c.at("finish_reason").as_string(), "stop");
  const json::value& lp = c.at("logprobs");
  EXPECT_EQ(lp.at("tokens").as_array().size(), 3u);
  EXPECT_EQ(lp.at("tokens").at(1).as_string(), "t6");
  EXPECT_EQ(lp.at("text_offset").at(2).as_int64(), 4);  // "t5" + "t6"
  EXPECT_EQ(lp.at("top_logprobs").at(0).at("alt").as_double(), -1.5);
  EXPECT_EQ(v.at("usage").at("total_tokens").as_int64(), 6);

  OpenAiResponder s(Req(Endpoint::kCompletions, false), "cmpl-2", 1);
  json::value chunk = json::parse(s.Chunk(MakeDelta("a", {1}, false), true));
  EXPECT_EQ(chunk.at("choices").at(0).at("text").as_string(), "a");
  EXPECT_TRUE(chunk.at("choices").at(0).at("finish_reason").is_null());
  EXPECT_TRUE(chunk.at("choices").at(0).at("logprobs").is_null());
  EXPECT_TRUE(chunk.at("usage").is_null());
  json::value fin = json::parse(s.FinishChunk(out, false));
  EXPECT_EQ(fin.at("choices").at(0).at("finish_reason").as_string(), "stop");
  EXPECT_FALSE(fin.as_object().contains("usage"));
  json::value usage = json::parse(s.UsageChunk(out.usage));
  EXPECT_TRUE(usage.at("choices").as_array().empty());
  EXPECT_EQ(usage.at("usage").at("completion_tokens").as_int64(), 3);
}

TEST(OpenAiResponse, ChatWholeAndChunks) {
  OpenAiResponder r(Req(Endpoint::kChatCompletions, true), "chatcmpl-1", 2);
  r.Collect(MakeDelta("\xc3\xa9t\xc3\xa9", {5}, true));
  json::value v = json::parse(r.Full({"length", std::nullopt, {1, 1, 0}}));
  EXPECT_EQ(v.at("object").as_string(), "chat.completion");
  const json::value& c = v.at("choices").at(0);
  EXPECT_EQ(c.at("message").at("role").as_string(), "assistant");
  EXPECT_EQ(c.at("message").at("content").as_string(), "\xc3\xa9t\xc3\xa9");
  EXPECT_EQ(c.at("finish_reason").as_string(), "length");
  const json::value& entry = c.at("logprobs").at("content").at(0);
  EXPECT_EQ(entry.at("token").as_string(), "t5");
  EXPECT_EQ(entry.at("bytes").as_array().size(), 2u);
  EXPECT_EQ(entry.at("top_logprobs").as_array().size(), 2u);

  OpenAiResponder s(Req(Endpoint::kChatCompletions, false), "chatcmpl-2", 2);
  json::value first = json::parse(s.Chunk(MakeDelta("Hi", {1}, false), false));
  EXPECT_EQ(first.at("object").as_string(), "chat.completion.chunk");
  EXPECT_EQ(first.at("choices").at(0).at("delta").at("role").as_string(), "assistant");
  EXPECT_EQ(first.at("choices").at(0).at("delta").at("content").as_string(), "Hi");
  json::value second = json::parse(s.Chunk(MakeDelta("!", {2}, false), false));
  EXPECT_FALSE(second.at("choices").at(0).at("delta").as_object().contains("role"));
  json::value fin = json::parse(s.FinishChunk({"stop", std::nullopt, {}}, false));
  EXPECT_TRUE(fin.at("choices").at(0).at("delta").as_object().empty());
  EXPECT_EQ(SseEvent("{}"), "data: {}\n\n");
}

TEST(ApiKeys, FileAndEnvironment) {
  const std::string path = ::testing::TempDir() + "/gateway_keys.txt";
  std::ofstream(path) << "# operators\nkey-a\n\n  key-b  \n";
  auto keys = LoadApiKeys(path, "key-c, key-d");
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_EQ(*keys, (std::vector<std::string>{"key-a", "key-b", "key-c", "key-d"}));
  auto none = LoadApiKeys("", nullptr);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  EXPECT_FALSE(LoadApiKeys("/nonexistent/keys", nullptr).ok());
  std::ofstream(path) << "# only a comment\n";
  EXPECT_FALSE(LoadApiKeys(path, nullptr).ok());
}

// R1 reasoning and V3 tool calls in one chat output: the whole message and the streamed deltas
// (cut every 3 bytes, so markers are split) carry the same reasoning, content and calls.
TEST(OpenAiResponse, ChatReasoningAndToolCallsWholeEqualsStreamed) {
  GenerationRequest req = Req(Endpoint::kChatCompletions, false);
  req.chat.reasoning = true;
  req.chat.tool_calls = true;
  const std::string text =
      "<think>\nThe user wants weather.\n</think>\n\nLet me check."
      "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
      "```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function"
      "<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
  Outcome outcome;
  outcome.finish_reason = "stop";
  OpenAiResponder whole(req, "chatcmpl-gw-1-5", 3);
  OpenAiResponder streamed(req, "chatcmpl-gw-1-5", 3);
  std::string reasoning, content;
  json::array calls;
  bool has_role = false;
  auto take = [&](const std::string& chunk) {
    json::object c = json::parse(chunk).as_object();
    const json::object& d = c.at("choices").at(0).at("delta").as_object();
    has_role = has_role || d.contains("role");
    if (d.contains("reasoning_content")) reasoning += d.at("reasoning_content").as_string();
    if (d.contains("content")) content += d.at("content").as_string();
    if (!d.contains("tool_calls")) return c;
    for (const json::value& tc : d.at("tool_calls").as_array()) {
      const size_t index = tc.at("index").as_int64();
      if (index == calls.size()) {
        EXPECT_TRUE(tc.as_object().contains("id")) << chunk;
        EXPECT_EQ(tc.at("type"), "function");
        calls.push_back(json::object{
            {"id", tc.at("id")},
            {"type", "function"},
            {"function", json::object{{"name", tc.at("function").at("name")}, {"arguments", ""}}}});
      } else {
        EXPECT_FALSE(tc.as_object().contains("id")) << chunk;
      }
      calls.at(index)
          .at("function")
          .as_object()["arguments"]
          .as_string()
          .append(tc.at("function").at("arguments").as_string());
    }
    return c;
  };
  for (size_t i = 0; i < text.size(); i += 3) {
    Delta d = MakeDelta(text.substr(i, 3), {7}, false);
    whole.Collect(d);
    json::object c = take(streamed.Chunk(d, false));
    EXPECT_TRUE(c.at("choices").at(0).at("finish_reason").is_null());
  }
  json::object fin = take(streamed.FinishChunk(outcome, false));
  EXPECT_EQ(fin.at("choices").at(0).at("finish_reason"), "tool_calls");
  EXPECT_TRUE(has_role);

  json::object full = json::parse(whole.Full(outcome)).as_object();
  const json::object& choice = full.at("choices").at(0).as_object();
  EXPECT_EQ(choice.at("finish_reason"), "tool_calls");
  const json::object& m = choice.at("message").as_object();
  EXPECT_EQ(m.at("reasoning_content"), "\nThe user wants weather.\n");
  EXPECT_EQ(m.at("content"), "\n\nLet me check.");
  ASSERT_EQ(m.at("tool_calls").as_array().size(), 2u);
  EXPECT_EQ(m.at("tool_calls").at(0).at("function").at("name"), "get_weather");
  EXPECT_EQ(m.at("tool_calls").at(0).at("function").at("arguments"), "{\"city\": \"Paris\"}");
  EXPECT_EQ(m.at("tool_calls").at(1).at("function").at("name"), "get_time");
  EXPECT_EQ(m.at("tool_calls").at(1).at("function").at("arguments"), "{}");
  EXPECT_NE(m.at("tool_calls").at(0).at("id"), m.at("tool_calls").at(1).at("id"));
  // The stream says the same.
  EXPECT_EQ(reasoning, m.at("reasoning_content").as_string());
  EXPECT_EQ(content, m.at("content").as_string());
  EXPECT_EQ(json::value(calls), m.at("tool_calls"));

  // Without parsers (a model without them, tool_choice none) the markers stay in the content.
  OpenAiResponder plain(Req(Endpoint::kChatCompletions, false), "chatcmpl-gw-1-6", 3);
  plain.Collect(MakeDelta(text, {7}, false));
  json::object p = json::parse(plain.Full(outcome)).as_object();
  EXPECT_EQ(p.at("choices").at(0).at("message").at("content").as_string(), text);
  EXPECT_FALSE(p.at("choices").at(0).at("message").as_object().contains("reasoning_content"));
  EXPECT_EQ(p.at("choices").at(0).at("finish_reason"), "stop");

  // A forced call (R1 with tool_choice naming a function): the output is the call's arguments,
  // not reasoning, though the model has a reasoning parser.
  GenerationRequest forced = req;
  forced.chat.forced_call = true;
  forced.chat.forced_name = "get_weather";
  OpenAiResponder args(forced, "chatcmpl-gw-1-8", 3);
  args.Collect(
      MakeDelta("{\"city\": \"Oslo\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>", {7}, false));
  json::object a = json::parse(args.Full(outcome)).as_object();
  const json::object& am = a.at("choices").at(0).at("message").as_object();
  EXPECT_TRUE(am.at("reasoning_content").is_null());
  EXPECT_TRUE(am.at("content").is_null());
  EXPECT_EQ(am.at("tool_calls").at(0).at("function").at("name"), "get_weather");
  EXPECT_EQ(am.at("tool_calls").at(0).at("function").at("arguments"), "{\"city\": \"Oslo\"}");
  EXPECT_EQ(a.at("choices").at(0).at("finish_reason"), "stop");  // named: "stop", as OpenAI

  // parallel_tool_calls false: the first call only.
  GenerationRequest single = req;
  single.chat.parallel_tool_calls = false;
  OpenAiResponder one(single, "chatcmpl-gw-1-9", 3);
  one.Collect(MakeDelta(text, {7}, false));
  json::object o1 = json::parse(one.Full(outcome)).as_object();
  ASSERT_EQ(o1.at("choices").at(0).at("message").at("tool_calls").as_array().size(), 1u);
  EXPECT_EQ(o1.at("choices").at(0).at("message").at("tool_calls").at(0).at("function").at("name"),
            "get_weather");

  // include_reasoning false: the reasoning is dropped; a call cut by max_tokens keeps "length".
  GenerationRequest hide = req;
  hide.chat.include_reasoning = false;
  OpenAiResponder hidden(hide, "chatcmpl-gw-1-7", 3);
  hidden.Collect(MakeDelta(text.substr(0, 120), {7}, false));
  Outcome length;
  length.finish_reason = "length";
  json::object h = json::parse(hidden.Full(length)).as_object();
  EXPECT_FALSE(h.at("choices").at(0).at("message").as_object().contains("reasoning_content"));
  EXPECT_EQ(h.at("choices").at(0).at("message").at("content"), "\n\nLet me check.");
  EXPECT_EQ(h.at("choices").at(0).at("finish_reason"), "length");
}

}  // namespace
}  // namespace expertmesh::gateway

namespace expertmesh::gateway {
namespace {

Delta ChoiceDelta(uint32_t index, std::string text) {
  Delta d;
  d.index = index;
  d.text = std::move(text);
  d.token_ids = {1};
  return d;
}
Delta ChoiceEnd(uint32_t index, std::string reason) {
  Delta d;
  d.index = index;
  d.finish_reason = std::move(reason);
  return d;
}

TEST(OpenAiResponse, SeveralChoicesWholeAndStreamed) {
  GenerationRequest req = Req(Endpoint::kChatCompletions, false);
  req.n = 3;
  // Deltas interleaved as the choices' sequences produce them; choice 1 ends first, choice 0
  // last (reported by the outcome).
  const std::vector<Delta> deltas = {
      ChoiceDelta(0, "a"),  ChoiceDelta(1, "b"),  ChoiceDelta(2, "c"),   ChoiceEnd(1, "stop"),
      ChoiceDelta(0, "a2"), ChoiceDelta(2, "c2"), ChoiceEnd(2, "length")};
  Outcome out{"length", std::nullopt, {4, 5, 0}, 0};
  OpenAiResponder whole(req, "chatcmpl-1", 1);
  for (const Delta& d : deltas) whole.Collect(d);
  json::value v = json::parse(whole.Full(out));
  const json::array& choices = v.at("choices").as_array();
  ASSERT_EQ(choices.size(), 3u);
  const std::vector<std::pair<std::string, std::string>> want = {
      {"aa2", "length"}, {"b", "stop"}, {"cc2", "length"}};
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(choices[i].at("index").as_int64(), static_cast<int64_t>(i));
    EXPECT_EQ(choices[i].at("message").at("content").as_string(), want[i].first);
    EXPECT_EQ(choices[i].at("finish_reason").as_string(), want[i].second);
  }
  EXPECT_EQ(v.at("usage").at("completion_tokens").as_int64(), 5);

  OpenAiResponder streamed(req, "chatcmpl-1", 1);
  std::vector<std::string> text(3);
  std::vector<int> roles(3), finishes(3);
  std::vector<std::string> reasons(3);
  auto read = [&](const std::string& chunk) {
    json::value c = json::parse(chunk);
    ASSERT_EQ(c.at("choices").as_array().size(), 1u);
    const json::value& ch = c.at("choices").at(0);
    const auto i = static_cast<size_t>(ch.at("index").as_int64());
    const json::object& d = ch.at("delta").as_object();
    if (d.contains("role")) ++roles[i];
    if (d.contains("content")) text[i] += d.at("content").as_string();
    if (!ch.at("finish_reason").is_null()) {
      ++finishes[i];
      reasons[i] = ch.at("finish_reason").as_string();
    }
  };
  for (const Delta& d : deltas) read(streamed.Chunk(d, false));
  read(streamed.FinishChunk(out, false));
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(text[i], want[i].first) << i;
    EXPECT_EQ(reasons[i], want[i].second) << i;
    EXPECT_EQ(roles[i], 1) << i;
    EXPECT_EQ(finishes[i], 1) << i;
  }
}

TEST(OpenAiResponse, SeveralCompletionChoicesKeepTheirOwnLogprobOffsets) {
  GenerationRequest req = Req(Endpoint::kCompletions, true);
  req.n = 2;
  OpenAiResponder r(req, "cmpl-2", 1);
  Delta a = MakeDelta("x", {5}, true);
  Delta b = MakeDelta("y", {6, 7}, true);
  b.index = 1;
  r.Collect(b);
  r.Collect(a);
  r.Collect(ChoiceEnd(0, "stop"));
  json::value v = json::parse(r.Full(Outcome{"length", std::nullopt, {1, 3, 0}, 1}));
  const json::value& c0 = v.at("choices").at(0);
  const json::value& c1 = v.at("choices").at(1);
  EXPECT_EQ(c0.at("text").as_string(), "x");
  EXPECT_EQ(c0.at("finish_reason").as_string(), "stop");
  EXPECT_EQ(c0.at("logprobs").at("text_offset").at(0).as_int64(), 0);
  EXPECT_EQ(c1.at("text").as_string(), "y");
  EXPECT_EQ(c1.at("finish_reason").as_string(), "length");
  EXPECT_EQ(c1.at("logprobs").at("text_offset").at(1).as_int64(), 2);  // after "t6"
}

}  // namespace
}  // namespace expertmesh::gateway
