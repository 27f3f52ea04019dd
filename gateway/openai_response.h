// OpenAI response bodies for /v1/completions and /v1/chat/completions: whole responses and
// streamed chunks (SSE `data:` payloads), logprobs in each endpoint's own shape, usage.
// Pure formatting of what generation.h produces; no I/O.
#pragma once

#include <cstdint>
#include <string>

#include <boost/json/object.hpp>

#include "gateway/generation.h"
#include "gateway/request.h"

namespace expertmesh::gateway {

class OpenAiResponder {
 public:
  // `created`: Unix seconds for the "created" field; `id` e.g. "cmpl-gw-1-7".
  OpenAiResponder(Endpoint endpoint, std::string id, std::string model, int64_t created,
                  bool logprobs);

  // Streaming: the chunk for one delta (chat: the first one also carries the role).
  std::string Chunk(const Delta& delta, bool include_usage_field);
  // Streaming: the chunk carrying finish_reason.
  std::string FinishChunk(const Outcome& outcome, bool include_usage_field);
  // Streaming: the usage chunk of stream_options.include_usage (empty choices).
  std::string UsageChunk(const Usage& usage) const;
  // Non-streaming: the whole response from the collected deltas.
  void Collect(const Delta& delta);
  std::string Full(const Outcome& outcome) const;

  static boost::json::object UsageJson(const Usage& usage);

 private:
  boost::json::object Base() const;
  boost::json::value LogprobsJson(const Delta& delta);

  const Endpoint endpoint_;
  const std::string id_;
  const std::string model_;
  const int64_t created_;
  const bool logprobs_;
  bool sent_role_ = false;
  size_t text_offset_ = 0;  // completions logprobs: offset of the next token's text
  // Non-streaming accumulation.
  std::string text_;
  boost::json::array collected_logprobs_;  // chat: content entries
  boost::json::object completion_logprobs_;
};

// One SSE event: "data: <payload>\n\n".
std::string SseEvent(std::string_view payload);
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";

}  // namespace expertmesh::gateway
