// The attention service's continuous-batching scheduler: one thread runs the model step by
// step over every running sequence. At each step boundary it drops cancelled and expired
// sequences (their KV blocks go back to the pool at once), admits waiting sequences in
// scheduling order (priority, then arrival) while the batch has room and the KV pool has the
// blocks of their first chunk, and forms one batch in which each sequence contributes either
// its next prompt chunk (at most prefill_chunk tokens: long prompts are prefilled over several
// steps, interleaved with other sequences' decodes) or its last sampled token. The forward
// pass is the reference engine's (core/engine/engine.h) over paged KV caches, with the routed
// experts behind a RoutedExperts (the remote dispatcher in the service, LocalExperts in tests).
//
// KV on demand (as vLLM's): a sequence takes blocks as it grows, not for max_tokens up front.
// Before each step every running sequence reserves the blocks of what it feeds; when the
// pool runs dry the last sequence in scheduling order is preempted (recompute: its blocks go
// back, it waits again and later prefills its prompt and generated tokens anew, the client
// sees only a pause). Prefix caching: full blocks are registered in the pool's prefix cache
// (attention-service/kv_block_pool.h) and a new sequence starts from the blocks of its longest
// cached prefix, MTP rows included.
//
// Each step is core's DecodeStepper (core/decode/step.h), the same the in-process generator
// runs: the scheduler decides which sequences run and streams what the step emitted.
// Speculative decoding: when the model carries its MTP module (and options.mtp), decoding
// sequences draft tokens with it (core/decode/speculative.h: MtpDrafter, DraftPolicy) and the
// main forward verifies them; a step then emits accepted + 1 tokens per sequence. The MTP
// module's 1-layer cache lives in the same blocks as the main cache.
//
// Because every layer computes each row independently of the rest of the batch, a sequence's
// tokens depend neither on what it was batched with, nor on drafting, preemption or shared
// prefixes: the service's greedy output equals the in-process engine's.
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
#include "core/decode/json_constraint.h"
#include "core/decode/step.h"
#include "core/engine/engine.h"
#include "core/engine/forward_engine.h"
#include "core/engine/micro_batch_engine.h"
#include "core/model/experts.h"
#include "core/model/model.h"
#include "service-common/metrics.h"

