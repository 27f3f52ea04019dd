// One decode step over a batch of sequences: the single implementation that the in-process
// BatchGenerator (core/decode/generate.h) and the attention service's Scheduler both run. As
// in vLLM, the caller decides which sequences run (admission, chunking budget, preemption);
// DecodeStepper::Step runs them:
//   1. Drafts. For the decoding sequences that draft, the DraftPolicy chooses k (0 = off);
//      each sequence drafts min(k, tokens still wanted, room left in the context) tokens
//      with the MTP module (core/decode/speculative.h), one sequence only on a probe.
//   2. One main forward: the next prompt chunk (at most prefill_chunk tokens) of every
//      prefilling sequence, [last token, drafts...] of every decoding one.
//   3. Per sequence: a prompt's last chunk samples its first token; a decode verifies its
//      drafts (accepted + 1 tokens). Tokens are emitted up to the first end (EOS unless
//      ignored, a stop token, max_tokens, the context), the KV cache is truncated to the
//      emitted tokens but the newest, and the rows the MTP module has not seen are queued.
// The caller reads each sequence's `emitted` and `stop` after the step and does its side
// effects (stream events, callbacks, metrics) from them.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/decode/json_constraint.h"
#include "core/decode/sampling.h"
#include "core/decode/speculative.h"
#include "core/engine/forward_engine.h"
#include "core/engine/kv_cache.h"

namespace expertmesh {

enum class StopReason {
  kNone,    // still running
  kStop,    // EOS (unless ignore_eos) or one of stop_token_ids
  kLength,  // max_tokens, or the model's context is full
};

// One sequence as the step sees it. The caller owns it, the sampler and the caches.
struct StepSequence {
  // Set before the first step.
  int64_t max_tokens = 1;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;
  Sampler* sampler = nullptr;
  // Constrained decoding (e.g. JSON mode): the logits are masked before every sample and each
  // emitted token is fed to it. Such a sequence must not draft (mtp.cache unset): its drafts
  // would be verified against unmasked logits.
  TokenConstraint* constraint = nullptr;
  MlaKvCache* cache = nullptr;  // the main model's: every prompt and emitted token but the last
  MtpSequence mtp;              // drafts when mtp.cache is set (the MTP module's cache)
  // Tokens to put in the cache before decoding: the prompt; after a preemption (recompute),
  // every token but the newest, which the first decode step then feeds (no token is sampled
  // at the end of such a prefill).
  int64_t prompt_len = 0;
  std::vector<int32_t> tokens;  // the prompt, then every emitted token

  // Advanced by the steps.
  int64_t prefilled = 0;  // prompt tokens already in the cache
  int64_t generated = 0;
  int64_t drafted = 0;   // drafts verified
  int64_t accepted = 0;  // of which accepted

  // The last step's outcome.
  std::vector<SampledToken> emitted;
  StopReason stop = StopReason::kNone;

  bool prefilling() const { return prefilled < prompt_len; }
  bool drafting() const { return mtp.cache != nullptr; }
};

struct StepperOptions {
  bool mtp = true;  // draft with the MTP module when the engine's model has it (loaded)
  int draft_k = 1;  // drafts per step, [1, kMaxDraftTokens]
  DraftPolicyOptions policy;
  // Prompt tokens a sequence feeds per step (chunked prefill); the default feeds whole prompts.
  int64_t prefill_chunk = std::numeric_limits<int64_t>::max();
};

struct StepStats {
  int64_t rows = 0;         // rows of the main forward
  int64_t prompt_rows = 0;  // of which prompt tokens
  int draft_k = 0;          // the policy's choice for this step
  bool verified_drafts = false;
  int64_t drafted[kMaxDraftTokens] = {};  // per draft position
  int64_t accepted[kMaxDraftTokens] = {};
  double forward_seconds = 0;  // the main forward alone
};

class DecodeStepper {
 public:
  // `engine` must outlive the stepper. MTP is used when options.mtp and the engine's model has
  // a loaded MTP module.
  static absl::StatusOr<std::unique_ptr<DecodeStepper>> Create(ForwardEngine* engine,
                                                               StepperOptions options);

  bool mtp() const { return drafter_.has_value(); }
  DraftPolicy* policy() { return policy_.get(); }
  int64_t max_context() const { return max_context_; }

  // At most how many tokens `seq` feeds the main forward in its next step (its next prompt
  // chunk, or its last token and the most drafts it may verify): what its cache must have room
  // for beyond its length.
  int64_t MaxFeed(const StepSequence& seq) const;

  // Runs one step over `batch`: sequences not yet stopped, each with a cache slot for every
  // token it feeds. Clears and sets every sequence's `emitted` and `stop`. An error (a
  // forward or a draft failed) leaves the sequences unusable: the caller ends them.
  absl::StatusOr<StepStats> Step(std::span<StepSequence* const> batch);

 private:
  DecodeStepper(ForwardEngine* engine, StepperOptions options);
  // Phase 1: drafts for the decoding sequences; returns the policy's k.
  absl::StatusOr<int> Draft(std::span<StepSequence* const> batch);
  // Phase 3 for one sequence: appends tokens until it stops; returns how many were taken.
  size_t Emit(StepSequence& seq, std::span<const SampledToken> tokens) const;
  void FinishPrefillChunk(StepSequence& seq, int64_t start, int64_t n, const SequenceOutput& out);
  void FinishDecode(StepSequence& seq, int64_t start, const SequenceOutput& out, StepStats& stats);
  // One token from `logits`: masked first when the sequence is constrained.
  SampledToken SampleOne(StepSequence& seq, std::span<const float> logits);

  ForwardEngine* engine_;
  StepperOptions options_;
  int64_t max_context_;
  int64_t vocab_size_;
  int64_t hidden_size_;
  std::optional<int64_t> eos_;
  std::optional<MtpDrafter> drafter_;
  std::unique_ptr<DraftPolicy> policy_;
  int last_draft_k_ = -1;  // the policy's previous choice (logged when it changes)
  std::vector<std::vector<int32_t>> inputs_;  // per batch slot, reused across steps
  std::vector<float> masked_;                 // a constrained sequence's masked logits
};

}  // namespace expertmesh
