// What the attention service knows about one sequence, independent of gRPC: the request
// (prompt, sampling, limits, deadline) after validation, the events it produces (new tokens
// with logprobs, then a finish), and the channel between the scheduler thread (producer)
// and the RPC handler streaming them to the client (consumer).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "core/decode/sampling.h"

namespace expertmesh::attention {

enum class FinishReason { kNone, kStop, kLength, kCancelled, kError };
const char* FinishReasonName(FinishReason r);

struct SequenceRequest {
  std::string request_id;
  std::vector<int32_t> prompt;  // token ids, non-empty, < vocab_size
  SamplingParams sampling;
  int64_t max_tokens = 16;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  bool disable_mtp = false;  // no speculative drafting for this sequence
  int32_t priority = 0;      // as vLLM's: lower values are served earlier (SubmitRequest.priority)
  // JSON mode (SubmitRequest.response_format): every sample is masked so that the output is
  // one JSON object when it ends by EOS or a stop token (core/decode/json_constraint.h). Such
  // a sequence does not draft.
  bool json_object = false;
  absl::Time deadline = absl::InfiniteFuture();
};

struct GeneratedToken {
  int32_t token = 0;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top_logprobs;  // (token, logprob), best first
};

struct SequenceEvent {
  std::vector<GeneratedToken> tokens;
  FinishReason finish = FinishReason::kNone;  // set on the last event
  absl::Status error;                         // kError: why (UNAVAILABLE, DEADLINE_EXCEEDED...)
  int64_t prompt_tokens = 0;                  // on the last event
  int64_t completion_tokens = 0;
  int64_t drafted_tokens = 0;   // on the last event: drafts verified
  int64_t accepted_tokens = 0;  // drafts accepted
};

// Single producer (scheduler), single consumer (RPC handler).
class SequenceStream {
 public:
  explicit SequenceStream(std::string request_id) : request_id_(std::move(request_id)) {}
  const std::string& request_id() const { return request_id_; }

  // Consumer: the next event, waiting up to `timeout`; nullopt on timeout.
  std::optional<SequenceEvent> Next(absl::Duration timeout);
  // Consumer or Cancel rpc: ask the scheduler to drop the sequence (frees its KV blocks at
  // the next step boundary; the scheduler then pushes a kCancelled finish).
  void Cancel() { cancelled_.store(true, std::memory_order_relaxed); }
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }

  // Producer.
  void Push(SequenceEvent event);

 private:
  const std::string request_id_;
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<SequenceEvent> events_;
};

}  // namespace expertmesh::attention
