// DeepSeek-V3 tool calls (gateway/tool_calls.h): parsing the markers of the V3 chat template
// from generated text, cut at every byte; forced calls; tools / tool_choice validation.
#include "gateway/tool_calls.h"

#include <string>
#include <vector>

#include <boost/json.hpp>

#include "gateway/api_error.h"
#include "gateway/strings.h"
#include "gtest/gtest.h"

namespace expertmesh::gateway {
namespace {
namespace json = boost::json;

struct Call {
  std::string type, name, arguments;
  bool operator==(const Call&) const = default;
};
struct Parsed {
  std::string content;
  std::vector<Call> calls;
};

void Apply(const ToolCallParser::Output& o, Parsed* p) {
  p->content += o.content;
  for (const ToolCallEvent& e : o.calls) {
    if (e.start) {
      ASSERT_EQ(e.index, static_cast<int>(p->calls.size()));
      p->calls.push_back({e.type, e.name, ""});
    }
    ASSERT_LT(e.index, static_cast<int>(p->calls.size()));
    p->calls[e.index].arguments += e.arguments;
  }
}

Parsed ParseAll(std::string_view text, const std::vector<size_t>& cuts, bool forced = false,
                std::string name = "") {
  ToolCallParser parser(forced, name);
  Parsed p;
  size_t at = 0;
  for (size_t cut : cuts) {
    Apply(parser.Feed(text.substr(at, cut - at)), &p);
    at = cut;
  }
  Apply(parser.Feed(text.substr(at)), &p);
  Apply(parser.Finish(), &p);
  return p;
}

// The model's output for two calls, exactly as the V3 template renders assistant tool_calls.
const std::string kTwoCalls =
    Cat("Let me check.", kToolCallsBegin, kToolCallBegin, "function", kToolSep,
        "get_weather\n```json\n{\"city\": \"Paris\", \"unit\": \"celsius\"}\n```", kToolCallEnd,
        "\n", kToolCallBegin, "function", kToolSep,
        "get_time\n```json\n{\"tz\": \"Europe/Paris\"}\n```", kToolCallEnd, kToolCallsEnd);

TEST(ToolCallParser, ParsesTheV3Markers) {
  Parsed p = ParseAll(kTwoCalls, {});
  EXPECT_EQ(p.content, "Let me check.");
  ASSERT_EQ(p.calls.size(), 2u);
  EXPECT_EQ(p.calls[0],
            (Call{"function", "get_weather", R"({"city": "Paris", "unit": "celsius"})"}));
  EXPECT_EQ(p.calls[1], (Call{"function", "get_time", R"({"tz": "Europe/Paris"})"}));
}

TEST(ToolCallParser, TextWithoutMarkersIsContent) {
  Parsed p = ParseAll("Plain answer with ``` fences\n``` and <｜tool but no call.", {});
  EXPECT_EQ(p.content, "Plain answer with ``` fences\n``` and <｜tool but no call.");
  EXPECT_TRUE(p.calls.empty());
}

TEST(ToolCallParser, EveryCutGivesTheWholeParse) {
  const std::string inner_fence =
      Cat(kToolCallsBegin, kToolCallBegin, "function", kToolSep,
          "f\n```json\n{\"s\": \"a\\n```b\"}\n```", kToolCallEnd, kToolCallsEnd, "tail");
  for (const std::string& text : {kTwoCalls, inner_fence}) {
    const Parsed whole = ParseAll(text, {});
    for (size_t i = 0; i <= text.size(); ++i) {
      Parsed one = ParseAll(text, {i});
      ASSERT_EQ(one.content, whole.content) << "cut at " << i;
      ASSERT_EQ(one.calls, whole.calls) << "cut at " << i;
    }
    for (size_t i = 0; i <= text.size(); i += 3) {
      for (size_t j = i; j <= text.size(); j += 5) {
        Parsed two = ParseAll(text, {i, j});
        ASSERT_EQ(two.content, whole.content) << "cut at " << i << "," << j;
        ASSERT_EQ(two.calls, whole.calls) << "cut at " << i << "," << j;
      }
    }
    std::vector<size_t> every;
    for (size_t i = 1; i < text.size(); ++i) every.push_back(i);
    Parsed bytes = ParseAll(text, every);
    EXPECT_EQ(bytes.content, whole.content);
    EXPECT_EQ(bytes.calls, whole.calls);
  }
  EXPECT_EQ(ParseAll(inner_fence, {}).calls[0].arguments, "{\"s\": \"a\\n```b\"}");
  EXPECT_EQ(ParseAll(inner_fence, {}).content, "tail");
}

TEST(ToolCallParser, ArgumentsStreamAsTheyArrive) {
  ToolCallParser parser;
  auto o = parser.Feed(Cat("Hi", kToolCallsBegin, kToolCallBegin, "function", kToolSep, "get_wea"));
  EXPECT_EQ(o.content, "Hi");
  EXPECT_TRUE(o.calls.empty());  // the name is not complete
  o = parser.Feed("ther\n```json\n{\"city\": ");
  ASSERT_EQ(o.calls.size(), 1u);  // the call starts with the arguments so far
  EXPECT_TRUE(o.calls[0].start);
  EXPECT_EQ(o.calls[0].name, "get_weather");
  EXPECT_EQ(o.calls[0].arguments, "{\"city\": ");
  o = parser.Feed("\"Paris\"}\n``");  // "\n``" may be the closing fence: held back
  ASSERT_EQ(o.calls.size(), 1u);
  EXPECT_EQ(o.calls[0].arguments, "\"Paris\"}");
  o = parser.Feed(Cat("`", kToolCallEnd, kToolCallsEnd));
  EXPECT_TRUE(o.calls.empty());
  EXPECT_EQ(parser.calls(), 1);
}

TEST(ToolCallParser, TruncatedCallsKeepWhatArrived) {
  // max_tokens inside the arguments: the arguments so far, the held-back tail included.
  Parsed p = ParseAll(
      Cat(kToolCallsBegin, kToolCallBegin, "function", kToolSep, "f\n```json\n{\"a\": 1\n`"), {});
  ASSERT_EQ(p.calls.size(), 1u);
  EXPECT_EQ(p.calls[0].arguments, "{\"a\": 1\n`");
  // Inside the name.
  Parsed name = ParseAll(Cat(kToolCallsBegin, kToolCallBegin, "function", kToolSep, "get_we"), {});
  ASSERT_EQ(name.calls.size(), 1u);
  EXPECT_EQ(name.calls[0].name, "get_we");
  // A call without the fence still parses.
  Parsed bare = ParseAll(Cat(kToolCallBegin, "function", kToolSep, "f\n{}", kToolCallEnd), {});
  ASSERT_EQ(bare.calls.size(), 1u);
  EXPECT_EQ(bare.calls[0].arguments, "{}");
}

TEST(ToolCallParser, ForcedCallsStartInsideTheCall) {
  // tool_choice "required": the prompt ends with the separator, the model writes the name.
  Parsed req = ParseAll(Cat("get_time\n```json\n{}\n```", kToolCallEnd, kToolCallsEnd), {}, true);
  ASSERT_EQ(req.calls.size(), 1u);
  EXPECT_EQ(req.calls[0], (Call{"function", "get_time", "{}"}));
  // A named function: the model writes the arguments; the call exists before any text.
  ToolCallParser named(true, "get_weather");
  auto o = named.Feed("");
  ASSERT_EQ(o.calls.size(), 1u);
  EXPECT_TRUE(o.calls[0].start);
  EXPECT_EQ(o.calls[0].name, "get_weather");
  Parsed p = ParseAll("{\"city\": \"Oslo\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>", {5}, true,
                      "get_weather");
  ASSERT_EQ(p.calls.size(), 1u);
  EXPECT_EQ(p.calls[0], (Call{"function", "get_weather", "{\"city\": \"Oslo\"}"}));
  EXPECT_EQ(ForcedToolCallPrefix("f"),
            Cat(kToolCallsBegin, kToolCallBegin, "function", kToolSep, "f\n```json\n"));
  EXPECT_EQ(ForcedToolCallPrefix(std::nullopt),
            Cat(kToolCallsBegin, kToolCallBegin, "function", kToolSep));
}

absl::Status ParseTools(std::string_view tools, std::string_view choice, GenerationRequest* r) {
  json::value t = tools.empty() ? json::value() : json::parse(tools);
  json::value c = choice.empty() ? json::value() : json::parse(choice);
  return ParseToolRequest(tools.empty() ? nullptr : &t, choice.empty() ? nullptr : &c, r);
}

constexpr std::string_view kTools = R"([{"type": "function", "function": {"name": "get_weather",
  "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type":
  "string"}}}}}, {"type": "function", "function": {"name": "get_time"}}])";

