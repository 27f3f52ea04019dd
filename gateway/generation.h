// One generation, end to end, shared by the HTTP and gRPC APIs: the prompt is rendered
// (chat template) and tokenized, checked against the context, admitted (admission.h), sent
// to the least loaded attention replica, and the streamed tokens are detokenized
// incrementally, cut at stop strings (stop_matcher.h) and handed to a sink as text deltas.
// The non-streaming APIs collect the same deltas, so streamed text always concatenates to
// the non-streamed text. A sink whose client is gone cancels the sequence at the replica.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/text/chat_template.h"
#include "core/text/tokenizer.h"
#include "gateway/admission.h"
#include "gateway/attention_pool.h"
#include "gateway/request.h"
#include "service-common/metrics.h"

namespace expertmesh::gateway {

struct TopCandidate {
  int32_t token_id = 0;
  std::string token;  // its text (invalid UTF-8 of a partial byte token shown as U+FFFD)
  float logprob = 0.0f;
};

struct TokenLogprob {
  int32_t token_id = 0;
  std::string token;
  float logprob = 0.0f;
  std::vector<TopCandidate> top;  // best first
};

// What one step adds to the output. `text` may be empty while a stop string or a UTF-8
// sequence is undecided; token_ids and logprobs still cover every token generated.
struct Delta {
  std::string text;
  std::vector<int32_t> token_ids;
  std::vector<TokenLogprob> logprobs;  // when requested
  uint32_t index = 0;                  // the choice it belongs to (n > 1)
  // n > 1: choice `index` ended (a delta without text). The choice that ends last is
  // reported by the Outcome instead, so every choice's end is told exactly once.
  std::optional<std::string> finish_reason;
};

struct Usage {
  uint32_t prompt_tokens = 0;
  uint32_t completion_tokens = 0;
  uint32_t accepted_draft_tokens = 0;
};

struct Outcome {
  std::string finish_reason;               // "stop" or "length"
  std::optional<std::string> stop_string;  // the stop string that ended it, if one did
  Usage usage;
  uint32_t index = 0;  // the choice that ended last (n > 1)
};

class GenerationSink {
 public:
  virtual ~GenerationSink() = default;
  // A delta is ready; false when the client is gone (the sequence is then cancelled).
  virtual bool OnDelta(const Delta& delta) = 0;
  // Polled while queued and between events: true when the client went away.
  virtual bool ClientGone() { return false; }
  // The client's own deadline, if it set one (a gRPC call's): the request, queued or
  // generating, ends there rather than at the gateway's default timeout, and so does its
  // sequence at the attention service (the Submit carries the earlier of the two).
  virtual std::optional<std::chrono::system_clock::time_point> ClientDeadline() const {
    return std::nullopt;
  }
};

struct PreparedRequest {
  GenerationRequest request;
  std::vector<int32_t> prompt_ids;
  uint32_t max_tokens = 0;
  std::string request_id;
};

// The gateway's own metrics (Prometheus names expertmesh_gateway_*).
struct GatewayMetrics {
  explicit GatewayMetrics(MetricsRegistry& registry);
  Counter& prompt_tokens;
  Counter& generation_tokens;
  Counter& cancelled;
  Histogram& time_to_first_token;
  Histogram& inter_token_latency;
  Histogram& request_latency;
  Counter& queue_rejected;  // 429 / RESOURCE_EXHAUSTED: the admission queue was full
  Histogram& queue_time;    // time from arrival to a running slot (0 when not queued)
  MetricsRegistry& registry;
  Counter& Requests(const std::string& api, int status);
};

class RequestRunner {
 public:
  struct Options {
    std::chrono::milliseconds default_timeout{std::chrono::minutes(10)};
  };
  // All pointers must outlive the runner; chat_template may be null (no chat API).
  RequestRunner(const Tokenizer* tokenizer, const ChatTemplate* chat_template, ModelCard card,
                AttentionPool* pool, Admission* admission, GatewayMetrics* metrics,
                Options options);

  // Renders and tokenizes the prompt and fixes max_tokens: 400-class errors (prompt longer
  // than the context, token ids out of the vocabulary, invalid UTF-8, template errors).
  absl::StatusOr<PreparedRequest> Prepare(GenerationRequest request) const;

  // Runs one sequence to its end, feeding `sink`. Errors before the first delta leave the
  // sink untouched (so the API can still answer with an HTTP/gRPC error status).
  // n > 1 or best_of > 1: one sequence per choice (RunChoices); deltas carry their choice's
  // index, usage counts the prompt once and the returned choices' tokens summed.
  absl::StatusOr<Outcome> Run(const PreparedRequest& prepared, GenerationSink& sink) const;

  const ModelCard& card() const { return card_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  // The context length in force: the model's, or less when the replicas report less.
  uint32_t max_context() const;

 private:
  class EventDecoder;  // the replica's token events -> text deltas (generation.cc)
  TokenLogprob MakeLogprob(int32_t id, float logprob, const v1::TopLogprobs* top) const;
  // The SubmitRequest for a prepared request, with the time left to `deadline`.
  // Choice `index` of several: its own request id and, with a seed, seed + index.
  static v1::SubmitRequest BuildSubmit(const PreparedRequest& p,
                                       std::chrono::steady_clock::time_point deadline,
                                       std::optional<uint32_t> index = std::nullopt);
  // best_of sequences at once: the first is submitted alone and the others when it has
  // produced its first token, so they find its full prompt blocks in the prefix cache.
  absl::StatusOr<Outcome> RunChoices(const PreparedRequest& p, GenerationSink& sink,
                                     std::chrono::steady_clock::time_point start,
                                     std::chrono::steady_clock::time_point steady_deadline,
                                     std::chrono::system_clock::time_point wall_deadline) const;
  // After the event loop: the outcome, or why the sequence failed, from how it ended.
  absl::StatusOr<Outcome> Conclude(const PreparedRequest& p, SubmitCall& call,
                                   v1::FinishReason finish, bool client_gone, uint32_t received,
                                   Outcome outcome) const;

  const Tokenizer* tokenizer_;
  const ChatTemplate* chat_template_;
  const ModelCard card_;
  AttentionPool* pool_;
  Admission* admission_;
  GatewayMetrics* metrics_;
  const Options options_;
};

}  // namespace expertmesh::gateway
