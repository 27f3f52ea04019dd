#include "attention-service/scheduler.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "core/kernel_plan.h"
#include "spdlog/spdlog.h"
#if EXPERTMESH_HAVE_CUDA
#include "core/cuda/cuda_engine.h"
#endif

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
  absl::StatusOr<DeviceSpec> device = ParseDeviceSpec(options.device);
  if (!device.ok()) return device.status();
  // On a GPU the pools only hand out block ids: the slots live in the engine's device cache.
  const bool host_kv = !device->cuda;
  absl::StatusOr<std::unique_ptr<KvBlockPool>> pool =
      KvBlockPool::Create(options.kv_blocks, options.kv_block_size, c.num_hidden_layers,
                          c.kv_lora_rank + c.qk_rope_head_dim, host_kv);
  if (!pool.ok()) return pool.status();
  std::unique_ptr<Scheduler> s(new Scheduler(model, experts, options, metrics, *std::move(pool)));
  const bool drafting = options.mtp && !model->mtp().empty();
  if (device->cuda) {
#if EXPERTMESH_HAVE_CUDA
    cuda::CudaEngineOptions co;
    co.devices = device->devices;
    co.kv_pages = options.kv_blocks;
    co.page_size = options.kv_block_size;
    co.mtp_kv_pages = drafting ? options.kv_blocks : 0;
    co.engine = options.engine;
    absl::StatusOr<std::unique_ptr<cuda::CudaEngine>> gpu =
        cuda::CudaEngine::Create(*model, experts, co);
    if (!gpu.ok()) {
      return absl::Status(gpu.status().code(),
                          absl::StrCat("--device ", options.device, ": ", gpu.status().message()));
    }
    spdlog::info("GPU engine on {}: tensor parallel over {} device(s), {} MiB on the devices",
                 options.device, (*gpu)->tp_size(), (*gpu)->device_bytes() >> 20);
    s->forward_ = *std::move(gpu);
#else
    return absl::FailedPreconditionError(
        absl::StrCat("--device ", options.device,
                     ": this attention-service was built without CUDA (EXPERTMESH_CUDA)"));
#endif
  } else {
    absl::StatusOr<std::unique_ptr<Engine>> engine =
        Engine::Create(*model, experts, options.engine);
    if (!engine.ok()) return engine.status();
    s->engine_ = *std::move(engine);
    s->forward_ = std::make_unique<ReferenceForwardEngine>(s->engine_.get());
  }
  if (drafting) {
    absl::StatusOr<MtpDrafter> drafter = MtpDrafter::Create(s->forward_.get(), options.draft_k);
    if (!drafter.ok()) return drafter.status();
    s->drafter_ = *std::move(drafter);
    s->policy_ = std::make_unique<DraftPolicy>(options.draft_k, options.policy);
    // The MTP caches: one layer each, as many token slots as the main pool, so a sequence
    // that got its main blocks always gets its MTP blocks.
    absl::StatusOr<std::unique_ptr<KvBlockPool>> mtp_pool = KvBlockPool::Create(
        options.kv_blocks, options.kv_block_size, 1, c.kv_lora_rank + c.qk_rope_head_dim, host_kv);
    if (!mtp_pool.ok()) return mtp_pool.status();
    s->mtp_pool_ = *std::move(mtp_pool);
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

int64_t Scheduler::KvBudget(const GenerationRequest& r) const {
  // Every token fed to the model needs a slot: the prompt and all generated tokens but the
  // last; the context bounds the total.
  return std::min<int64_t>(static_cast<int64_t>(r.prompt.size()) + r.max_tokens, max_context_);
}

absl::Status Scheduler::Validate(const GenerationRequest& r) const {
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

absl::StatusOr<std::shared_ptr<SequenceStream>> Scheduler::Submit(GenerationRequest request) {
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
  seq->tokens = request.prompt;
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
  e.drafted_tokens = seq.drafted;
  e.accepted_tokens = seq.accepted;
  e.finish = reason;
  e.error = std::move(error);
  e.prompt_tokens = static_cast<int64_t>(seq.request.prompt.size());
  e.completion_tokens = seq.generated;
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
                                                      " passed its deadline after ", seq->generated,
                                                      " generated tokens")));
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
    if (drafter_ && !seq.request.disable_mtp) {
      absl::StatusOr<std::unique_ptr<PagedKvCache>> mtp_cache =
          PagedKvCache::Create(mtp_pool_.get(), KvBudget(seq.request));
      if (!mtp_cache.ok()) break;  // (cannot happen: the pools are allocated alike)
      seq.mtp_cache = *std::move(mtp_cache);
      seq.mtp.cache = seq.mtp_cache.get();
    }
    seq.cache = *std::move(cache);
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

