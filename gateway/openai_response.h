// OpenAI response bodies for /v1/completions and /v1/chat/completions: whole responses and
// streamed chunks (SSE `data:` payloads), logprobs in each endpoint's own shape, usage.
// Pure formatting of what generation.h produces; no I/O. Chat output is split as the request
// asks (request.chat): R1's reasoning into reasoning_content (reasoning_parser.h), V3's tool
// calls into tool_calls with finish_reason "tool_calls" (tool_calls.h), in whole messages and
// in streamed deltas alike.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <boost/json/object.hpp>

#include "gateway/generation.h"
#include "gateway/reasoning_parser.h"
#include "gateway/request.h"
#include "gateway/tool_calls.h"

namespace expertmesh::gateway {

class OpenAiResponder {
 public:
  // `created`: Unix seconds for the "created" field; `id` e.g. "cmpl-gw-1-7". The request
  // gives the endpoint, model, logprobs and (chat) how to split the output (request.chat).
  OpenAiResponder(const GenerationRequest& request, std::string id, int64_t created);

  // Streaming: the chunk for one delta (chat: the first one also carries the role); a delta
  // with finish_reason (n > 1) gives its choice's final chunk.
  std::string Chunk(const Delta& delta, bool include_usage_field);
  // Streaming: the chunk carrying finish_reason (and any text the parsers held back) of the
  // choice that ended last (outcome.index).
  std::string FinishChunk(const Outcome& outcome, bool include_usage_field);
  // Streaming: the usage chunk of stream_options.include_usage (empty choices).
  std::string UsageChunk(const Usage& usage) const;
  // Non-streaming: the whole response from the collected deltas, request.n choices.
  void Collect(const Delta& delta);
  std::string Full(const Outcome& outcome);

  static boost::json::object UsageJson(const Usage& usage);

 private:
  // Chat: the next generated text split into reasoning, content and tool-call changes;
  // `final` flushes what the parsers held back.
  struct Pieces {
    std::string reasoning;
    std::string content;
    std::vector<ToolCallEvent> calls;  // one per call at most, arguments merged
  };
  // What one choice has produced so far (n > 1: one per choice, by index).
  struct Choice {
    std::optional<ReasoningParser> reasoning;
    std::optional<ToolCallParser> tools;
    int tool_calls = 0;  // calls started
    bool sent_role = false;
    size_t text_offset = 0;  // completions logprobs: offset of the next token's text
    // Non-streaming accumulation.
    std::string text;  // content (all of the text when nothing is split)
    std::string reasoning_text;
    boost::json::array calls;               // chat: the message's tool_calls
    boost::json::array collected_logprobs;  // chat: content entries
    boost::json::object completion_logprobs;
    std::optional<std::string> finish_reason;  // as the API reports it
  };
  Choice& At(uint32_t index);
  boost::json::object Base() const;
  boost::json::value LogprobsJson(Choice& c, const Delta& delta);
  Pieces Split(Choice& c, std::string_view text, bool final);
  // Streaming: the delta object for `pieces` (role first).
  boost::json::object DeltaJson(Choice& c, Pieces pieces, bool always_content);
  std::string CallId(uint32_t choice, int index) const;
  void Gather(Choice& c, uint32_t index, Pieces pieces);  // non-streaming: into the message
  std::string FinishReason(const Choice& c, const std::string& reason) const;
  // Streaming: the chunk ending choice `index`.
  std::string EndChunk(uint32_t index, const std::string& reason, bool include_usage_field);
  boost::json::object ChoiceJson(uint32_t index);  // non-streaming: one whole choice

  const Endpoint endpoint_;
  const std::string id_;
  const std::string model_;
  const int64_t created_;
  const bool logprobs_;
  const ChatOutputOptions chat_;
  const uint32_t n_;
  std::vector<Choice> choices_;
};

// One SSE event: "data: <payload>\n\n".
std::string SseEvent(std::string_view payload);
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";

}  // namespace expertmesh::gateway