TEST(ToolRequest, ChoicesSetWhatIsParsedAndForced) {
  GenerationRequest none;
  ASSERT_TRUE(ParseTools("", "", &none).ok());
  EXPECT_FALSE(none.chat.tool_calls);
  EXPECT_FALSE(none.chat.tools.has_value());

  GenerationRequest autoc;
  ASSERT_TRUE(ParseTools(kTools, "", &autoc).ok());
  EXPECT_TRUE(autoc.chat.tool_calls);  // auto by default when tools are given
  ASSERT_TRUE(autoc.chat.tools.has_value());
  EXPECT_EQ(autoc.chat.tools->size(), 2u);
  EXPECT_TRUE(autoc.chat.forced_prefix.empty());

  GenerationRequest off;
  ASSERT_TRUE(ParseTools(kTools, R"("none")", &off).ok());
  EXPECT_FALSE(off.chat.tool_calls);
  EXPECT_TRUE(off.chat.tools.has_value());  // still shown to the template

  GenerationRequest req;
  ASSERT_TRUE(ParseTools(kTools, R"("required")", &req).ok());
  EXPECT_TRUE(req.chat.tool_calls && req.chat.forced_call);
  EXPECT_EQ(req.chat.forced_name, "");
  EXPECT_EQ(req.chat.forced_prefix, ForcedToolCallPrefix(std::nullopt));

  GenerationRequest named;
  ASSERT_TRUE(
      ParseTools(kTools, R"({"type": "function", "function": {"name": "get_time"}})", &named).ok());
  EXPECT_TRUE(named.chat.forced_call);
  EXPECT_EQ(named.chat.forced_name, "get_time");
  EXPECT_EQ(named.chat.forced_prefix, ForcedToolCallPrefix("get_time"));
}

