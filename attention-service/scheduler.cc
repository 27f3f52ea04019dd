#include "attention-service/scheduler.h"

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "core/backend/backend.h"
#include "core/base/status.h"
#include "core/text/tokenizer.h"
#include "spdlog/spdlog.h"

namespace expertmesh::attention {

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(const Model* model,
                                                             RoutedExperts* experts,
                                                             const SchedulerOptions& options,
                                                             MetricsRegistry* metrics) {
  if (options.micro_batches < 1 || options.micro_batches > MicroBatchOptions::kMax ||
      options.micro_batch_min_rows < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("scheduler: micro_batches (", options.micro_batches, ") must lie in [1, ",
                     MicroBatchOptions::kMax, "] and micro_batch_min_rows (",
                     options.micro_batch_min_rows, ") be >= 1"));
  }
  if (!options.micro_batch_experts.empty() &&
      std::ssize(options.micro_batch_experts) != options.micro_batches) {
    return absl::InvalidArgumentError(
        absl::StrCat("scheduler: ", options.micro_batch_experts.size(),
                     " micro-batch RoutedExperts for ", options.micro_batches, " micro-batches"));
  }
  if (options.max_batch < 1 || options.max_waiting < 0 || options.prefill_chunk < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scheduler: max_batch (", options.max_batch, ") and prefill_chunk (", options.prefill_chunk,
        ") must be >= 1, max_waiting (", options.max_waiting, ") >= 0"));
  }
  const ModelConfig& c = model->config();
  EM_ASSIGN_OR_RETURN(const DeviceSpec device, ParseDeviceSpec(options.device));
  // On a GPU the pools only hand out block ids: the slots live in the engine's device cache.
  const bool host_kv = !device.cuda;
  const bool drafting = options.mtp && !model->mtp().empty();
  // One pool for the main and the MTP caches: a sequence's MTP rows live in the same block
  // ids as its main rows, so prefix sharing and preemption move both together.
  EM_ASSIGN_OR_RETURN(
      std::unique_ptr<KvBlockPool> pool,
      KvBlockPool::Create(options.kv_blocks, options.kv_block_size, c.num_hidden_layers,
                          c.kv_lora_rank + c.qk_rope_head_dim, host_kv, drafting ? 1 : 0));
  SchedulerOptions with_table = options;
  if (with_table.token_bytes == nullptr && !options.tokenizer_json.empty() &&
      std::filesystem::exists(options.tokenizer_json)) {
    absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::Load(options.tokenizer_json);
    if (!tokenizer.ok()) {
      return absl::Status(
          tokenizer.status().code(),
          absl::StrCat("scheduler: ", options.tokenizer_json,
                       " (JSON mode's token bytes): ", tokenizer.status().message()));
    }
    with_table.token_bytes = std::make_shared<const TokenByteTable>((*tokenizer)->TokenByteTable());
  }
  std::unique_ptr<Scheduler> s(new Scheduler(model, experts, with_table, metrics, std::move(pool)));
  ForwardBackendOptions fo;
  fo.engine = options.engine;
  fo.kv_pages = options.kv_blocks;
  fo.page_size = options.kv_block_size;
  fo.mtp_kv_pages = drafting ? options.kv_blocks : 0;
  // Each micro-batch runs the reference engine on its own thread: CPU only (the GPU engine is
  // one device stream and not reentrant), so on a GPU every step runs unsplit.
  if (options.micro_batches > 1 && device.cuda) {
    spdlog::info("micro-batches: off on {} (the GPU engine runs one forward at a time)",
                 device.text);
  }
  if (options.micro_batches > 1 && !device.cuda) {
    std::vector<RoutedExperts*> lanes = options.micro_batch_experts;
    if (lanes.empty()) lanes.assign(static_cast<size_t>(options.micro_batches), experts);
    MicroBatchOptions mo;
    mo.micro_batches = options.micro_batches;
    mo.min_rows = options.micro_batch_min_rows;
    EM_ASSIGN_OR_RETURN(std::unique_ptr<MicroBatchForwardEngine> micro,
                        MicroBatchForwardEngine::Create(*model, lanes, options.engine, mo));
    spdlog::info(
        "reference engine on the CPU, steps of >= {} rows split into up to {} "
        "ping-pong micro-batches",
        2 * mo.min_rows, mo.micro_batches);
    s->micro_ = micro.get();
    s->forward_ = std::move(micro);
  } else {
    EM_ASSIGN_OR_RETURN(ForwardBackend backend, CreateForwardBackend(*model, experts, device, fo));
    spdlog::info("{}", backend.description);
    s->engine_ = std::move(backend.engine);
    s->forward_ = std::move(backend.forward);
  }
  StepperOptions so;
  so.mtp = options.mtp;
  so.draft_k = options.draft_k;
  so.policy = options.policy;
  so.prefill_chunk = options.prefill_chunk;
  EM_ASSIGN_OR_RETURN(s->stepper_, DecodeStepper::Create(s->forward_.get(), so));
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
    if (options.micro_batches > 1) {
      step_micro_batches_ = &metrics->GetHistogram(
          "expertmesh_attention_step_micro_batches",
          "Micro-batches of one step's main forward (1: too few rows to split)", [&] {
            std::vector<double> b;  // one bucket per count
            for (int k = 1; k <= options.micro_batches; ++k) b.push_back(k);
            return b;
          }());
    }
    preemptions_ = &metrics->GetCounter(
        "expertmesh_attention_preemptions_total",
        "Running sequences preempted when the KV pool ran dry (blocks freed, prefix recomputed)");
    prefix_query_tokens_ =
        &metrics->GetCounter("expertmesh_attention_prefix_cache_queries_tokens_total",
                             "Prompt tokens looked up in the prefix cache at admission");
    prefix_hit_tokens_ =
        &metrics->GetCounter("expertmesh_attention_prefix_cache_hits_tokens_total",
                             "Prompt tokens found in the prefix cache (not computed)");
    Gauge& waiting_tokens =
        metrics->GetGauge("expertmesh_attention_waiting_tokens",
                          "Queue depth in tokens: prompt + max_tokens of the waiting sequences");
    Gauge& cached = metrics->GetGauge("expertmesh_attention_kv_blocks_cached",
                                      "KV blocks registered in the prefix cache");
    Gauge& shared = metrics->GetGauge("expertmesh_attention_kv_blocks_shared",
                                      "KV blocks held by two sequences or more");
    metrics->AddCollector([this, &waiting_tokens, &cached, &shared] {
      const SchedulerLoad load = Load();
      waiting_tokens.Set(static_cast<double>(load.waiting_tokens));
      cached.Set(static_cast<double>(load.kv_blocks_cached));
      shared.Set(static_cast<double>(load.kv_blocks_shared));
    });
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
  if (r.json_object) {
    if (options_.token_bytes == nullptr) {
      return absl::InvalidArgumentError(
          "response_format json_object needs the tokenizer, which this attention service did "
          "not load");
    }
  }
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
  seq->wants_mtp = stepper_->mtp() && !request.disable_mtp && !request.json_object;
  if (request.json_object) {
    // Ends: EOS (unless ignored) and the stop tokens, allowed once the object is complete.
    std::vector<int32_t> ends = request.stop_token_ids;
    const std::optional<int64_t> eos = model_->config().eos_token_id;
    if (eos.has_value() && !request.ignore_eos) ends.push_back(static_cast<int32_t>(*eos));
    seq->constraint = std::make_unique<JsonConstraint>(options_.token_bytes, std::move(ends),
                                                       options_.json_limits);
    step.constraint = seq->constraint.get();
  }
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
    seq->arrival = next_arrival_++;
    EnqueueLocked(std::move(seq));
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
    for (const auto& seq : waiting_) {
      load.waiting_tokens += static_cast<int64_t>(seq->request.prompt.size()) +
                             seq->request.max_tokens - seq->step.generated;
    }
  }
  load.kv_blocks_used = pool_->used_blocks();
  load.kv_blocks_total = pool_->total_blocks();
  load.mtp_kv_blocks_used = pool_->has_mtp() ? load.kv_blocks_used : 0;
  load.kv_blocks_cached = pool_->cached_blocks();
  load.kv_blocks_shared = pool_->shared_blocks();
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
  // The KV blocks go back now, not when seq is freed (its full blocks stay in the prefix cache).
  if (seq.blocks) {
    // After a failed step the caches may hold half-written rows: nothing of them is shared.
    if (reason != FinishReason::kError) RegisterBlocks(seq);
    seq.cache.reset();
    seq.mtp_cache.reset();
    seq.blocks.reset();
  }
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

