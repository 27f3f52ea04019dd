// In-process generation with the reference engine: a batch of requests prefilled together,
// then decoded in lock-step, with or without speculative decoding by the model's
// multi-token-prediction module (core/decode/speculative.h). Each step is DecodeStepper's
// (core/decode/step.h), the same step the attention service's scheduler runs inside its
// continuous batching. `expertmesh run`, the MTP tests and the MTP benchmark use it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/decode/sampling.h"
#include "core/decode/speculative.h"
#include "core/decode/step.h"
#include "core/engine/engine.h"
#include "core/engine/kv_cache.h"

namespace expertmesh {

struct BatchRequest {
  std::vector<int32_t> prompt;  // [n] token ids, n >= 1
  SamplingParams sampling;
  int64_t max_tokens = 16;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;
};

struct BatchResult {
  std::vector<SampledToken> tokens;
  int64_t drafted = 0;   // drafts verified
  int64_t accepted = 0;  // drafts accepted
};

struct BatchGeneratorOptions {
  bool mtp = true;  // draft with the MTP module when the model has it (loaded)
  int draft_k = 1;  // drafts per step, [1, kMaxDraftTokens]
  DraftPolicyOptions policy;
};

struct BatchStats {
  double prefill_seconds = 0;
  double decode_seconds = 0;
  int64_t decode_steps = 0;   // main forwards after the prefill
  int64_t draft_steps = 0;    // of which verified drafts
  int64_t decode_tokens = 0;  // tokens emitted after the first of each sequence
  int64_t drafted = 0;
  int64_t accepted = 0;
};

class BatchGenerator {
 public:
  // `engine` must outlive the generator. MTP is used when options.mtp and the engine's model
  // has a loaded MTP module.
  static absl::StatusOr<std::unique_ptr<BatchGenerator>> Create(Engine* engine,
                                                                BatchGeneratorOptions options = {});

  bool mtp() const { return stepper_->mtp(); }
  DraftPolicy* policy() { return stepper_->policy(); }

  // Generates for every request (max_tokens each, or until EOS / a stop token). on_tokens
  // (optional) sees each sequence's new tokens as they are emitted.
  using TokenCallback = std::function<void(size_t sequence, std::span<const SampledToken>)>;
  absl::StatusOr<std::vector<BatchResult>> Generate(std::span<const BatchRequest> requests,
                                                    BatchStats* stats = nullptr,
                                                    const TokenCallback& on_tokens = nullptr);

  // The caches of sequence i after the last Generate (main; MTP or null), for tests.
  const MlaKvCache& cache(size_t i) const { return *caches_[i]; }
  const MlaKvCache* mtp_cache(size_t i) const {
    return i < mtp_caches_.size() ? mtp_caches_[i].get() : nullptr;
  }

 private:
  BatchGenerator(Engine* engine) : engine_(engine), forward_(engine) {}

  Engine* engine_;
  ReferenceForwardEngine forward_;
  std::unique_ptr<DecodeStepper> stepper_;
  std::vector<std::unique_ptr<ContiguousKvCache>> caches_;
  std::vector<std::unique_ptr<ContiguousKvCache>> mtp_caches_;
};

}  // namespace expertmesh
