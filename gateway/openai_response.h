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

  // Streaming: the chunk for one delta (chat: the first one also carries the role).
  std::string Chunk(const Delta& delta, bool include_usage_field);
  // Streaming: the chunk carrying finish_reason (and any text the parsers held back).
  std::string FinishChunk(const Outcome& outcome, bool include_usage_field);
  // Streaming: the usage chunk of stream_options.include_usage (empty choices).
  std::string UsageChunk(const Usage& usage) const;
  // Non-streaming: the whole response from the collected deltas.
  void Collect(const Delta& delta);
  std::string Full(const Outcome& outcome);

  static boost::json::object UsageJson(const Usage& usage);

 private:
  boost::json::object Base() const;
  boost::json::value LogprobsJson(const Delta& delta);
  // Chat: the next generated text split into reasoning, content and tool-call changes;
  // `final` flushes what the parsers held back.
  struct Pieces {
    std::string reasoning;
    std::string content;
    std::vector<ToolCallEvent> calls;  // one per call at most, arguments merged
  };
  Pieces Split(std::string_view text, bool final);
  // Streaming: the delta object for `pieces` (role first).
  boost::json::object DeltaJson(Pieces pieces, bool always_content);
  std::string CallId(int index) const;
  void Gather(Pieces pieces);  // non-streaming: into the message
  std::string FinishReason(const Outcome& outcome) const;

  const Endpoint endpoint_;
  const std::string id_;
  const std::string model_;
  const int64_t created_;
  const bool logprobs_;
  const ChatOutputOptions chat_;
  std::optional<ReasoningParser> reasoning_;
  std::optional<ToolCallParser> tools_;
  int tool_calls_ = 0;  // calls started
  bool sent_role_ = false;
  size_t text_offset_ = 0;  // completions logprobs: offset of the next token's text
  // Non-streaming accumulation.
  std::string text_;  // content (all of the text when nothing is split)
  std::string reasoning_text_;
  boost::json::array calls_;               // chat: the message's tool_calls
  boost::json::array collected_logprobs_;  // chat: content entries
  boost::json::object completion_logprobs_;
};

// One SSE event: "data: <payload>\n\n".
std::string SseEvent(std::string_view payload);
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";

}  // namespace expertmesh::gateway
