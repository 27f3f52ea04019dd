#include "gateway/openai_response.h"

#include <algorithm>

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
      chat_(request.endpoint == Endpoint::kChatCompletions ? request.chat : ChatOutputOptions{}),
      n_(std::max<uint32_t>(1, request.n)) {
  choices_.reserve(n_);
  for (uint32_t i = 0; i < n_; ++i) At(i);
}

OpenAiResponder::Choice& OpenAiResponder::At(uint32_t index) {
  while (choices_.size() <= index) {
    Choice& c = choices_.emplace_back();
    // A call opened in the prompt (forced tool_choice) starts the output inside the call,
    // past any reasoning.
    if (chat_.reasoning && !chat_.forced_call) c.reasoning.emplace();
    if (chat_.tool_calls) c.tools.emplace(chat_.forced_call, chat_.forced_name);
    c.completion_logprobs["tokens"] = json::array();
    c.completion_logprobs["token_logprobs"] = json::array();
    c.completion_logprobs["top_logprobs"] = json::array();
    c.completion_logprobs["text_offset"] = json::array();
  }
  return choices_[index];
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
json::value OpenAiResponder::LogprobsJson(Choice& c, const Delta& delta) {
  if (!logprobs_) return nullptr;
  if (endpoint_ == Endpoint::kChatCompletions) {
    json::array content;
    for (const TokenLogprob& lp : delta.logprobs) {
      json::object e;
      e["token"] = lp.token;
      e["logprob"] = lp.logprob;
      e["bytes"] = Bytes(lp.token);
      json::array top;
      for (const TopCandidate& t : lp.top) {
        top.push_back(
            json::object{{"token", t.token}, {"logprob", t.logprob}, {"bytes", Bytes(t.token)}});
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
    for (const TopCandidate& t : lp.top) top[t.token] = t.logprob;
    top_logprobs.push_back(std::move(top));
    offsets.push_back(c.text_offset);
    c.text_offset += lp.token.size();
  }
  return json::object{{"tokens", std::move(tokens)},
                      {"token_logprobs", std::move(token_logprobs)},
                      {"top_logprobs", std::move(top_logprobs)},
                      {"text_offset", std::move(offsets)}};
}

OpenAiResponder::Pieces OpenAiResponder::Split(Choice& c, std::string_view text, bool final) {
  Pieces p;
  std::string content;
  if (c.reasoning.has_value()) {
    ReasoningParser::Split s = c.reasoning->Feed(text);
    if (final) {
      ReasoningParser::Split rest = c.reasoning->Finish();
      s.reasoning += rest.reasoning;
      s.content += rest.content;
    }
    if (chat_.include_reasoning) p.reasoning = std::move(s.reasoning);
    content = std::move(s.content);
  } else {
    content = std::string(text);
  }
  if (!c.tools.has_value()) {
    p.content = std::move(content);
    return p;
  }
  ToolCallParser::Output o = c.tools->Feed(content);
  if (final) {
    ToolCallParser::Output rest = c.tools->Finish();
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

std::string OpenAiResponder::CallId(uint32_t choice, int index) const {
  const size_t dash = id_.find('-');
  const std::string base = dash == std::string::npos ? id_ : id_.substr(dash + 1);
  return choice == 0 ? Cat("call_", base, "_", index) : Cat("call_", base, "_", choice, "_", index);
}

std::string OpenAiResponder::FinishReason(const Choice& c, const std::string& reason) const {
  // As OpenAI: a call the model chose (auto, required) ends with "tool_calls"; a call forced
  // by name ends with "stop".
  if (reason == "stop" && c.tool_calls > 0 && chat_.forced_name.empty()) return "tool_calls";
  return reason;
}

json::object OpenAiResponder::DeltaJson(Choice& c, Pieces p, bool always_content) {
  json::object d;
  if (!c.sent_role) {
    d["role"] = "assistant";
    c.sent_role = true;
  }
  if (!p.reasoning.empty()) d["reasoning_content"] = std::move(p.reasoning);
  if (!p.content.empty() || (always_content && p.reasoning.empty() && p.calls.empty())) {
    d["content"] = std::move(p.content);
  }
  if (!p.calls.empty()) {
    const auto choice = static_cast<uint32_t>(&c - choices_.data());
    json::array calls;
    for (ToolCallEvent& e : p.calls) {
      json::object call;
      call["index"] = e.index;
      json::object fn;
      if (e.start) {
        ++c.tool_calls;
        call["id"] = CallId(choice, e.index);
        call["type"] = e.type;
        fn["name"] = e.name;
      }
      fn["arguments"] = std::move(e.arguments);
      call["function"] = std::move(fn);
      calls.push_back(std::move(call));
    }
    d["tool_calls"] = std::move(calls);
  }
  return d;
}

std::string OpenAiResponder::Chunk(const Delta& delta, bool include_usage_field) {
  if (delta.finish_reason.has_value()) {
    return EndChunk(delta.index, *delta.finish_reason, include_usage_field);
  }
  Choice& c = At(delta.index);
  json::object o = Base();
  json::object choice;
  choice["index"] = delta.index;
  if (endpoint_ == Endpoint::kChatCompletions) {
    o["object"] = "chat.completion.chunk";
    choice["delta"] = DeltaJson(c, Split(c, delta.text, false), true);
  } else {
    choice["text"] = delta.text;
  }
  choice["logprobs"] = LogprobsJson(c, delta);
  choice["finish_reason"] = nullptr;
  o["choices"] = json::array{std::move(choice)};
  if (include_usage_field) o["usage"] = nullptr;
  return json::serialize(o);
}

std::string OpenAiResponder::EndChunk(uint32_t index, const std::string& reason,
                                      bool include_usage_field) {
  Choice& c = At(index);
  json::object o = Base();
  json::object choice;
  choice["index"] = index;
  if (endpoint_ == Endpoint::kChatCompletions) {
    o["object"] = "chat.completion.chunk";
    // What the parsers held back (a partial marker that never completed) goes out here.
    choice["delta"] = DeltaJson(c, Split(c, "", true), !c.sent_role);
  } else {
    choice["text"] = "";
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = FinishReason(c, reason);
  o["choices"] = json::array{std::move(choice)};
  if (include_usage_field) o["usage"] = nullptr;
  return json::serialize(o);
}

std::string OpenAiResponder::FinishChunk(const Outcome& outcome, bool include_usage_field) {
  return EndChunk(outcome.index, outcome.finish_reason, include_usage_field);
}

std::string OpenAiResponder::UsageChunk(const Usage& usage) const {
  json::object o = Base();
  if (endpoint_ == Endpoint::kChatCompletions) o["object"] = "chat.completion.chunk";
  o["choices"] = json::array();
  o["usage"] = UsageJson(usage);
  return json::serialize(o);
}

void OpenAiResponder::Collect(const Delta& delta) {
  Choice& c = At(delta.index);
  if (delta.finish_reason.has_value()) {
    c.finish_reason = delta.finish_reason;
    return;
  }
  if (endpoint_ == Endpoint::kChatCompletions) {
    Gather(c, delta.index, Split(c, delta.text, false));
  } else {
    c.text += delta.text;
  }
  if (!logprobs_) return;
  json::value v = LogprobsJson(c, delta);
  if (endpoint_ == Endpoint::kChatCompletions) {
    for (json::value& e : v.at("content").as_array()) c.collected_logprobs.push_back(e);
  } else {
    for (const char* key : {"tokens", "token_logprobs", "top_logprobs", "text_offset"}) {
      for (json::value& e : v.at(key).as_array()) {
        c.completion_logprobs[key].as_array().push_back(e);
      }
    }
  }
}

void OpenAiResponder::Gather(Choice& c, uint32_t index, Pieces p) {
  c.reasoning_text += p.reasoning;
  c.text += p.content;
  for (ToolCallEvent& e : p.calls) {
    if (e.start) {
      ++c.tool_calls;
      c.calls.push_back(
          json::object{{"id", CallId(index, e.index)},
                       {"type", e.type},
                       {"function", json::object{{"name", e.name}, {"arguments", ""}}}});
    }
    if (e.index < 0 || static_cast<size_t>(e.index) >= c.calls.size()) continue;
    json::string& args =
        c.calls[e.index].as_object()["function"].as_object()["arguments"].as_string();
    args.append(e.arguments);
  }
}

json::object OpenAiResponder::ChoiceJson(uint32_t index) {
  Choice& c = At(index);
  json::object choice;
  choice["index"] = index;
  if (endpoint_ == Endpoint::kChatCompletions) {
    Gather(c, index, Split(c, "", true));
    json::object message{{"role", "assistant"}};
    // As OpenAI: null content beside tool calls when the model wrote nothing else.
    message["content"] =
        c.text.empty() && !c.calls.empty() ? json::value(nullptr) : json::value(c.text);
    if (chat_.reasoning && chat_.include_reasoning) {
      message["reasoning_content"] =
          c.reasoning_text.empty() ? json::value(nullptr) : json::value(c.reasoning_text);
    }
    if (!c.calls.empty()) message["tool_calls"] = c.calls;
    choice["message"] = std::move(message);
    choice["logprobs"] =
        logprobs_ ? json::value(json::object{{"content", c.collected_logprobs}}) : nullptr;
  } else {
    choice["text"] = c.text;
    choice["logprobs"] = logprobs_ ? json::value(c.completion_logprobs) : nullptr;
  }
  choice["finish_reason"] = FinishReason(c, c.finish_reason.value_or("stop"));
  return choice;
}

std::string OpenAiResponder::Full(const Outcome& outcome) {
  At(outcome.index).finish_reason = outcome.finish_reason;
  json::object o = Base();
  json::array choices;
  for (uint32_t i = 0; i < choices_.size(); ++i) choices.push_back(ChoiceJson(i));
  o["choices"] = std::move(choices);
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
