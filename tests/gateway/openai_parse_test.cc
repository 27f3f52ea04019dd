// OpenAI request parsing and validation: every accepted form and every rejected one, with the
// HTTP status, error type and param the client sees.
#include <boost/json.hpp>

#include "gateway/api_error.h"
#include "gateway/openai_parse.h"
#include "gtest/gtest.h"

namespace expertmesh::gateway {
namespace {

ModelCard Card() {
  ModelCard card;
  card.id = "expertmesh-tiny";
  card.max_context = 512;
  card.defaults.temperature = 0.6f;
  card.defaults.top_p = 0.95f;
  return card;
}

absl::StatusOr<GenerationRequest> Completion(std::string_view body) {
  return ParseCompletionRequest(body, Card(), RequestLimits{});
}
absl::StatusOr<GenerationRequest> Chat(std::string_view body) {
  return ParseChatCompletionRequest(body, Card(), RequestLimits{});
}

// Expects a failure and returns what the HTTP client would see.
ApiError ErrorOf(const absl::StatusOr<GenerationRequest>& r) {
  EXPECT_FALSE(r.ok());
  return ToApiError(r.status());
}

TEST(OpenAiParse, MinimalCompletionTakesGenerationConfigDefaults) {
  auto r = Completion(R"({"model": "expertmesh-tiny", "prompt": "Hello"})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->endpoint, Endpoint::kCompletions);
  EXPECT_EQ(*r->prompt_text, "Hello");
  EXPECT_FALSE(r->max_tokens.has_value());
  EXPECT_FLOAT_EQ(r->sampling.temperature, 0.6f);
  EXPECT_FLOAT_EQ(r->sampling.top_p, 0.95f);
  EXPECT_EQ(r->sampling.top_k, 0);
  EXPECT_FALSE(r->sampling.seed.has_value());
  EXPECT_FALSE(r->sampling.logprobs);
  EXPECT_FALSE(r->stream);
}

TEST(OpenAiParse, CompletionWithEveryParameter) {
  auto r = Completion(R"({"model": "expertmesh-tiny", "prompt": "Hi", "max_tokens": 7,
    "temperature": 0, "top_p": 0.5, "top_k": 40, "seed": 1234, "stop": ["\n", "END"],
    "stop_token_ids": [3, 4], "logprobs": 3, "presence_penalty": 0.5,
    "frequency_penalty": -1.5, "ignore_eos": true, "n": 1, "stream": true,
    "stream_options": {"include_usage": true}, "user": "u1", "echo": false, "best_of": 1,
    "logit_bias": {}, "skip_special_tokens": false})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r->max_tokens, 7u);
  EXPECT_EQ(r->sampling.temperature, 0.0f);
  EXPECT_FLOAT_EQ(r->sampling.top_p, 0.5f);
  EXPECT_EQ(r->sampling.top_k, 40);
  EXPECT_EQ(*r->sampling.seed, 1234u);
  EXPECT_EQ(r->stop, (std::vector<std::string>{"\n", "END"}));
  EXPECT_EQ(r->stop_token_ids, (std::vector<int32_t>{3, 4}));
  EXPECT_TRUE(r->sampling.logprobs);
  EXPECT_EQ(r->sampling.top_logprobs, 3u);
  EXPECT_FLOAT_EQ(r->sampling.presence_penalty, 0.5f);
  EXPECT_FLOAT_EQ(r->sampling.frequency_penalty, -1.5f);
  EXPECT_TRUE(r->ignore_eos);
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
  EXPECT_FALSE(r->skip_special_tokens);
}

TEST(OpenAiParse, PromptForms) {
  auto text = Completion(R"({"model": "expertmesh-tiny", "prompt": ["one"], "stop": "x"})");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text->prompt_text, "one");
  EXPECT_EQ(text->stop, std::vector<std::string>{"x"});
  auto ids = Completion(R"({"model": "expertmesh-tiny", "prompt": [5, 6, 7]})");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids->prompt_token_ids, (std::vector<int32_t>{5, 6, 7}));
  auto nested = Completion(R"({"model": "expertmesh-tiny", "prompt": [[8, 9]]})");
  ASSERT_TRUE(nested.ok()) << nested.status();
  EXPECT_EQ(*nested->prompt_token_ids, (std::vector<int32_t>{8, 9}));

  ApiError batch = ErrorOf(Completion(R"({"model": "expertmesh-tiny", "prompt": ["a", "b"]})"));
  EXPECT_EQ(batch.http_status, 400);
  EXPECT_EQ(batch.param, "prompt");
  ApiError empty = ErrorOf(Completion(R"({"model": "expertmesh-tiny", "prompt": []})"));
  EXPECT_EQ(empty.http_status, 400);
  ApiError negative = ErrorOf(Completion(R"({"model": "expertmesh-tiny", "prompt": [1, -2]})"));
  EXPECT_EQ(negative.param, "prompt");
  ApiError missing = ErrorOf(Completion(R"({"model": "expertmesh-tiny"})"));
  EXPECT_EQ(missing.param, "prompt");
  ApiError number = ErrorOf(Completion(R"({"model": "expertmesh-tiny", "prompt": 3})"));
  EXPECT_EQ(number.param, "prompt");
}

