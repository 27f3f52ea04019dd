#include "attention-service/scheduler.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "core/backend/backend.h"
#include "core/base/status.h"
#include "spdlog/spdlog.h"

namespace expertmesh::attention {

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(const Model* model,
                                                             RoutedExperts* experts,
                                                             const SchedulerOptions& options,
                                                             MetricsRegistry* metrics) {
  if (options.max_batch < 1 || options.max_waiting < 0 || options.prefill_chunk < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scheduler: max_batch (", options.max_batch, ") and prefill_chunk (", options.prefill_chunk,
        ") must be >= 1, max_waiting (", options.max_waiting, ") >= 0"));
  }
  const ModelConfig& c = model->config();
  EM_ASSIGN_OR_RETURN(const DeviceSpec device, ParseDeviceSpec(options.device));
  // On a GPU the pools only hand out block ids: the slots live in the engine's device cache.
  const bool host_kv = !device.cuda;
  EM_ASSIGN_OR_RETURN(
      std::unique_ptr<KvBlockPool> pool,
      KvBlockPool::Create(options.kv_blocks, options.kv_block_size, c.num_hidden_layers,
                          c.kv_lora_rank + c.qk_rope_head_dim, host_kv));
  std::unique_ptr<Scheduler> s(new Scheduler(model, experts, options, metrics, std::move(pool)));
  const bool drafting = options.mtp && !model->mtp().empty();
  ForwardBackendOptions fo;
  fo.engine = options.engine;
  fo.kv_pages = options.kv_blocks;
  fo.page_size = options.kv_block_size;
  fo.mtp_kv_pages = drafting ? options.kv_blocks : 0;
  EM_ASSIGN_OR_RETURN(ForwardBackend backend, CreateForwardBackend(*model, experts, device, fo));
  spdlog::info("{}", backend.description);
  s->engine_ = std::move(backend.engine);
  s->forward_ = std::move(backend.forward);
  StepperOptions so;
  so.mtp = options.mtp;
  so.draft_k = options.draft_k;
  so.policy = options.policy;
  so.prefill_chunk = options.prefill_chunk;
  EM_ASSIGN_OR_RETURN(s->stepper_, DecodeStepper::Create(s->forward_.get(), so));
  if (s->stepper_->mtp()) {
    // The MTP caches: one layer each, as many token slots as the main pool, so a sequence
    // that got its main blocks always gets its MTP blocks.
    EM_ASSIGN_OR_RETURN(s->mtp_pool_,
                        KvBlockPool::Create(options.kv_blocks, options.kv_block_size, 1,
                                            c.kv_lora_rank + c.qk_rope_head_dim, host_kv));
  }
  s->thread_ = std::thread([p = s.get()] { p->Loop(); });
  return s;
}

Scheduler::Scheduler(const Model* model, RoutedExperts* experts, const SchedulerOptions& options,
                     MetricsRegistry* metrics, std::unique_ptr<KvBlockPool> pool)
    : model_(model),
      experts_(experts),
      options_(options),
      pool_(std::move(pool)),
      max_context_(model->config().max_position_embeddings) {
  if (metrics != nullptr) {
    for (FinishReason r : {FinishReason::kStop, FinishReason::kLength, FinishReason::kCancelled,
                           FinishReason::kError}) {
      requests_finished_[static_cast<int>(r)] =
          &metrics->GetCounter("expertmesh_attention_requests_finished_total",
                               "Sequences finished, by reason", {{"reason", FinishReasonName(r)}});
    }
    generated_tokens_ =
        &metrics->GetCounter("expertmesh_attention_generated_tokens_total", "Tokens sampled");
    prompt_tokens_ =
        &metrics->GetCounter("expertmesh_attention_prompt_tokens_total", "Prompt tokens prefilled");
    drafted_tokens_ = &metrics->GetCounter("expertmesh_attention_drafted_tokens_total",
                                           "MTP draft tokens verified");
    accepted_tokens_ = &metrics->GetCounter("expertmesh_attention_accepted_draft_tokens_total",
                                            "MTP draft tokens accepted");
    step_seconds_ =
        &metrics->GetHistogram("expertmesh_attention_step_seconds",
                               "Wall time of one batched forward step", LatencyBucketsSeconds());
    batch_tokens_ =
        &metrics->GetHistogram("expertmesh_attention_step_tokens", "Tokens in one step's batch",
                               ExponentialBuckets(1, 2, 14));
  }
}