size_t Scheduler::Emit(Sequence& seq, std::span<const SampledToken> tokens, FinishReason* finish) {
  const ModelConfig& c = model_->config();
  SequenceEvent e;
  size_t taken = 0;
  for (const SampledToken& t : tokens) {
    seq.tokens.push_back(t.token);
    ++seq.generated;
    ++taken;
    GeneratedToken g{t.token, t.logprob, {}};
    for (const TokenLogprob& alt : t.top_logprobs)
      g.top_logprobs.push_back({alt.token, alt.logprob});
    e.tokens.push_back(std::move(g));
    const bool eos = c.eos_token_id.has_value() && t.token == *c.eos_token_id;
    const std::vector<int32_t>& stop = seq.request.stop_token_ids;
    if ((eos && !seq.request.ignore_eos) ||
        std::find(stop.begin(), stop.end(), t.token) != stop.end()) {
      *finish = FinishReason::kStop;
    } else if (seq.generated >= seq.request.max_tokens ||
               static_cast<int64_t>(seq.tokens.size()) >= max_context_) {
      *finish = FinishReason::kLength;
    }
    if (*finish != FinishReason::kNone) break;
  }
  if (generated_tokens_ != nullptr) generated_tokens_->Inc(static_cast<double>(taken));
  seq.stream->Push(std::move(e));
  return taken;
}

