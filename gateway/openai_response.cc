#include "gateway/openai_response.h"

#include <boost/json.hpp>

#include "gateway/strings.h"

namespace expertmesh::gateway {
namespace json = boost::json;
namespace {

json::array Bytes(const std::string& s) {
  json::array out;
  for (unsigned char c : s) out.push_back(c);
  return out;
}

}  // namespace

OpenAiResponder::OpenAiResponder(const GenerationRequest& request, std::string id, int64_t created)
    : endpoint_(request.endpoint),
      id_(std::move(id)),
      model_(request.model),
      created_(created),
      logprobs_(request.sampling.logprobs),
      chat_(request.endpoint == Endpoint::kChatCompletions ? request.chat : ChatOutputOptions{}) {
  // A call opened in the prompt (forced tool_choice) starts the output inside the call, past
  // any reasoning.
  if (chat_.reasoning && !chat_.forced_call) reasoning_.emplace();
  if (chat_.tool_calls) tools_.emplace(chat_.forced_call, chat_.forced_name);
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

OpenAiResponder::Pieces OpenAiResponder::Split(std::string_view text, bool final) {
  Pieces p;
  std::string content;
  if (reasoning_.has_value()) {
    ReasoningParser::Split s = reasoning_->Feed(text);
    if (final) {
      ReasoningParser::Split rest = reasoning_->Finish();
      s.reasoning += rest.reasoning;
      s.content += rest.content;
    }
    if (chat_.include_reasoning) p.reasoning = std::move(s.reasoning);
    content = std::move(s.content);
  } else {
    content = std::string(text);
  }
  if (!tools_.has_value()) {
    p.content = std::move(content);
    return p;
  }
  ToolCallParser::Output o = tools_->Feed(content);
  if (final) {
    ToolCallParser::Output rest = tools_->Finish();
    o.content += rest.content;
    for (ToolCallEvent& e : rest.calls) o.calls.push_back(std::move(e));
  }
  p.content = std::move(o.content);
  for (ToolCallEvent& e : o.calls) {
    if (!chat_.parallel_tool_calls && e.index > 0) continue;  // one call at most
    if (!e.start && !p.calls.empty() && p.calls.back().index == e.index) {
      p.calls.back().arguments += e.arguments;
    } else {
      p.calls.push_back(std::move(e));
    }
  }
  return p;
}

std::string OpenAiResponder::CallId(int index) const {
  const size_t dash = id_.find('-');
  return Cat("call_", dash == std::string::npos ? id_ : id_.substr(dash + 1), "_", index);
}

std::string OpenAiResponder::FinishReason(const Outcome& outcome) const {
  // As OpenAI: a call the model chose (auto, required) ends with "tool_calls"; a call forced
  // by name ends with "stop".
  if (outcome.finish_reason == "stop" && tool_calls_ > 0 && chat_.forced_name.empty()) {
    return "tool_calls";
  }
  return outcome.finish_reason;
}

json::object OpenAiResponder::DeltaJson(Pieces p, bool always_content) {
  json::object d;
  if (!sent_role_) {
    d["role"] = "assistant";
    sent_role_ = true;
  }
  if (!p.reasoning.empty()) d["reasoning_content"] = std::move(p.reasoning);
  if (!p.content.empty() || (always_content && p.reasoning.empty() && p.calls.empty())) {
    d["content"] = std::move(p.content);
  }
  if (!p.calls.empty()) {
    json::array calls;
    for (ToolCallEvent& e : p.calls) {
      json::object c;
      c["index"] = e.index;
      json::object fn;
      if (e.start) {
        ++tool_calls_;
        c["id"] = CallId(e.index);
        c["type"] = e.type;
        fn["name"] = e.name;
      }
      fn["arguments"] = std::move(e.arguments);
      c["function"] = std::move(fn);
      calls.push_back(std::move(c));
    }
    d["tool_calls"] = std::move(calls);
  }
  return d;
}

std::string OpenAiResponder::Chunk(const Delta& delta, bool include_usage_field) {
  json::object o = Base();
  json::object choice;
  choice["index"] = 0;
  if (endpoint_ == Endpoint::kChatCompletions) {
    o["object"] = "chat.completion.chunk";
    choice["delta"] = DeltaJson(Split(delta.text, false), true);
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
    // What the parsers held back (a partial marker that never completed) goes out here.
    choice["delta"] = DeltaJson(Split("", true), !sent_role_);
  } else {
    choice["text"] = "";
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = FinishReason(outcome);
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
  if (endpoint_ == Endpoint::kChatCompletions) {
    Gather(Split(delta.text, false));
  } else {
    text_ += delta.text;
  }
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

void OpenAiResponder::Gather(Pieces p) {
  reasoning_text_ += p.reasoning;
  text_ += p.content;
  for (ToolCallEvent& e : p.calls) {
    if (e.start) {
      ++tool_calls_;
      calls_.push_back(
          json::object{{"id", CallId(e.index)},
                       {"type", e.type},
                       {"function", json::object{{"name", e.name}, {"arguments", ""}}}});
    }
    if (e.index < 0 || static_cast<size_t>(e.index) >= calls_.size()) continue;
    json::string& args =
        calls_[e.index].as_object()["function"].as_object()["arguments"].as_string();
    args.append(e.arguments);
  }
}

std::string OpenAiResponder::Full(const Outcome& outcome) {
  json::object o = Base();
  json::object choice;
  choice["index"] = 0;
  if (endpoint_ == Endpoint::kChatCompletions) {
    Gather(Split("", true));
    json::object message{{"role", "assistant"}};
    // As OpenAI: null content beside tool calls when the model wrote nothing else.
    message["content"] =
        text_.empty() && !calls_.empty() ? json::value(nullptr) : json::value(text_);
    if (chat_.reasoning && chat_.include_reasoning) {
      message["reasoning_content"] =
          reasoning_text_.empty() ? json::value(nullptr) : json::value(reasoning_text_);
    }
    if (!calls_.empty()) message["tool_calls"] = calls_;
    choice["message"] = std::move(message);
    choice["logprobs"] =
        logprobs_ ? json::value(json::object{{"content", collected_logprobs_}}) : nullptr;
  } else {
    choice["text"] = text_;
    choice["logprobs"] = logprobs_ ? json::value(completion_logprobs_) : nullptr;
  }
  choice["finish_reason"] = FinishReason(outcome);
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