void Scheduler::EnqueueLocked(std::unique_ptr<Sequence> seq) {
  auto at = std::upper_bound(waiting_.begin(), waiting_.end(), seq,
                             [](const auto& a, const auto& b) { return Before(*a, *b); });
  waiting_.insert(at, std::move(seq));
}

bool Scheduler::TryStart(Sequence& seq) {
  const int64_t bs = pool_->block_size();
  StepSequence& st = seq.step;
  auto table = std::make_unique<BlockTable>(pool_.get());
  // Prefix-cache hits: the leading full blocks whose chained hash is cached, at most up to
  // the last token to prefill (its logits, or its cache entry after a preemption, must be
  // computed). The sequence drafts only when every shared block also carries final MTP rows
  // computed with the same next token (a long shared prefix is worth more than drafting).
  std::vector<uint64_t> hashes;
  bool mtp_rows = true;
  if (options_.prefix_caching) {
    std::vector<int32_t> hit;
    const int64_t lookup_blocks = (st.prompt_len - 1) / bs;
    uint64_t h = 0;
    for (int64_t b = 0; b < lookup_blocks; ++b) {
      h = KvBlockPool::ChainHash(h, std::span<const int32_t>(st.tokens).subspan(
                                        static_cast<size_t>(b * bs), static_cast<size_t>(bs)));
      std::optional<int32_t> block = pool_->Acquire(h);
      if (!block.has_value()) break;
      mtp_rows =
          mtp_rows && pool_->MtpRowsValid(*block, st.tokens[static_cast<size_t>((b + 1) * bs)]);
      hit.push_back(*block);
      hashes.push_back(h);
    }
    table->AdoptShared(std::move(hit));
  }
  const bool drafting = seq.wants_mtp && mtp_rows;
  const int64_t shared = static_cast<int64_t>(hashes.size());
  const int64_t matched = shared * bs;
  // A new sequence needs its first chunk's blocks; a preempted one comes back only when all
  // it had fits again (else it would preempt others at once and thrash). A watermark of
  // free blocks stays while others run.
  const int64_t first = seq.preemptions > 0
                            ? st.prompt_len
                            : matched + std::min(options_.prefill_chunk, st.prompt_len - matched);
  const int64_t watermark =
      running_.empty() ? 0 : std::max<int64_t>(1, pool_->total_blocks() / 100);
  if (pool_->free_blocks() < pool_->BlocksFor(first) - shared + watermark ||
      !table->Reserve(first).ok()) {
    return false;  // the table's destructor gives the acquired blocks back
  }
  seq.blocks = std::move(table);
  seq.cache = std::make_unique<PagedKvCache>(seq.blocks.get(), PagedKvCache::View::kMain, matched);
  st.cache = seq.cache.get();
  st.prefilled = matched;
  st.mtp = MtpSequence{};
  if (drafting) {
    seq.mtp_cache =
        std::make_unique<PagedKvCache>(seq.blocks.get(), PagedKvCache::View::kMtp, matched);
    st.mtp.cache = seq.mtp_cache.get();
  }
  seq.hashes = std::move(hashes);
  seq.mtp_registered = drafting ? seq.hashes.size() : 0;
  if (prefix_query_tokens_ != nullptr && options_.prefix_caching) {
    prefix_query_tokens_->Inc(static_cast<double>(st.prompt_len));
    prefix_hit_tokens_->Inc(static_cast<double>(matched));
  }
  return true;
}