TEST(ToolRequest, BadToolsAndChoicesAre400WithTheirParam) {
  struct Case {
    std::string tools, choice, param;
  };
  const std::vector<Case> cases = {
      {R"({"type": "function"})", "", "tools"},
      {R"([5])", "", "tools[0]"},
      {R"([{"type": "retrieval"}])", "", "tools[0].type"},
      {R"([{"type": "function"}])", "", "tools[0].function"},
      {R"([{"type": "function", "function": {}}])", "", "tools[0].function.name"},
      {R"([{"type": "function", "function": {"name": "has space"}}])", "",
       "tools[0].function.name"},
      {R"([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}])",
       "", "tools[1].function.name"},
      {R"([{"type": "function", "function": {"name": "f", "parameters": "x"}}])", "",
       "tools[0].function.parameters"},
      {R"([{"type": "function", "function": {"name": "f", "color": 1}}])", "", "tools[0].function"},
      {R"([{"type": "function", "function": {"name": "f"}, "x": 1}])", "", "tools[0]"},
      {kTools.data(), R"("any")", "tool_choice"},
      {kTools.data(), R"(5)", "tool_choice"},
      {kTools.data(), R"({"type": "function", "function": {"name": "nope"}})", "tool_choice"},
      {kTools.data(), R"({"type": "function"})", "tool_choice"},
      {"", R"("required")", "tool_choice"},
      {"", R"("auto")", "tool_choice"},
  };
  for (const Case& c : cases) {
    GenerationRequest r;
    absl::Status s = ParseTools(c.tools, c.choice, &r);
    ASSERT_FALSE(s.ok()) << c.tools << " " << c.choice;
    ApiError e = ToApiError(s);
    EXPECT_EQ(e.http_status, 400) << c.tools << " " << c.choice;
    EXPECT_EQ(e.type, "invalid_request_error");
    EXPECT_EQ(e.param, c.param) << c.tools << " " << c.choice << ": " << e.message;
  }
  GenerationRequest r;
  EXPECT_TRUE(ParseTools("", R"("none")", &r).ok());
}

TEST(ToolRequest, AssistantToolCallsAreNormalized) {
  auto calls = NormalizeToolCalls(json::parse(R"([{"id": "call_1", "type": "function",
    "function": {"name": "f", "arguments": "{\"a\": 1}"}}, {"function": {"name": "g",
    "arguments": {"b": 2}}}])"),
                                  "messages[1]");
  ASSERT_TRUE(calls.ok()) << calls.status();
  ASSERT_EQ(calls->size(), 2u);
  EXPECT_EQ((*calls)[0].at("function").at("arguments").as_string(), "{\"a\": 1}");
  EXPECT_EQ((*calls)[1].at("type").as_string(), "function");
  EXPECT_EQ((*calls)[1].at("function").at("arguments").as_string(), "{\"b\":2}");
  for (std::string_view bad :
       {R"(5)", R"([5])", R"([{"function": {}}])", R"([{"type": "x", "function": {"name": "f"}}])",
        R"([{"function": {"name": "f", "arguments": 5}}])"}) {
    auto r = NormalizeToolCalls(json::parse(bad), "messages[1]");
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(ToApiError(r.status()).http_status, 400);
    EXPECT_NE(ToApiError(r.status()).param->find("messages[1].tool_calls"), std::string::npos);
  }
}

}  // namespace
}  // namespace expertmesh::gateway