namespace expertmesh::attention {

struct SchedulerOptions {
  int64_t kv_blocks = 1024;
  int64_t kv_block_size = 16;
  int64_t max_batch = 64;      // running sequences
  int64_t max_waiting = 256;   // queued sequences; beyond: RESOURCE_EXHAUSTED
  bool prefix_caching = true;  // share the KV blocks of common prompt prefixes
  int64_t prefill_chunk = 64;
  EngineOptions engine;
  // "cpu" (the reference engine) or "cuda:N[,M...]": the GPU engine
  // (core/kernels/cuda/cuda_engine.h), tensor parallel over the listed GPUs, its device KV cache
  // paged like kv_blocks.
  std::string device = "cpu";
  // Ping-pong micro-batches (core/engine/micro_batch_engine.h): the main forward of a step of
  // at least 2 x micro_batch_min_rows rows is split into up to micro_batches micro-batches
  // whose dense compute overlaps the others' expert round trips. 1 = off (the attention
  // service's default is 2). CPU device only: a GPU device runs every step unsplit.
  int micro_batches = 1;
  int64_t micro_batch_min_rows = 4;
  // The RoutedExperts of each micro-batch ([micro_batches]; e.g. a Dispatcher's MicroBatch(i)
  // so that each has its own step table); empty: `experts` (Create's) for every micro-batch.
  std::vector<RoutedExperts*> micro_batch_experts;
  bool mtp = true;  // draft with the MTP module when the model has it loaded
  int draft_k = 1;  // drafts per step, [1, kMaxDraftTokens]
  DraftPolicyOptions policy;
  // Per token id its bytes (Tokenizer::TokenByteTable): needed for JSON mode
  // (SequenceRequest.json_object); without it such requests are refused (INVALID_ARGUMENT).
  // Given, or read at Create from `tokenizer_json` (the model's tokenizer.json; skipped when
  // the file does not exist, an error when it does not load).
  std::shared_ptr<const TokenByteTable> token_bytes;
  std::string tokenizer_json;
  JsonAutomaton::Limits json_limits;  // nesting depth and whitespace runs in JSON mode
};

struct SchedulerLoad {
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_total = 0;
  int64_t mtp_kv_blocks_used = 0;  // = kv_blocks_used when drafting: MTP rows share the blocks
  int64_t max_context = 0;
  int64_t waiting_tokens = 0;    // prompt + max_tokens of the waiting sequences
  int64_t kv_blocks_cached = 0;  // registered in the prefix cache
  int64_t kv_blocks_shared = 0;  // held by two sequences or more
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
    uint64_t arrival = 0;  // Submit order: with request.priority, the scheduling order
    std::unique_ptr<BlockTable> blocks;       // while running: its KV blocks (main and MTP)
    std::unique_ptr<PagedKvCache> cache;      // the main model's view of `blocks`
    std::unique_ptr<PagedKvCache> mtp_cache;  // when drafting: the MTP module's view
    std::unique_ptr<Sampler> sampler;
    std::unique_ptr<TokenConstraint> constraint;  // JSON mode
    StepSequence step;             // what the decode step advances (tokens, counts, drafts)
    std::vector<uint64_t> hashes;  // prefix-cache hashes of its full blocks so far
    size_t mtp_registered = 0;     // blocks whose MTP rows are registered as final
    int64_t preemptions = 0;
    bool wants_mtp = false;  // drafts when running (the model has MTP, not disable_mtp)
  };
  // Scheduling order: lower priority value first, then earlier arrival.
  static bool Before(const Sequence& a, const Sequence& b) {
    return a.request.priority != b.request.priority ? a.request.priority < b.request.priority
                                                    : a.arrival < b.arrival;
  }
  Scheduler(const Model* model, RoutedExperts* experts, const SchedulerOptions& options,
            MetricsRegistry* metrics, std::unique_ptr<KvBlockPool> pool);
  void Loop();
  // Removes cancelled and expired sequences (running and waiting); caller holds mu_.
  void ReapLocked(std::vector<std::unique_ptr<Sequence>>& finished);
  // Moves waiting sequences into the batch, in scheduling order, while the batch has room and
  // the pool has blocks for their first chunk (prefix-cache hits first); caller holds mu_.
  void AdmitLocked();
  // Starts `seq`: its block table (shared prefix blocks acquired), caches and step state.
  // False (nothing held) when the pool cannot give its first chunk's blocks.
  bool TryStart(Sequence& seq);
  // Reserves every running sequence's blocks for this step, preempting the last in scheduling
  // order while the pool runs dry (recompute preemption: its blocks go back, it waits again
  // and later recomputes its prefix). Returns the sequences preempted.
  std::vector<std::unique_ptr<Sequence>> ReserveForStep();
  void Preempt(Sequence& seq);
  // Registers the sequence's full, final blocks in the prefix cache.
  void RegisterBlocks(Sequence& seq);
  // Inserts into waiting_ in scheduling order; caller holds mu_.
  void EnqueueLocked(std::unique_ptr<Sequence> seq);
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
  std::unique_ptr<KvBlockPool> pool_;         // main and (when drafting) MTP storage, one block ids
  uint64_t next_arrival_ = 0;                 // under mu_
  std::unique_ptr<Engine> engine_;            // --device cpu
  std::unique_ptr<ForwardEngine> forward_;    // what steps run: engine_'s adapter or the GPU engine
                                              // or, with micro_batches > 1, micro_
  MicroBatchForwardEngine* micro_ = nullptr;  // forward_ when micro-batching
  std::unique_ptr<DecodeStepper> stepper_;    // runs every step (core/decode/step.h)
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
  Histogram* step_micro_batches_ = nullptr;  // with micro-batching
  Counter* preemptions_ = nullptr;
  Counter* prefix_query_tokens_ = nullptr;  // prompt tokens looked up in the prefix cache
  Counter* prefix_hit_tokens_ = nullptr;    // of which found (not computed)
};

}  // namespace expertmesh::attention
