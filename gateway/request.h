// The gateway's internal request: what the OpenAI HTTP API and the gRPC API both turn into
// after validation, and the per-model facts validation needs (its name, context length and
// the sampling defaults of its generation_config.json).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <boost/json/array.hpp>

#include "absl/status/statusor.h"

namespace expertmesh::gateway {

// Sampling defaults from the model's generation_config.json (transformers' names).
struct GenerationDefaults {
  float temperature = 1.0f;  // 0 when do_sample is false
  float top_p = 1.0f;
  int32_t top_k = 0;  // 0 = off
  std::vector<int32_t> eos_token_ids;
  std::optional<int32_t> bos_token_id;
};

// Reads generation_config.json; a missing file gives the OpenAI defaults (temperature 1).
absl::StatusOr<GenerationDefaults> LoadGenerationDefaults(const std::string& path);

// What the gateway serves: one model.
struct ModelCard {
  std::string id;            // the name clients pass as "model"
  uint32_t max_context = 0;  // max_position_embeddings (prompt + completion tokens)
  GenerationDefaults defaults;
  // Chat output: split DeepSeek-R1's <think>...</think> into reasoning_content (the gateway's
  // --reasoning-parser deepseek_r1, or auto when the chat template mentions </think>).
  bool reasoning_parser = false;
};

enum class Endpoint { kCompletions, kChatCompletions, kGrpc };

// Limits the gateway enforces on every request, beyond the model's context.
struct RequestLimits {
  uint32_t max_stop_strings = 16;
  uint32_t max_stop_string_bytes = 256;
  uint32_t max_stop_token_ids = 64;
  uint32_t max_top_logprobs = 20;
  uint32_t max_prompt_bytes = 4 << 20;
  int32_t max_abs_priority = 1'000'000;  // priority in [-max, max]
  uint32_t max_choices = 16;             // n and best_of in [1, max]
};

struct SamplingOptions {     // resolved values, as the attention service takes them
  float temperature = 1.0f;  // 0 = greedy
  float top_p = 1.0f;        // 1 = off
  int32_t top_k = 0;         // 0 = off
  std::optional<uint64_t> seed;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  bool logprobs = false;      // return the chosen tokens' logprobs
  uint32_t top_logprobs = 0;  // and this many alternatives per position
};

// Chat: how the generated text becomes a message (gateway/reasoning_parser.h, tool_calls.h).
struct ChatOutputOptions {
  bool reasoning = false;         // <think>...</think> -> reasoning_content (card.reasoning_parser)
  bool include_reasoning = true;  // false: the reasoning is dropped (vLLM's include_reasoning)
  bool tool_calls = false;        // DeepSeek-V3 tool-call markers -> tool_calls
  bool parallel_tool_calls = true;  // false: the first call only (OpenAI's parallel_tool_calls)
  // The request's tools (validated), given to the chat template as `tools`.
  std::optional<boost::json::array> tools;
  // Appended to the rendered prompt, and the output continues it: tool_choice "required" or a
  // named function opens the tool call in the prompt (tool_calls.h, ForcedToolCallPrefix).
  std::string forced_prefix;
  bool forced_call = false;  // forced_prefix opened a call
  std::string forced_name;   // ... and named its function (empty: "required")
};

struct GenerationRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string model;
  // Exactly one prompt form is set: text, token ids, or chat messages (normalized: every
  // message has a string "role" and a string "content"; tool fields passed through).
  std::optional<std::string> prompt_text;
  std::optional<std::vector<int32_t>> prompt_token_ids;
  std::optional<boost::json::array> messages;
  ChatOutputOptions chat;  // chat completions only

  std::optional<uint32_t> max_tokens;  // absent: up to the end of the context
  SamplingOptions sampling;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  bool skip_special_tokens = true;
  bool stream = false;
  bool include_usage = false;     // stream_options.include_usage
  bool return_token_ids = false;  // gRPC: send token ids with each delta
  // Choices: n returned, best_of generated (best_of >= n; completions only, as vLLM's). Each
  // choice is its own sequence at the attention service, sharing the prompt's KV blocks; with
  // a seed, choice i samples with seed + i. best_of > n returns the n with the highest
  // cumulative logprob and is refused with stream (as OpenAI and vLLM do).
  uint32_t n = 1;
  uint32_t best_of = 1;
  // response_format {"type": "json_object"}: decoding is constrained so that an output that
  // ends by "stop" is one JSON object (the attention service masks the logits).
  bool json_object = false;
  // Scheduling priority as vLLM's: lower values are served earlier (admission queue and the
  // attention service's scheduler), 0 by default.
  int32_t priority = 0;
  // Who sent it, for the admission queue's fair share: "key:<API key>" when API keys are
  // configured, else "peer:<address>". Set by the API front end, never from the body.
  std::string client;
};

}  // namespace expertmesh::gateway