Scheduler::~Scheduler() { Shutdown(); }

int64_t Scheduler::KvBudget(const SequenceRequest& r) const {
  // Every token fed to the model needs a slot: the prompt and all generated tokens but the
  // last; the context bounds the total.
  return std::min<int64_t>(static_cast<int64_t>(r.prompt.size()) + r.max_tokens, max_context_);
}

absl::Status Scheduler::Validate(const SequenceRequest& r) const {
  const ModelConfig& c = model_->config();
  if (r.prompt.empty()) return absl::InvalidArgumentError("prompt_token_ids is empty");
  for (size_t i = 0; i < r.prompt.size(); ++i) {
    if (r.prompt[i] < 0 || r.prompt[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt_token_ids[", i, "] = ", r.prompt[i],
                                                     " is outside the vocabulary [0, ",
                                                     c.vocab_size, ")"));
    }
  }
  if (static_cast<int64_t>(r.prompt.size()) >= max_context_) {
    return absl::InvalidArgumentError(absl::StrCat("prompt of ", r.prompt.size(),
                                                   " tokens leaves no room in the context of ",
                                                   max_context_, " tokens"));
  }
  if (r.max_tokens < 1) return absl::InvalidArgumentError("max_tokens must be >= 1");
  for (int32_t t : r.stop_token_ids) {
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop_token_ids holds ", t, ", outside the vocabulary"));
    }
  }
  if (r.sampling.temperature > 1000.0f) {
    return absl::InvalidArgumentError("temperature must be <= 1000");
  }
  for (float p : {r.sampling.presence_penalty, r.sampling.frequency_penalty}) {
    if (!(p >= -2.0f && p <= 2.0f)) {
      return absl::InvalidArgumentError("presence and frequency penalties must lie in [-2, 2]");
    }
  }
  absl::StatusOr<Sampler> sampler = Sampler::Create(r.sampling);
  if (!sampler.ok()) return sampler.status();
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<SequenceStream>> Scheduler::Submit(SequenceRequest request) {
  if (absl::Status s = Validate(request); !s.ok()) return s;
  const int64_t blocks = pool_->BlocksFor(KvBudget(request));
  if (blocks > pool_->total_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the sequence needs ", blocks, " KV blocks (prompt ", request.prompt.size(),
        " + max_tokens ", request.max_tokens, "); the pool has ", pool_->total_blocks()));
  }
  absl::StatusOr<Sampler> sampler = Sampler::Create(request.sampling);
  if (!sampler.ok()) return sampler.status();
  auto seq = std::make_unique<Sequence>();
  seq->sampler = std::make_unique<Sampler>(*std::move(sampler));
  seq->stream = std::make_shared<SequenceStream>(request.request_id);
  StepSequence& step = seq->step;
  step.max_tokens = request.max_tokens;
  step.ignore_eos = request.ignore_eos;
  step.stop_token_ids = request.stop_token_ids;
  step.sampler = seq->sampler.get();
  step.prompt_len = static_cast<int64_t>(request.prompt.size());
  step.tokens = request.prompt;
  seq->request = std::move(request);
  std::shared_ptr<SequenceStream> stream = seq->stream;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return absl::UnavailableError("the attention service is shutting down");
    if (static_cast<int64_t>(waiting_.size()) >= options_.max_waiting) {
      return absl::ResourceExhaustedError(absl::StrCat("waiting queue full (", waiting_.size(),
                                                       " sequences waiting, ", running_count_,
                                                       " running); retry later"));
    }
    if (live_.contains(seq->request.request_id)) {
      return absl::AlreadyExistsError(
          absl::StrCat("request_id ", seq->request.request_id, " is already live"));
    }
    live_[seq->request.request_id] = stream;
    waiting_.push_back(std::move(seq));
  }
  cv_.notify_all();
  return stream;
}