void Scheduler::Step() {
  const ModelConfig& c = model_->config();
  const int64_t V = c.vocab_size, D = c.hidden_size;
  const size_t n_seq = running_.size();
  std::vector<bool> done(n_seq, false);
  std::vector<std::pair<std::shared_ptr<SequenceStream>, SequenceEvent>> finals;
  auto finish = [&](size_t i, FinishReason reason, absl::Status error) {
    finals.push_back({running_[i]->stream, FinishEvent(*running_[i], reason, std::move(error))});
    done[i] = true;
  };
  const absl::Time start = absl::Now();

  // 1. Drafts for the decoding sequences (feeding their pending rows to the MTP module first).
  absl::Status status;
  int k = 0;
  if (drafter_) {
    int64_t decoding = 0, pending = 0;
    for (const auto& seq : running_) {
      if (seq->prefilled < seq->prompt_len()) continue;
      ++decoding;
      if (seq->drafting() && !seq->mtp.retired) pending += seq->mtp.pending();
    }
    k = decoding > 0 ? policy_->Choose(decoding, pending) : 0;
    if (k != last_draft_k_ && spdlog::should_log(spdlog::level::debug)) {
      spdlog::debug("draft policy: {} draft(s) per sequence{}; {}", k,
                    policy_->probing() ? " (probe)" : "",
                    policy_->Describe(decoding, std::max(k, 1)));
    }
    last_draft_k_ = k;
    std::vector<MtpSequence*> mtp_seqs;
    std::vector<int> ks;
    for (auto& sp : running_) {
      Sequence& seq = *sp;
      seq.mtp.drafts.clear();
      if (!seq.drafting() || seq.prefilled < seq.prompt_len()) continue;
      // A step emits at most k + 1 tokens: no drafts beyond the tokens still wanted or
      // beyond the context (the cache budget covers exactly that).
      const int64_t room = std::min(seq.request.max_tokens - seq.generated,
                                    max_context_ - static_cast<int64_t>(seq.tokens.size()));
      const int ki = static_cast<int>(std::clamp<int64_t>(room, 0, k));
      // No catch-up while drafting is off: a sequence paused for kMaxPendingMtpRows rows
      // retires (AppendMtpRows), so a paused drafter costs nothing, as in core/generate.
      if (ki > 0) {
        mtp_seqs.push_back(&seq.mtp);
        ks.push_back(ki);
      }
    }
    KeepOneForProbe(*policy_, mtp_seqs, ks);  // a probe while off drafts for one sequence
    if (!mtp_seqs.empty()) {
      const absl::Time t = absl::Now();
      int64_t rows = 0;
      status = drafter_->Draft(mtp_seqs, ks, &rows);
      if (status.ok() && k > 0) policy_->ObserveMtp(rows, absl::ToDoubleSeconds(absl::Now() - t));
    }
  }

  // 2. The main forward: the next prompt chunk of sequences still prefilling; the last
  // token and its drafts for the others. No lock held: Submit/Cancel/Load stay responsive.
  std::vector<std::vector<int32_t>> inputs(n_seq);
  std::vector<SequenceInput> batch(n_seq);
  std::vector<int64_t> starts(n_seq);
  int64_t n_tokens = 0, n_prompt = 0;
  bool any_drafts = false;
  for (size_t i = 0; i < n_seq; ++i) {
    Sequence& seq = *running_[i];
    starts[i] = seq.cache->length();
    if (seq.prefilled < seq.prompt_len()) {
      const int64_t n = std::min(options_.prefill_chunk, seq.prompt_len() - seq.prefilled);
      inputs[i].assign(seq.tokens.begin() + seq.prefilled, seq.tokens.begin() + seq.prefilled + n);
      n_prompt += n;
    } else {
      inputs[i].assign(1, seq.tokens.back());
      inputs[i].insert(inputs[i].end(), seq.mtp.drafts.begin(), seq.mtp.drafts.end());
      any_drafts |= !seq.mtp.drafts.empty();
    }
    batch[i] = SequenceInput{inputs[i], seq.cache.get(), !seq.mtp.drafts.empty()};
    n_tokens += static_cast<int64_t>(inputs[i].size());
  }
  absl::StatusOr<std::vector<SequenceOutput>> out = absl::UnknownError("not run");
  if (status.ok()) {
    const absl::Time t = absl::Now();
    out = forward_->Forward(batch);
    if (out.ok() && drafter_) {
      policy_->ObserveMain(n_tokens, absl::ToDoubleSeconds(absl::Now() - t));
    }
  } else {
    out = status;  // the drafts failed (an MTP layer's dispatch)
  }
  if (step_seconds_ != nullptr) {
    step_seconds_->Observe(absl::ToDoubleSeconds(absl::Now() - start));
    batch_tokens_->Observe(static_cast<double>(n_tokens));
  }

  // 3. Verify, sample, stream, roll back. Final events are pushed only after the finished
  // sequences left the batch, so a client that saw its finish also sees the load without it.
  if (!out.ok()) {
    spdlog::warn("step over {} sequences ({} tokens) failed: {}", n_seq, n_tokens,
                 out.status().ToString());
    for (size_t i = 0; i < n_seq; ++i) finish(i, FinishReason::kError, out.status());
  } else {
    if (prompt_tokens_ != nullptr) prompt_tokens_->Inc(static_cast<double>(n_prompt));
    int64_t drafted[kMaxDraftTokens] = {}, accepted[kMaxDraftTokens] = {};
    for (size_t i = 0; i < n_seq; ++i) {
      Sequence& seq = *running_[i];
      const SequenceOutput& o = (*out)[i];
      FinishReason reason = FinishReason::kNone;
      if (seq.prefilled < seq.prompt_len()) {
        const int64_t n = static_cast<int64_t>(inputs[i].size());
        seq.prefilled += n;
        const bool last_chunk = seq.prefilled == seq.prompt_len();
        std::vector<int32_t> next(seq.tokens.begin() + starts[i] + 1,
                                  seq.tokens.begin() + starts[i] + n);  // t[p+1] in the chunk
        if (last_chunk) {
          const SampledToken t = seq.sampler->Sample(o.logits);
          Emit(seq, std::span<const SampledToken>(&t, 1), &reason);
          next.push_back(t.token);
        } else {
          next.push_back(seq.tokens[static_cast<size_t>(starts[i] + n)]);
        }
        if (seq.drafting() && reason == FinishReason::kNone) AppendMtpRows(seq.mtp, next, o.hidden);
      } else {
        const std::vector<int32_t>& drafts = seq.mtp.drafts;
        const Verification v = VerifyDrafts(*seq.sampler, o.logits, drafts, V);
        for (size_t j = 0; j < drafts.size(); ++j) {
          ++drafted[j];
          if (static_cast<int>(j) < v.accepted) ++accepted[j];
        }
        seq.drafted += static_cast<int64_t>(drafts.size());
        seq.accepted += v.accepted;
        const size_t taken = Emit(seq, v.tokens, &reason);
        // The cache keeps every emitted token but the newest (as without drafting).
        seq.cache->Truncate(starts[i] + static_cast<int64_t>(taken));
        if (seq.drafting() && reason == FinishReason::kNone) {
          std::vector<int32_t> next;
          for (const SampledToken& t : v.tokens) next.push_back(t.token);
          AppendMtpRows(seq.mtp, next,
                        std::span<const float>(o.hidden).first((v.accepted + 1) * D));
        }
      }
      if (reason != FinishReason::kNone) finish(i, reason, absl::OkStatus());
    }
    if (drafter_ && any_drafts) {
      policy_->ObserveAcceptance(drafted, accepted);
      if (drafted_tokens_ != nullptr) {
        for (int j = 0; j < kMaxDraftTokens; ++j) {
          drafted_tokens_->Inc(static_cast<double>(drafted[j]));
          accepted_tokens_->Inc(static_cast<double>(accepted[j]));
        }
      }
    }
  }

  // 4. Drop finished sequences, then tell their clients.
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