TEST(OpenAiParse, MalformedJsonAndNonObjects) {
  for (std::string_view body : {"{", "", "[1, 2]", "\"text\"", "{\"model\": }",
                                "{\"model\": \"expertmesh-tiny\", \"prompt\": \"a\"} trailing"}) {
    ApiError e = ErrorOf(Completion(body));
    EXPECT_EQ(e.http_status, 400) << body;
    EXPECT_EQ(e.type, "invalid_request_error") << body;
  }
}

TEST(OpenAiParse, InvalidUtf8IsRejected) {
  std::string body = "{\"model\": \"expertmesh-tiny\", \"prompt\": \"a\xff\xfe\"}";
  ApiError e = ErrorOf(Completion(body));
  EXPECT_EQ(e.http_status, 400);
  EXPECT_NE(e.message.find("UTF-8"), std::string::npos) << e.message;
  // A lone surrogate written as a JSON escape is not text either.
  ApiError surrogate = ErrorOf(Completion(R"({"model": "expertmesh-tiny", "prompt": "a\ud800b"})"));
  EXPECT_EQ(surrogate.http_status, 400);
}

TEST(OpenAiParse, Utf8Validator) {
  EXPECT_TRUE(IsValidUtf8("plain ascii"));
  EXPECT_TRUE(IsValidUtf8("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"));  // é € 😀
  EXPECT_FALSE(IsValidUtf8("\xc3"));                                 // truncated
  EXPECT_FALSE(IsValidUtf8("\xc0\xaf"));                             // overlong '/'
  EXPECT_FALSE(IsValidUtf8("\xed\xa0\x80"));                         // surrogate D800
  EXPECT_FALSE(IsValidUtf8("\xf4\x90\x80\x80"));                     // > U+10FFFF
  EXPECT_FALSE(IsValidUtf8("\x80"));                                 // stray continuation
}

TEST(OpenAiParse, WrongTypesNameTheParam) {
  struct Case {
    std::string body;
    std::string param;
  };
  const std::vector<Case> cases = {
      {R"({"model": 5, "prompt": "a"})", "model"},
      {R"({"model": "expertmesh-tiny", "prompt": "a", "temperature": "hot"})", "temperature"},
      {R"({"model": "expertmesh-tiny", "prompt": "a", "max_tokens": 2.5})", "max_tokens"},
      {R"({"model": "expertmesh-tiny", "prompt": "a", "max_tokens": "7"})", "max_tokens"},
      {R"({"model": "expertmesh-tiny", "prompt": "a", "stream": "yes"})", "stream"},
      {R"({"model": "expertmesh-tiny", "prompt": "a", "stop": 5})", "stop"},
      {R"({"model": "expertmesh-tiny", "prompt": "a", "stop": ["a", 1]})", "stop"},
      {R"({"model": "expertmesh-tiny", "prompt": "a", "seed": "x"})", "seed"},
      {R"({"model": "expertmesh-tiny", "prompt": "a", "stop_token_ids": [1.5]})", "stop_token_ids"},
      {R"({"model": "expertmesh-tiny", "prompt": "a", "logprobs": true})", "logprobs"},
      {R"({"model": "expertmesh-tiny", "prompt": "a", "stream": true, "stream_options": 1})",
       "stream_options"},
  };
  for (const Case& c : cases) {
    ApiError e = ErrorOf(Completion(c.body));
    EXPECT_EQ(e.http_status, 400) << c.body;
    EXPECT_EQ(e.param, c.param) << c.body;
  }
}