bool Scheduler::Cancel(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(request_id);
  if (it == live_.end()) return false;
  it->second->Cancel();
  cv_.notify_all();
  return true;
}

SchedulerLoad Scheduler::Load() const {
  SchedulerLoad load;
  {
    std::lock_guard<std::mutex> lock(mu_);
    load.running = running_count_;
    load.waiting = static_cast<int64_t>(waiting_.size());
  }
  load.kv_blocks_used = pool_->used_blocks();
  load.kv_blocks_total = pool_->total_blocks();
  load.mtp_kv_blocks_used = mtp_pool_ ? mtp_pool_->used_blocks() : 0;
  load.max_context = max_context_;
  return load;
}

void Scheduler::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ && !thread_.joinable()) return;
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lock(mu_);
  const absl::Status down = absl::UnavailableError("the attention service is shutting down");
  for (auto& seq : running_) Finish(*seq, FinishReason::kError, down);
  for (auto& seq : waiting_) Finish(*seq, FinishReason::kError, down);
  running_.clear();
  waiting_.clear();
  running_count_ = 0;
  live_.clear();
}

void Scheduler::Finish(Sequence& seq, FinishReason reason, absl::Status error) {
  seq.stream->Push(FinishEvent(seq, reason, std::move(error)));
}

SequenceEvent Scheduler::FinishEvent(Sequence& seq, FinishReason reason, absl::Status error) {
  if (seq.cache) seq.cache->Release();  // the KV blocks go back now, not when seq is freed
  if (seq.mtp_cache) seq.mtp_cache->Release();
  SequenceEvent e;
  e.drafted_tokens = seq.step.drafted;
  e.accepted_tokens = seq.step.accepted;
  e.finish = reason;
  e.error = std::move(error);
  e.prompt_tokens = static_cast<int64_t>(seq.request.prompt.size());
  e.completion_tokens = seq.step.generated;
  if (requests_finished_[static_cast<int>(reason)] != nullptr) {
    requests_finished_[static_cast<int>(reason)]->Inc();
  }
  return e;
}

void Scheduler::ReapLocked(std::vector<std::unique_ptr<Sequence>>& finished) {
  const absl::Time now = absl::Now();
  auto reap = [&](std::unique_ptr<Sequence>& seq) {
    if (seq->stream->cancelled()) {
      Finish(*seq, FinishReason::kCancelled, absl::OkStatus());
    } else if (now >= seq->request.deadline) {
      Finish(*seq, FinishReason::kError,
             absl::DeadlineExceededError(absl::StrCat("request ", seq->request.request_id,
                                                      " passed its deadline after ",
                                                      seq->step.generated, " generated tokens")));
    } else {
      return false;
    }
    live_.erase(seq->request.request_id);
    finished.push_back(std::move(seq));
    return true;
  };
  std::erase_if(running_, [&](std::unique_ptr<Sequence>& s) { return reap(s); });
  std::erase_if(waiting_, [&](std::unique_ptr<Sequence>& s) { return reap(s); });
  running_count_ = static_cast<int64_t>(running_.size());
}

