#include "core/generate.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_format.h"

namespace expertmesh {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

struct Seq {
  const GenerateRequest* request = nullptr;
  std::unique_ptr<Sampler> sampler;
  MtpSequence mtp;
  int32_t last = 0;    // the newest token, not yet in the main cache
  int64_t length = 0;  // prompt + emitted tokens
  bool done = false;
  GenerateResult result;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Generator>> Generator::Create(Engine* engine,
                                                             GeneratorOptions options) {
  std::unique_ptr<Generator> g(new Generator(engine, options));
  if (options.mtp && !engine->model().mtp().empty()) {
    absl::StatusOr<MtpDrafter> drafter = MtpDrafter::Create(engine, options.draft_k);
    if (!drafter.ok()) return drafter.status();
    g->drafter_ = *std::move(drafter);
    g->policy_ = std::make_unique<DraftPolicy>(options.draft_k, options.policy);
  }
  return g;
}

absl::StatusOr<std::vector<GenerateResult>> Generator::Generate(
    std::span<const GenerateRequest> requests, GenerateStats* stats,
    const TokenCallback& on_tokens) {
  const ModelConfig& c = engine_->model().config();
  const int64_t V = c.vocab_size, D = c.hidden_size;
  const int64_t max_context = c.max_position_embeddings;
  GenerateStats local;
  GenerateStats& st = stats != nullptr ? *stats : local;
  st = {};
  const size_t n = requests.size();
  std::vector<Seq> seqs(n);
  caches_.clear();
  mtp_caches_.clear();
  for (size_t i = 0; i < n; ++i) {
    const GenerateRequest& r = requests[i];
    if (r.prompt.empty() || r.max_tokens < 1 ||
        static_cast<int64_t>(r.prompt.size()) >= max_context) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "request %d: needs a prompt shorter than the context (%d) and max_tokens >= 1", i,
          max_context));
    }
    absl::StatusOr<Sampler> sampler = Sampler::Create(r.sampling);
    if (!sampler.ok()) return sampler.status();
    seqs[i].request = &r;
    seqs[i].sampler = std::make_unique<Sampler>(*std::move(sampler));
    caches_.push_back(engine_->NewCache());
    if (mtp()) {
      mtp_caches_.push_back(engine_->NewMtpCache());
      seqs[i].mtp.cache = mtp_caches_.back().get();
    }
  }
  // Emits tokens until the sequence ends; returns how many were taken.
  auto emit = [&](size_t i, std::span<const SampledToken> tokens) {
    Seq& s = seqs[i];
    size_t taken = 0;
    for (const SampledToken& t : tokens) {
      s.result.tokens.push_back(t);
      ++s.length;
      ++taken;
      const GenerateRequest& r = *s.request;
      const bool eos = c.eos_token_id.has_value() && t.token == *c.eos_token_id && !r.ignore_eos;
      const bool stop = std::find(r.stop_token_ids.begin(), r.stop_token_ids.end(), t.token) !=
                        r.stop_token_ids.end();
      if (eos || stop || std::ssize(s.result.tokens) >= r.max_tokens || s.length >= max_context) {
        s.done = true;
        break;
      }
    }
    s.last = s.result.tokens.back().token;
    if (on_tokens) on_tokens(i, tokens.first(taken));
    return taken;
  };

  // Prefill: every prompt at once.
  const auto t_prefill = Clock::now();
  {
    std::vector<SequenceInput> batch(n);
    for (size_t i = 0; i < n; ++i) {
      batch[i] = SequenceInput{requests[i].prompt, caches_[i].get(), false};
      seqs[i].length = std::ssize(requests[i].prompt);
    }
    const auto t_main = Clock::now();
    absl::StatusOr<std::vector<SequenceOutput>> out = engine_->Forward(batch);
    if (!out.ok()) return out.status();
    if (mtp()) {
      int64_t rows = 0;
      for (const GenerateRequest& r : requests) rows += std::ssize(r.prompt);
      policy_->ObserveMain(rows, Since(t_main));
    }
    for (size_t i = 0; i < n; ++i) {
      const SampledToken t = seqs[i].sampler->Sample((*out)[i].logits);
      emit(i, std::span<const SampledToken>(&t, 1));
      if (mtp() && !seqs[i].done) {
        // MTP rows for every prompt position: t[i+1] is the next prompt token, then t.
        std::vector<int32_t> next(requests[i].prompt.begin() + 1, requests[i].prompt.end());
        next.push_back(t.token);
        AppendMtpRows(seqs[i].mtp, next, (*out)[i].hidden);
      }
    }
  }
  st.prefill_seconds = Since(t_prefill);

  const auto t_decode = Clock::now();
  std::vector<size_t> active;
  std::vector<MtpSequence*> mtp_seqs;
  std::vector<int> ks;
  std::vector<SequenceInput> batch;
  std::vector<std::vector<int32_t>> inputs(n);
  while (true) {
    active.clear();
    for (size_t i = 0; i < n; ++i) {
      if (!seqs[i].done) active.push_back(i);
    }
    if (active.empty()) break;
    const int64_t B = std::ssize(active);

    // 1. Drafts (and MTP catch-up of sequences with many pending rows).
    int64_t pending = 0;
    for (size_t i : active) pending += seqs[i].mtp.retired ? 0 : seqs[i].mtp.pending();
    int k = mtp() ? policy_->Choose(B, pending) : 0;
    if (mtp()) {
      mtp_seqs.clear();
      ks.clear();
      for (size_t i : active) {
        Seq& s = seqs[i];
        // Room: drafts beyond the tokens still wanted are wasted, and each needs a cache
        // slot inside the context (a step emits at most k + 1 tokens; extra ones are cut).
        const int64_t room =
            std::min(s.request->max_tokens - std::ssize(s.result.tokens), max_context - s.length);
        const int ki = static_cast<int>(std::clamp<int64_t>(room, 0, k));
        if (ki > 0 && !s.mtp.retired) {
          mtp_seqs.push_back(&s.mtp);
          ks.push_back(ki);
        }
        s.mtp.drafts.clear();
      }
      KeepOneForProbe(*policy_, mtp_seqs, ks);
      if (!mtp_seqs.empty()) {
        const auto t_mtp = Clock::now();
        int64_t rows = 0;
        if (absl::Status d = drafter_->Draft(mtp_seqs, ks, &rows); !d.ok()) return d;
        if (k > 0) policy_->ObserveMtp(rows, Since(t_mtp));
      }
    }

    // 2. The main forward: [last, drafts...] per sequence.
    batch.clear();
    int64_t rows = 0;
    bool any_drafts = false;
    for (size_t i : active) {
      Seq& s = seqs[i];
      inputs[i].assign(1, s.last);
      inputs[i].insert(inputs[i].end(), s.mtp.drafts.begin(), s.mtp.drafts.end());
      any_drafts |= !s.mtp.drafts.empty();
      batch.push_back(SequenceInput{inputs[i], caches_[i].get(), !s.mtp.drafts.empty()});
      rows += std::ssize(inputs[i]);
    }
    const auto t_main = Clock::now();
    absl::StatusOr<std::vector<SequenceOutput>> out = engine_->Forward(batch);
    if (!out.ok()) return out.status();
    if (mtp()) policy_->ObserveMain(rows, Since(t_main));
    ++st.decode_steps;
    if (any_drafts) ++st.draft_steps;

    // 3. Verify, emit, roll back.
    int64_t drafted[kMaxDraftTokens] = {}, accepted[kMaxDraftTokens] = {};
    for (size_t b = 0; b < active.size(); ++b) {
      Seq& s = seqs[active[b]];
      const std::vector<int32_t>& drafts = s.mtp.drafts;
      const int64_t start = caches_[active[b]]->length() - std::ssize(inputs[active[b]]);
      const Verification v = VerifyDrafts(*s.sampler, (*out)[b].logits, drafts, V);
      for (size_t j = 0; j < drafts.size(); ++j) {
        ++drafted[j];
        if (static_cast<int>(j) < v.accepted) ++accepted[j];
      }
      s.result.drafted += std::ssize(drafts);
      s.result.accepted += v.accepted;
      const size_t taken = emit(active[b], v.tokens);
      // The cache keeps every emitted token but the newest (as without drafting).
      caches_[active[b]]->Truncate(start + static_cast<int64_t>(taken));
      st.decode_tokens += static_cast<int64_t>(taken);
      if (mtp() && !s.done) {
        std::vector<int32_t> next;
        for (const SampledToken& t : v.tokens) next.push_back(t.token);
        AppendMtpRows(s.mtp, next,
                      std::span<const float>((*out)[b].hidden).first((v.accepted + 1) * D));
      }
    }
    if (mtp() && any_drafts) policy_->ObserveAcceptance(drafted, accepted);
  }
  st.decode_seconds = Since(t_decode);
  std::vector<GenerateResult> results;
  for (Seq& s : seqs) {
    st.drafted += s.result.drafted;
    st.accepted += s.result.accepted;
    results.push_back(std::move(s.result));
  }
  return results;
}

}  // namespace expertmesh