TEST(OpenAiParse, OutOfRangeValues) {
  struct Case {
    std::string extra;
    std::string param;
  };
  const std::vector<Case> cases = {
      {R"("temperature": 2.5)", "temperature"},
      {R"("temperature": -0.1)", "temperature"},
      {R"("top_p": 0)", "top_p"},
      {R"("top_p": 1.01)", "top_p"},
      {R"("top_k": -2)", "top_k"},
      {R"("max_tokens": 0)", "max_tokens"},
      {R"("max_tokens": 512)", "max_tokens"},
      {R"("presence_penalty": 2.5)", "presence_penalty"},
      {R"("frequency_penalty": -3)", "frequency_penalty"},
      {R"("logprobs": 21)", "logprobs"},
      {R"("n": 0)", "n"},
      {R"("n": 17)", "n"},
      {R"("best_of": 17)", "best_of"},
      {R"("n": 3, "best_of": 2)", "best_of"},
      {R"("best_of": 2, "stream": true)", "best_of"},
      {R"("response_format": {"type": "json_schema", "json_schema": {}})", "response_format"},
      {R"("response_format": {"type": "xml"})", "response_format"},
      {R"("response_format": "json_object")", "response_format"},
      {R"("response_format": {"type": "text", "strict": true})", "response_format"},
      {R"("echo": true)", "echo"},
      {R"("stop": [""])", "stop"},
      {R"("stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"])", "stop"},
      {R"("logit_bias": {"5": 10})", "logit_bias"},
      {R"("stream_options": {"include_usage": true})", "stream_options"},
  };
  for (const Case& c : cases) {
    std::string body = R"({"model": "expertmesh-tiny", "prompt": "a", )" + c.extra + "}";
    ApiError e = ErrorOf(Completion(body));
    EXPECT_EQ(e.http_status, 400) << body;
    EXPECT_EQ(e.type, "invalid_request_error") << body;
    EXPECT_EQ(e.param, c.param) << body;
  }
}

TEST(OpenAiParse, UnknownFieldsAndModels) {
  ApiError unknown =
      ErrorOf(Completion(R"({"model": "expertmesh-tiny", "prompt": "a", "temprature": 1})"));
  EXPECT_EQ(unknown.http_status, 400);
  EXPECT_EQ(unknown.param, "temprature");
  EXPECT_NE(unknown.message.find("Unrecognized request argument"), std::string::npos);

  ApiError model = ErrorOf(Completion(R"({"model": "gpt-4", "prompt": "a"})"));
  EXPECT_EQ(model.http_status, 404);
  EXPECT_EQ(model.code, "model_not_found");
  EXPECT_EQ(model.param, "model");
  ApiError no_model = ErrorOf(Completion(R"({"prompt": "a"})"));
  EXPECT_EQ(no_model.http_status, 400);
  EXPECT_EQ(no_model.param, "model");
}

TEST(OpenAiParse, NullMeansDefault) {
  auto r = Completion(R"({"model": "expertmesh-tiny", "prompt": "a", "temperature": null,
    "max_tokens": null, "stop": null, "seed": null})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FLOAT_EQ(r->sampling.temperature, 0.6f);
  EXPECT_FALSE(r->max_tokens.has_value());
  EXPECT_TRUE(r->stop.empty());
}

TEST(OpenAiParse, ChatMessagesAreNormalized) {
  auto r = Chat(R"({"model": "expertmesh-tiny", "max_completion_tokens": 9,
    "logprobs": true, "top_logprobs": 2, "messages": [
      {"role": "developer", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                   {"type": "text", "text": "there"}]},
      {"role": "assistant", "content": "Hi."},
      {"role": "user", "content": "Again", "name": "bob"}]})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->endpoint, Endpoint::kChatCompletions);
  EXPECT_EQ(*r->max_tokens, 9u);
  EXPECT_TRUE(r->sampling.logprobs);
  EXPECT_EQ(r->sampling.top_logprobs, 2u);
  const boost::json::array& m = *r->messages;
  ASSERT_EQ(m.size(), 4u);
  EXPECT_EQ(m[0].at("role").as_string(), "system");
  EXPECT_EQ(m[1].at("content").as_string(), "Hello\nthere");
  EXPECT_EQ(m[3].at("name").as_string(), "bob");
}