void Scheduler::AdmitLocked() {
  while (!waiting_.empty() && static_cast<int64_t>(running_.size()) < options_.max_batch) {
    Sequence& seq = *waiting_.front();
    absl::StatusOr<std::unique_ptr<PagedKvCache>> cache =
        PagedKvCache::Create(pool_.get(), KvBudget(seq.request));
    if (!cache.ok()) break;  // arrival order: the head waits until blocks are freed
    if (stepper_->mtp() && !seq.request.disable_mtp) {
      absl::StatusOr<std::unique_ptr<PagedKvCache>> mtp_cache =
          PagedKvCache::Create(mtp_pool_.get(), KvBudget(seq.request));
      if (!mtp_cache.ok()) break;  // (cannot happen: the pools are allocated alike)
      seq.mtp_cache = *std::move(mtp_cache);
      seq.step.mtp.cache = seq.mtp_cache.get();
    }
    seq.cache = *std::move(cache);
    seq.step.cache = seq.cache.get();
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  running_count_ = static_cast<int64_t>(running_.size());
}

void Scheduler::Loop() {
  while (true) {
    std::vector<std::unique_ptr<Sequence>> finished;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !waiting_.empty() || !running_.empty(); });
      if (stop_) return;
      ReapLocked(finished);
      AdmitLocked();
    }
    finished.clear();
    if (!running_.empty()) Step();
  }
}

void Scheduler::PushTokens(Sequence& seq) {
  SequenceEvent e;
  for (const SampledToken& t : seq.step.emitted) {
    GeneratedToken g{t.token, t.logprob, {}};
    for (const TokenLogprob& alt : t.top_logprobs)
      g.top_logprobs.push_back({alt.token, alt.logprob});
    e.tokens.push_back(std::move(g));
  }
  if (generated_tokens_ != nullptr) {
    generated_tokens_->Inc(static_cast<double>(seq.step.emitted.size()));
  }
  seq.stream->Push(std::move(e));
}

void Scheduler::Step() {
  const size_t n_seq = running_.size();
  std::vector<StepSequence*> batch(n_seq);
  for (size_t i = 0; i < n_seq; ++i) batch[i] = &running_[i]->step;
  std::vector<bool> done(n_seq, false);
  std::vector<std::pair<std::shared_ptr<SequenceStream>, SequenceEvent>> finals;
  auto finish = [&](size_t i, FinishReason reason, absl::Status error) {
    finals.push_back({running_[i]->stream, FinishEvent(*running_[i], reason, std::move(error))});
    done[i] = true;
  };

  // The step itself, with no lock held: Submit/Cancel/Load stay responsive.
  const absl::Time start = absl::Now();
  const absl::StatusOr<StepStats> stats = stepper_->Step(batch);
  if (!stats.ok()) {
    spdlog::warn("step over {} sequences failed: {}", n_seq, stats.status());
    for (size_t i = 0; i < n_seq; ++i) finish(i, FinishReason::kError, stats.status());
  } else {
    if (step_seconds_ != nullptr) {
      step_seconds_->Observe(absl::ToDoubleSeconds(absl::Now() - start));
      batch_tokens_->Observe(static_cast<double>(stats->rows));
      prompt_tokens_->Inc(static_cast<double>(stats->prompt_rows));
      if (stats->verified_drafts) {
        for (int j = 0; j < kMaxDraftTokens; ++j) {
          drafted_tokens_->Inc(static_cast<double>(stats->drafted[j]));
          accepted_tokens_->Inc(static_cast<double>(stats->accepted[j]));
        }
      }
    }
    // Final events are pushed only after the finished sequences left the batch, so a client
    // that saw its finish also sees the load without it.
    for (size_t i = 0; i < n_seq; ++i) {
      Sequence& seq = *running_[i];
      if (!seq.step.emitted.empty()) PushTokens(seq);
      if (seq.step.stop == StopReason::kStop) finish(i, FinishReason::kStop, absl::OkStatus());
      if (seq.step.stop == StopReason::kLength) finish(i, FinishReason::kLength, absl::OkStatus());
    }
  }

  // Drop finished sequences, then tell their clients.
  std::unique_lock<std::mutex> lock(mu_);
  size_t kept = 0;
  for (size_t i = 0; i < n_seq; ++i) {
    if (done[i]) {
      live_.erase(running_[i]->request.request_id);
    } else {
      running_[kept++] = std::move(running_[i]);
    }
  }
  running_.resize(kept);
  running_count_ = static_cast<int64_t>(running_.size());
  lock.unlock();
  for (auto& [stream, event] : finals) stream->Push(std::move(event));
}

}  // namespace expertmesh::attention
