#include "core/decode/step.h"

#include <algorithm>
#include <chrono>

#include "core/base/status.h"
#include "spdlog/spdlog.h"

namespace expertmesh {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::vector<int32_t> TokensOf(std::span<const SampledToken> tokens) {
  std::vector<int32_t> out;
  out.reserve(tokens.size());
  for (const SampledToken& t : tokens) out.push_back(t.token);
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<DecodeStepper>> DecodeStepper::Create(ForwardEngine* engine,
                                                                     StepperOptions options) {
  if (options.prefill_chunk < 1) {
    return absl::InvalidArgumentError("prefill_chunk must be >= 1");
  }
  std::unique_ptr<DecodeStepper> s(new DecodeStepper(engine, options));
  if (options.mtp && !engine->model().mtp().empty()) {
    EM_ASSIGN_OR_RETURN(MtpDrafter drafter, MtpDrafter::Create(engine, options.draft_k));
    s->drafter_ = std::move(drafter);
    s->policy_ = std::make_unique<DraftPolicy>(options.draft_k, options.policy);
  }
  return s;
}

DecodeStepper::DecodeStepper(ForwardEngine* engine, StepperOptions options)
    : engine_(engine),
      options_(options),
      max_context_(engine->model().config().max_position_embeddings),
      vocab_size_(engine->model().config().vocab_size),
      hidden_size_(engine->model().config().hidden_size),
      eos_(engine->model().config().eos_token_id) {}

absl::StatusOr<int> DecodeStepper::Draft(std::span<StepSequence* const> batch) {
  for (StepSequence* seq : batch) seq->mtp.drafts.clear();
  if (!drafter_) return 0;
  int64_t decoding = 0, pending = 0;
  for (const StepSequence* seq : batch) {
    if (seq->prefilling()) continue;
    ++decoding;
    if (seq->drafting() && !seq->mtp.retired) pending += seq->mtp.pending();
  }
  const int k = decoding > 0 ? policy_->Choose(decoding, pending) : 0;
  if (k != last_draft_k_ && decoding > 0 && spdlog::should_log(spdlog::level::debug)) {
    spdlog::debug("draft policy: {} draft(s) per sequence{}; {}", k,
                  policy_->probing() ? " (probe)" : "",
                  policy_->Describe(decoding, std::max(k, 1)));
  }
  if (decoding > 0) last_draft_k_ = k;
  std::vector<MtpSequence*> mtp_seqs;
  std::vector<int> ks;
  for (StepSequence* seq : batch) {
    // A constrained sequence does not draft: its drafts would be verified against unmasked
    // logits.
    if (!seq->drafting() || seq->prefilling() || seq->mtp.retired || seq->constraint != nullptr) {
      continue;
    }
    // A step emits at most k + 1 tokens: no drafts beyond the tokens still wanted or beyond
    // the context (each draft needs a cache slot). No catch-up while drafting is off: a
    // sequence paused for kMaxPendingMtpRows rows retires (AppendMtpRows), so a paused
    // drafter costs nothing.
    const int64_t room = std::min(seq->max_tokens - seq->generated,
                                  max_context_ - static_cast<int64_t>(seq->tokens.size()));
    const int ki = static_cast<int>(std::clamp<int64_t>(room, 0, k));
    if (ki > 0) {
      mtp_seqs.push_back(&seq->mtp);
      ks.push_back(ki);
    }
  }
  KeepOneForProbe(*policy_, mtp_seqs, ks);  // a probe while off drafts for one sequence
  if (!mtp_seqs.empty()) {
    const auto t = Clock::now();
    int64_t rows = 0;
    EM_RETURN_IF_ERROR(drafter_->Draft(mtp_seqs, ks, &rows));
    if (k > 0) policy_->ObserveMtp(rows, Since(t));
  }
  return k;
}

size_t DecodeStepper::Emit(StepSequence& seq, std::span<const SampledToken> tokens) const {
  size_t taken = 0;
  for (const SampledToken& t : tokens) {
    seq.tokens.push_back(t.token);
    seq.emitted.push_back(t);
    ++seq.generated;
    ++taken;
    const bool eos = eos_.has_value() && t.token == *eos_ && !seq.ignore_eos;
    const bool stop_token = std::find(seq.stop_token_ids.begin(), seq.stop_token_ids.end(),
                                      t.token) != seq.stop_token_ids.end();
    if (eos || stop_token) {
      seq.stop = StopReason::kStop;
    } else if (seq.generated >= seq.max_tokens ||
               static_cast<int64_t>(seq.tokens.size()) >= max_context_) {
      seq.stop = StopReason::kLength;
    }
    if (seq.stop != StopReason::kNone) break;
  }
  return taken;
}

void DecodeStepper::FinishPrefillChunk(StepSequence& seq, int64_t start, int64_t n,
                                       const SequenceOutput& out) {
  seq.prefilled += n;
  // The MTP module's rows for these positions: (t[p+1], h[p]).
  std::vector<int32_t> next(seq.tokens.begin() + start + 1, seq.tokens.begin() + start + n);
  if (seq.prefilled == seq.prompt_len &&
      seq.prompt_len == static_cast<int64_t>(seq.tokens.size())) {
    const SampledToken t = SampleOne(seq, out.logits);
    Emit(seq, std::span<const SampledToken>(&t, 1));
    next.push_back(t.token);
  } else {  // more prompt to come, or a recomputed prefix whose next token is known
    next.push_back(seq.tokens[static_cast<size_t>(start + n)]);
  }
  if (seq.drafting() && seq.stop == StopReason::kNone) AppendMtpRows(seq.mtp, next, out.hidden);
}

SampledToken DecodeStepper::SampleOne(StepSequence& seq, std::span<const float> logits) {
  if (seq.constraint == nullptr) return seq.sampler->Sample(logits);
  masked_.assign(logits.begin(), logits.end());
  seq.constraint->Mask(masked_);
  SampledToken t = seq.sampler->Sample(masked_);
  seq.constraint->Accept(t.token);
  return t;
}

void DecodeStepper::FinishDecode(StepSequence& seq, int64_t start, const SequenceOutput& out,
                                 StepStats& stats) {
  const std::vector<int32_t>& drafts = seq.mtp.drafts;
  Verification v;
  if (seq.constraint != nullptr) {  // never drafts (Draft skips it): one masked sample
    v.tokens.push_back(SampleOne(seq, std::span<const float>(out.logits).first(vocab_size_)));
  } else {
    v = VerifyDrafts(*seq.sampler, out.logits, drafts, vocab_size_);
  }
  for (size_t j = 0; j < drafts.size(); ++j) {
    ++stats.drafted[j];
    if (static_cast<int>(j) < v.accepted) ++stats.accepted[j];
  }
  seq.drafted += static_cast<int64_t>(drafts.size());
  seq.accepted += v.accepted;
  const size_t taken = Emit(seq, v.tokens);
  // The cache keeps every emitted token but the newest (as without drafting).
  seq.cache->Truncate(start + static_cast<int64_t>(taken));
  if (seq.drafting() && seq.stop == StopReason::kNone) {
    AppendMtpRows(seq.mtp, TokensOf(v.tokens),
                  std::span<const float>(out.hidden).first((v.accepted + 1) * hidden_size_));
  }
}

int64_t DecodeStepper::MaxFeed(const StepSequence& seq) const {
  if (seq.prefilling()) return std::min(options_.prefill_chunk, seq.prompt_len - seq.prefilled);
  return 1 + (drafter_ && seq.drafting() ? options_.draft_k : 0);
}

absl::StatusOr<StepStats> DecodeStepper::Step(std::span<StepSequence* const> batch) {
  StepStats stats;
  for (StepSequence* seq : batch) {
    seq->emitted.clear();
    seq->stop = StopReason::kNone;
  }
  // 1. Drafts.
  EM_ASSIGN_OR_RETURN(stats.draft_k, Draft(batch));

  // 2. The main forward.
  const size_t n = batch.size();
  inputs_.resize(std::max(inputs_.size(), n));
  std::vector<SequenceInput> inputs(n);
  std::vector<int64_t> starts(n);
  for (size_t i = 0; i < n; ++i) {
    StepSequence& seq = *batch[i];
    std::vector<int32_t>& in = inputs_[i];
    starts[i] = seq.cache->length();
    if (seq.prefilling()) {
      const int64_t chunk = MaxFeed(seq);
      in.assign(seq.tokens.begin() + seq.prefilled, seq.tokens.begin() + seq.prefilled + chunk);
      stats.prompt_rows += chunk;
    } else {
      in.assign(1, seq.tokens.back());
      in.insert(in.end(), seq.mtp.drafts.begin(), seq.mtp.drafts.end());
      stats.verified_drafts |= !seq.mtp.drafts.empty();
    }
    inputs[i] = SequenceInput{in, seq.cache, !seq.mtp.drafts.empty()};
    stats.rows += static_cast<int64_t>(in.size());
  }
  const auto t = Clock::now();
  EM_ASSIGN_OR_RETURN(std::vector<SequenceOutput> out, engine_->Forward(inputs));
  stats.forward_seconds = Since(t);
  if (drafter_) policy_->ObserveMain(stats.rows, stats.forward_seconds);

  // 3. Sample or verify, emit, roll back.
  for (size_t i = 0; i < n; ++i) {
    StepSequence& seq = *batch[i];
    if (seq.prefilling()) {
      FinishPrefillChunk(seq, starts[i], static_cast<int64_t>(inputs_[i].size()), out[i]);
    } else {
      FinishDecode(seq, starts[i], out[i], stats);
    }
  }
  if (drafter_ && stats.verified_drafts) policy_->ObserveAcceptance(stats.drafted, stats.accepted);
  return stats;
}

}  // namespace expertmesh