TEST(OpenAiParse, ChatErrors) {
  struct Case {
    std::string body;
    std::string param;
  };
  const std::vector<Case> cases = {
      {R"({"model": "expertmesh-tiny", "messages": []})", "messages"},
      {R"({"model": "expertmesh-tiny"})", "messages"},
      {R"({"model": "expertmesh-tiny", "messages": "hi"})", "messages"},
      {R"({"model": "expertmesh-tiny", "messages": [5]})", "messages[0]"},
      {R"({"model": "expertmesh-tiny", "messages": [{"content": "x"}]})", "messages[0].role"},
      {R"({"model": "expertmesh-tiny", "messages": [{"role": "robot", "content": "x"}]})",
       "messages[0].role"},
      {R"({"model": "expertmesh-tiny", "messages": [{"role": "user"}]})", "messages[0].content"},
      {R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content": 5}]})",
       "messages[0].content"},
      {R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content":
         [{"type": "image_url", "image_url": {"url": "x"}}]}]})",
       "messages[0].content[0]"},
      {R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content": "x",
         "color": "red"}]})",
       "messages[0]"},
      {R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content": "x"}],
         "top_logprobs": 2})",
       "top_logprobs"},
      {R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content": "x"}],
         "logprobs": true, "top_logprobs": 25})",
       "top_logprobs"},
      {R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content": "x"}],
         "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "any"})",
       "tool_choice"},
      {R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content": "x"}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})",
       "response_format"},
      {R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content": "x"}],
         "best_of": 2})",
       "best_of"},
      {R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content": "x"}],
         "prompt": "x"})",
       "prompt"},
      {R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content": "x"}],
         "max_completion_tokens": 0})",
       "max_completion_tokens"},
  };
  for (const Case& c : cases) {
    ApiError e = ErrorOf(Chat(c.body));
    EXPECT_EQ(e.http_status, 400) << c.body;
    EXPECT_EQ(e.param, c.param) << c.body;
  }
}

TEST(OpenAiParse, ChatToolsAndReasoningFields) {
  ModelCard r1 = Card();
  r1.reasoning_parser = true;
  auto r = ParseChatCompletionRequest(R"({"model": "expertmesh-tiny", "include_reasoning": false,
    "parallel_tool_calls": false, "tool_choice": "auto",
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
    "messages": [{"role": "user", "content": "Weather?"},
      {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]})",
                                      r1, RequestLimits{});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->chat.reasoning);
  EXPECT_FALSE(r->chat.include_reasoning);
  EXPECT_TRUE(r->chat.tool_calls);
  EXPECT_FALSE(r->chat.parallel_tool_calls);
  ASSERT_TRUE(r->chat.tools.has_value());
  // Empty content beside tool calls is null, as DeepSeek's templates expect.
  EXPECT_TRUE((*r->messages)[1].at("content").is_null());
  EXPECT_EQ((*r->messages)[1].at("tool_calls").at(0).at("function").at("name"), "get_weather");
  // Without the parser (V3's template) include_reasoning changes nothing.
  auto v3 = Chat(R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content": "x"}]})");
  ASSERT_TRUE(v3.ok());
  EXPECT_FALSE(v3->chat.reasoning);
  EXPECT_FALSE(v3->chat.tool_calls);
  // tool_calls on a user message, and malformed calls, are 400 naming the message.
  ApiError e = ErrorOf(Chat(R"({"model": "expertmesh-tiny", "messages": [{"role": "user",
    "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]})"));
  EXPECT_EQ(e.http_status, 400);
  EXPECT_EQ(e.param, "messages[0].tool_calls");
  e = ErrorOf(Chat(R"({"model": "expertmesh-tiny", "messages": [{"role": "assistant",
    "content": null, "tool_calls": [{"function": {"arguments": "{}"}}]}]})"));
  EXPECT_EQ(e.param, "messages[0].tool_calls[0]");
}