void Scheduler::AdmitLocked() {
  while (!waiting_.empty() && static_cast<int64_t>(running_.size()) < options_.max_batch) {
    // Scheduling order: the head waits until blocks are freed.
    if (!TryStart(*waiting_.front())) break;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  running_count_ = static_cast<int64_t>(running_.size());
}

void Scheduler::RegisterBlocks(Sequence& seq) {
  if (!options_.prefix_caching || !seq.cache) return;
  const int64_t bs = pool_->block_size();
  const StepSequence& st = seq.step;
  const std::vector<int32_t>& blocks = seq.blocks->blocks();
  // The main cache holds every emitted token but the newest: its full blocks are final.
  const size_t full = static_cast<size_t>(seq.cache->length() / bs);
  while (seq.hashes.size() < full) {
    const size_t b = seq.hashes.size();
    const uint64_t previous = b == 0 ? 0 : seq.hashes.back();
    seq.hashes.push_back(KvBlockPool::ChainHash(
        previous, std::span<const int32_t>(st.tokens).subspan(b * static_cast<size_t>(bs),
                                                              static_cast<size_t>(bs))));
    pool_->Register(blocks[b], seq.hashes.back(), std::nullopt);
  }
  if (!seq.mtp_cache || st.mtp.retired) return;
  // MTP rows of a block are final once the module has been fed past the block's end.
  const size_t mtp_full = std::min(full, static_cast<size_t>(seq.mtp_cache->length() / bs));
  for (; seq.mtp_registered < mtp_full; ++seq.mtp_registered) {
    const size_t b = seq.mtp_registered;
    const size_t next = (b + 1) * static_cast<size_t>(bs);
    if (next >= st.tokens.size()) break;
    pool_->Register(blocks[b], seq.hashes[b], st.tokens[next]);
  }
}

void Scheduler::Preempt(Sequence& seq) {
  RegisterBlocks(seq);  // what it computed may be found again when it resumes
  seq.cache.reset();
  seq.mtp_cache.reset();
  seq.blocks.reset();
  StepSequence& st = seq.step;
  st.cache = nullptr;
  st.mtp = MtpSequence{};
  st.prefilled = 0;
  // Recompute: prefill everything but the newest token, which the next decode feeds.
  if (st.generated > 0) st.prompt_len = static_cast<int64_t>(st.tokens.size()) - 1;
  seq.hashes.clear();
  seq.mtp_registered = 0;
  ++seq.preemptions;
  if (preemptions_ != nullptr) preemptions_->Inc();
}

std::vector<std::unique_ptr<Scheduler::Sequence>> Scheduler::ReserveForStep() {
  std::stable_sort(running_.begin(), running_.end(),
                   [](const auto& a, const auto& b) { return Before(*a, *b); });
  std::vector<std::unique_ptr<Sequence>> preempted;
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence& seq = *running_[i];
    const int64_t feed = stepper_->MaxFeed(seq.step);
    // (The MTP cache stays below main length + drafts: covered by the same blocks.)
    while (!seq.blocks->Reserve(seq.cache->length() + feed).ok()) {
      // The last in scheduling order goes, possibly this sequence itself.
      std::unique_ptr<Sequence> victim = std::move(running_.back());
      running_.pop_back();
      Preempt(*victim);
      const bool self = victim.get() == &seq;
      preempted.push_back(std::move(victim));
      if (self) break;
    }
  }
  return preempted;
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
  if (std::vector<std::unique_ptr<Sequence>> preempted = ReserveForStep(); !preempted.empty()) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& seq : preempted) EnqueueLocked(std::move(seq));
    running_count_ = static_cast<int64_t>(running_.size());
  }
  const size_t n_seq = running_.size();
  if (n_seq == 0) return;
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
      if (step_micro_batches_ != nullptr && micro_ != nullptr) {
        step_micro_batches_->Observe(static_cast<double>(micro_->last_split()));
      }
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
      RegisterBlocks(seq);
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
