#include "gateway/openai_response.h"

#include <boost/json.hpp>

namespace expertmesh::gateway {
namespace json = boost::json;
namespace {

json::array Bytes(const std::string& s) {
  json::array out;
  for (unsigned char c : s) out.push_back(c);
  return out;
}

}  // namespace

OpenAiResponder::OpenAiResponder(Endpoint endpoint, std::string id, std::string model,
                                 int64_t created, bool logprobs)
    : endpoint_(endpoint),
      id_(std::move(id)),
      model_(std::move(model)),
      created_(created),
      logprobs_(logprobs) {
  completion_logprobs_["tokens"] = json::array();
  completion_logprobs_["token_logprobs"] = json::array();
  completion_logprobs_["top_logprobs"] = json::array();
  completion_logprobs_["text_offset"] = json::array();
}

json::object OpenAiResponder::UsageJson(const Usage& usage) {
  json::object u;
  u["prompt_tokens"] = usage.prompt_tokens;
  u["completion_tokens"] = usage.completion_tokens;
  u["total_tokens"] = usage.prompt_tokens + usage.completion_tokens;
  return u;
}

json::object OpenAiResponder::Base() const {
  json::object o;
  o["id"] = id_;
  const bool chat = endpoint_ == Endpoint::kChatCompletions;
  o["object"] = chat ? "chat.completion" : "text_completion";
  o["created"] = created_;
  o["model"] = model_;
  return o;
}

// Chat: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}.
// Completions: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}.
json::value OpenAiResponder::LogprobsJson(const Delta& delta) {
  if (!logprobs_) return nullptr;
  if (endpoint_ == Endpoint::kChatCompletions) {
    json::array content;
    for (const TokenLogprob& lp : delta.logprobs) {
      json::object e;
      e["token"] = lp.token;
      e["logprob"] = lp.logprob;
      e["bytes"] = Bytes(lp.token);
      json::array top;
      for (const TopCandidate& c : lp.top) {
        top.push_back(
            json::object{{"token", c.token}, {"logprob", c.logprob}, {"bytes", Bytes(c.token)}});
      }
      e["top_logprobs"] = std::move(top);
      content.push_back(std::move(e));
    }
    return json::object{{"content", std::move(content)}};
  }
  json::array tokens, token_logprobs, top_logprobs, offsets;
  for (const TokenLogprob& lp : delta.logprobs) {
    tokens.push_back(json::string(lp.token));
    token_logprobs.push_back(lp.logprob);
    json::object top;
    for (const TopCandidate& c : lp.top) top[c.token] = c.logprob;
    top_logprobs.push_back(std::move(top));
    offsets.push_back(text_offset_);
    text_offset_ += lp.token.size();
  }
  return json::object{{"tokens", std::move(tokens)},
                      {"token_logprobs", std::move(token_logprobs)},
                      {"top_logprobs", std::move(top_logprobs)},
                      {"text_offset", std::move(offsets)}};
}

std::string OpenAiResponder::Chunk(const Delta& delta, bool include_usage_field) {
  json::object o = Base();
  json::object choice;
  choice["index"] = 0;
  if (endpoint_ == Endpoint::kChatCompletions) {
    o["object"] = "chat.completion.chunk";
    json::object d;
    if (!sent_role_) {
      d["role"] = "assistant";
      sent_role_ = true;
    }
    d["content"] = delta.text;
    choice["delta"] = std::move(d);
  } else {
    choice["text"] = delta.text;
  }
  choice["logprobs"] = LogprobsJson(delta);
  choice["finish_reason"] = nullptr;
  o["choices"] = json::array{std::move(choice)};
  if (include_usage_field) o["usage"] = nullptr;
  return json::serialize(o);
}

std::string OpenAiResponder::FinishChunk(const Outcome& outcome, bool include_usage_field) {
  json::object o = Base();
  json::object choice;
  choice["index"] = 0;
  if (endpoint_ == Endpoint::kChatCompletions) {
    o["object"] = "chat.completion.chunk";
    json::object d;
    if (!sent_role_) {
      d["role"] = "assistant";
      d["content"] = "";
      sent_role_ = true;
    }
    choice["delta"] = std::move(d);
  } else {
    choice["text"] = "";
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = outcome.finish_reason;
  o["choices"] = json::array{std::move(choice)};
  if (include_usage_field) o["usage"] = nullptr;
  return json::serialize(o);
}

std::string OpenAiResponder::UsageChunk(const Usage& usage) const {
  json::object o = Base();
  if (endpoint_ == Endpoint::kChatCompletions) o["object"] = "chat.completion.chunk";
  o["choices"] = json::array();
  o["usage"] = UsageJson(usage);
  return json::serialize(o);
}

void OpenAiResponder::Collect(const Delta& delta) {
  text_ += delta.text;
  if (!logprobs_) return;
  json::value v = LogprobsJson(delta);
  if (endpoint_ == Endpoint::kChatCompletions) {
    for (json::value& e : v.at("content").as_array()) collected_logprobs_.push_back(e);
  } else {
    for (const char* key : {"tokens", "token_logprobs", "top_logprobs", "text_offset"}) {
      for (json::value& e : v.at(key).as_array()) completion_logprobs_[key].as_array().push_back(e);
    }
  }
}

std::string OpenAiResponder::Full(const Outcome& outcome) const {
  json::object o = Base();
  json::object choice;
  choice["index"] = 0;
  if (endpoint_ == Endpoint::kChatCompletions) {
    choice["message"] = json::object{{"role", "assistant"}, {"content", text_}};
    choice["logprobs"] =
        logprobs_ ? json::value(json::object{{"content", collected_logprobs_}}) : nullptr;
  } else {
    choice["text"] = text_;
    choice["logprobs"] = logprobs_ ? json::value(completion_logprobs_) : nullptr;
  }
  choice["finish_reason"] = outcome.finish_reason;
  o["choices"] = json::array{std::move(choice)};
  o["usage"] = UsageJson(outcome.usage);
  return json::serialize(o);
}

std::string SseEvent(std::string_view payload) {
  std::string out;
  out.reserve(payload.size() + 8);
  out += "data: ";
  out += payload;
  out += "\n\n";
  return out;
}

}  // namespace expertmesh::gateway