TEST(OpenAiParse, PriorityIsAnIntegerInRange) {
  auto none = Completion(R"({"model": "expertmesh-tiny", "prompt": "Hi"})");
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->priority, 0);
  auto low = Completion(R"({"model": "expertmesh-tiny", "prompt": "Hi", "priority": -7})");
  ASSERT_TRUE(low.ok()) << low.status();
  EXPECT_EQ(low->priority, -7);
  auto chat = Chat(R"({"model": "expertmesh-tiny", "priority": 1000000,
    "messages": [{"role": "user", "content": "Hi"}]})");
  ASSERT_TRUE(chat.ok()) << chat.status();
  EXPECT_EQ(chat->priority, 1000000);
  auto null = Completion(R"({"model": "expertmesh-tiny", "prompt": "Hi", "priority": null})");
  ASSERT_TRUE(null.ok());
  EXPECT_EQ(null->priority, 0);
  for (const char* bad : {"1000001", "-1000001", "4294967296", "18446744073709551615", "1.5",
                          "\"high\"", "true", "[1]"}) {
    ApiError e = ErrorOf(Completion(
        std::string(R"({"model": "expertmesh-tiny", "prompt": "Hi", "priority": )") + bad + "}"));
    EXPECT_EQ(e.http_status, 400) << bad;
    EXPECT_EQ(e.type, "invalid_request_error") << bad;
    EXPECT_EQ(e.param, "priority") << bad;
    ApiError c = ErrorOf(Chat(std::string(R"({"model": "expertmesh-tiny", "messages":
      [{"role": "user", "content": "Hi"}], "priority": )") +
                              bad + "}"));
    EXPECT_EQ(c.http_status, 400) << bad;
    EXPECT_EQ(c.param, "priority") << bad;
  }
  ApiError e =
      ErrorOf(Completion(R"({"model": "expertmesh-tiny", "prompt": "Hi", "priority": 2000000})"));
  EXPECT_NE(e.message.find("[-1000000, 1000000]"), std::string::npos) << e.message;
}

TEST(ApiErrorJson, OpenAiShape) {
  ApiError e = ToApiError(UnknownModel("nope"));
  boost::json::value v = boost::json::parse(ApiErrorJson(e));
  const boost::json::object& err = v.at("error").as_object();
  EXPECT_EQ(err.at("type").as_string(), "invalid_request_error");
  EXPECT_EQ(err.at("param").as_string(), "model");
  EXPECT_EQ(err.at("code").as_string(), "model_not_found");
  EXPECT_NE(err.at("message").as_string().find("nope"), std::string::npos);

  ApiError busy = ToApiError(absl::ResourceExhaustedError("full"));
  EXPECT_EQ(busy.http_status, 429);
  EXPECT_GT(busy.retry_after_s, 0);
  boost::json::value b = boost::json::parse(ApiErrorJson(busy));
  EXPECT_TRUE(b.at("error").at("param").is_null());
  EXPECT_EQ(ToApiError(absl::UnavailableError("x")).http_status, 503);
  EXPECT_EQ(ToApiError(absl::UnauthenticatedError("x")).http_status, 401);
  EXPECT_EQ(ToApiError(absl::InternalError("x")).http_status, 500);
}

}  // namespace
}  // namespace expertmesh::gateway

namespace expertmesh::gateway {
namespace {

TEST(OpenAiParse, ChoicesAndResponseFormat) {
  absl::StatusOr<GenerationRequest> r =
      Completion(R"({"model": "expertmesh-tiny", "prompt": "a"})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->n, 1u);
  EXPECT_EQ(r->best_of, 1u);
  EXPECT_FALSE(r->json_object);
  r = Completion(R"({"model": "expertmesh-tiny", "prompt": "a", "n": 16, "stream": true})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->n, 16u);
  EXPECT_EQ(r->best_of, 16u);  // best_of defaults to n
  r = Completion(R"({"model": "expertmesh-tiny", "prompt": "a", "n": 2, "best_of": 5,
                     "response_format": {"type": "json_object"}})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->n, 2u);
  EXPECT_EQ(r->best_of, 5u);
  EXPECT_TRUE(r->json_object);
  // best_of = n streams (nothing to rank).
  EXPECT_TRUE(Completion(R"({"model": "expertmesh-tiny", "prompt": "a", "n": 3, "best_of": 3,
                             "stream": true})")
                  .ok());
  r = Chat(R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content": "x"}],
               "n": 4, "response_format": {"type": "json_object"}})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->n, 4u);
  EXPECT_TRUE(r->json_object);
  r = Chat(R"({"model": "expertmesh-tiny", "messages": [{"role": "user", "content": "x"}],
               "response_format": {"type": "text"}})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->json_object);
  // The bound is the limits' (a deployment may lower it).
  RequestLimits limits;
  limits.max_choices = 2;
  ApiError e = ErrorOf(ParseCompletionRequest(
      R"({"model": "expertmesh-tiny", "prompt": "a", "n": 3})", Card(), limits));
  EXPECT_EQ(e.http_status, 400);
  EXPECT_EQ(e.param, "n");
}

}  // namespace
}  // namespace expertmesh::gateway
