// The attention service's continuous-batching scheduler: one thread runs the model step by
// step over every running sequence. At each step boundary it drops cancelled and expired
// sequences (their KV blocks go back to the pool at once), admits waiting sequences in
// arrival order while the batch has room and their KV blocks can be reserved, and forms one
// batch in which each sequence contributes either its next prompt chunk (at most
// prefill_chunk tokens: long prompts are prefilled over several steps, interleaved with
// other sequences' decodes) or its last sampled token. The forward pass is the reference
// engine's (core/engine/engine.h) over paged KV caches, with the routed experts behind a
// RoutedExperts (the router's remote dispatcher in the service, LocalExperts in tests).
//
// Each step is core's DecodeStepper (core/decode/step.h), the same the in-process generator
// runs: the scheduler decides which sequences run and streams what the step emitted.
// Speculative decoding: when the model carries its MTP module (and options.mtp), decoding
// sequences draft tokens with it (core/decode/speculative.h: MtpDrafter, DraftPolicy) and the
// main forward verifies them; a step then emits accepted + 1 tokens per sequence. Each sequence
// has a second paged cache, 1 layer, for the MTP module, from a pool of the same capacity.
//
// Because every layer computes each row independently of the rest of the batch, a sequence's
// tokens do not depend on what it was batched with, nor on drafting: the service's greedy
// output equals the in-process engine's.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "attention-service/kv_block_pool.h"
#include "attention-service/paged_kv_cache.h"
#include "attention-service/sequence.h"
#include "core/decode/step.h"
#include "core/engine/engine.h"
#include "core/engine/forward_engine.h"
#include "core/model/experts.h"
#include "core/model/model.h"
#include "service-common/metrics.h"

namespace expertmesh::attention {

struct SchedulerOptions {
  int64_t kv_blocks = 1024;
  int64_t kv_block_size = 16;
  int64_t max_batch = 64;     // running sequences
  int64_t max_waiting = 256;  // queued sequences; beyond: RESOURCE_EXHAUSTED
  int64_t prefill_chunk = 64;
  EngineOptions engine;
  // "cpu" (the reference engine) or "cuda:N[,M...]": the GPU engine
  // (core/kernels/cuda/cuda_engine.h), tensor parallel over the listed GPUs, its device KV cache
  // paged like kv_blocks.
  std::string device = "cpu";
  bool mtp = true;  // draft with the MTP module when the model has it loaded
  int draft_k = 1;  // drafts per step, [1, kMaxDraftTokens]
  DraftPolicyOptions policy;
};

struct SchedulerLoad {
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_total = 0;
  int64_t mtp_kv_blocks_used = 0;  // the MTP module's pool (same size as the main one)
  int64_t max_context = 0;
};

class Scheduler {
 public:
  // `model` and `experts` must outlive the scheduler. `metrics` may be null.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(const Model* model,
                                                           RoutedExperts* experts,
                                                           const SchedulerOptions& options,
                                                           MetricsRegistry* metrics);
  ~Scheduler();  // Shutdown()

  // Checks what only the model can check (token ids in vocab, prompt within the context,
  // sampling values); INVALID_ARGUMENT naming the field.
  absl::Status Validate(const SequenceRequest& request) const;
  // Queues a validated request. RESOURCE_EXHAUSTED when the waiting queue is full or the
  // sequence could never fit the KV pool; ALREADY_EXISTS for a live duplicate request_id.
  absl::StatusOr<std::shared_ptr<SequenceStream>> Submit(SequenceRequest request);
  // Cancels a queued or running sequence; false when unknown (or already finished).
  bool Cancel(const std::string& request_id);
  SchedulerLoad Load() const;
  int64_t max_context() const { return max_context_; }
  bool mtp() const { return stepper_->mtp(); }
  // Stops the step thread; every live sequence finishes with UNAVAILABLE.
  void Shutdown();

 private:
  struct Sequence {
    SequenceRequest request;
    std::shared_ptr<SequenceStream> stream;
    std::unique_ptr<PagedKvCache> cache;
    std::unique_ptr<PagedKvCache> mtp_cache;  // when drafting: the MTP module's (1 layer)
    std::unique_ptr<Sampler> sampler;
    StepSequence step;  // what the decode step advances (tokens, counts, drafts)
  };
  Scheduler(const Model* model, RoutedExperts* experts, const SchedulerOptions& options,
            MetricsRegistry* metrics, std::unique_ptr<KvBlockPool> pool);
  void Loop();
  // Removes cancelled and expired sequences (running and waiting); caller holds mu_.
  void ReapLocked(std::vector<std::unique_ptr<Sequence>>& finished);
  // Moves waiting sequences into the batch while room and KV blocks allow; caller holds mu_.
  void AdmitLocked();
  // Runs one forward step over `running_`.
  void Step();
  // Streams the tokens the last step emitted for `seq`.
  void PushTokens(Sequence& seq);
  // Releases the sequence's KV blocks and pushes its final event.
  void Finish(Sequence& seq, FinishReason reason, absl::Status error);
  SequenceEvent FinishEvent(Sequence& seq, FinishReason reason, absl::Status error);
  int64_t KvBudget(const SequenceRequest& r) const;

  const Model* model_;
  RoutedExperts* experts_;
  const SchedulerOptions options_;
  std::unique_ptr<KvBlockPool> pool_;
  std::unique_ptr<KvBlockPool> mtp_pool_;   // when drafting
  std::unique_ptr<Engine> engine_;          // --device cpu
  std::unique_ptr<ForwardEngine> forward_;  // what steps run: engine_'s adapter or the GPU engine
  std::unique_ptr<DecodeStepper> stepper_;  // runs every step (core/decode/step.h)
  const int64_t max_context_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // touched by the step thread only
  int64_t running_count_ = 0;                       // running_.size(), readable under mu_
  std::map<std::string, std::shared_ptr<SequenceStream>> live_;  // request_id -> stream
  std::thread thread_;

  // Metrics (null when no registry).
  Counter* requests_finished_[5] = {};
  Counter* generated_tokens_ = nullptr;
  Counter* prompt_tokens_ = nullptr;
  Counter* drafted_tokens_ = nullptr;
  Counter* accepted_tokens_ = nullptr;
  Histogram* step_seconds_ = nullptr;
  Histogram* batch_tokens_ = nullptr;
};

}  // namespace expertmesh::attention
