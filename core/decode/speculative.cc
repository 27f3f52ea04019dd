#include "core/decode/speculative.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_format.h"
#include "core/base/status.h"

namespace expertmesh {

// ---- The acceptance rule -------------------------------------------------------------------

RejectionResult RejectionSample(std::span<const double> p, std::span<const double> q, int32_t draft,
                                const std::function<double()>& uniform) {
  const double pd = p[draft], qd = q[draft];
  if (qd <= 0.0 || uniform() < std::min(1.0, pd / qd)) return {draft, true};
  // Residual: max(0, p - q), normalized. Its mass is 1 - sum(min(p, q)) > 0 here.
  double mass = 0.0;
  for (size_t i = 0; i < p.size(); ++i) mass += std::max(0.0, p[i] - q[i]);
  const double u = uniform() * mass;
  double acc = 0.0;
  int32_t last = draft;
  for (size_t i = 0; i < p.size(); ++i) {
    const double r = std::max(0.0, p[i] - q[i]);
    if (r <= 0.0) continue;
    last = static_cast<int32_t>(i);
    acc += r;
    if (u < acc) return {last, false};
  }
  return {last, false};  // rounding: the last token with residual mass
}

VerifiedToken VerifyDraft(Sampler& sampler, std::span<const float> logits, int32_t draft) {
  const TokenDistribution p = sampler.Distribution(logits);
  int32_t token;
  bool accepted;
  if (sampler.params().temperature == 0.0f) {
    token = p.tokens[0];
    accepted = token == draft;
  } else {
    const double pd = p.Prob(draft);
    if (sampler.Uniform() < pd) {
      token = draft;
      accepted = true;
    } else {
      // p with the draft removed, renormalized (its mass is 1 - pd > 0 here).
      const double u = sampler.Uniform() * (1.0 - pd);
      double acc = 0.0;
      token = -1;
      for (size_t i = 0; i < p.tokens.size(); ++i) {
        if (p.tokens[i] == draft) continue;
        token = p.tokens[i];
        acc += p.probs[i];
        if (u < acc) break;
      }
      accepted = false;
      if (token < 0) {  // the draft was the only candidate: p(d) = 1, reached by rounding
        token = draft;
        accepted = true;
      }
    }
  }
  return {sampler.Emit(logits, token), accepted};
}

Verification VerifyDrafts(Sampler& sampler, std::span<const float> logits,
                          std::span<const int32_t> drafts, int64_t vocab_size) {
  Verification v;
  for (size_t j = 0; j < drafts.size(); ++j) {
    VerifiedToken t = VerifyDraft(sampler, logits.subspan(j * vocab_size, vocab_size), drafts[j]);
    v.tokens.push_back(std::move(t.token));
    if (!t.accepted) return v;
    ++v.accepted;
  }
  v.tokens.push_back(sampler.Sample(logits.subspan(drafts.size() * vocab_size, vocab_size)));
  return v;
}

// ---- The drafter -----------------------------------------------------------------------------

void AppendMtpRows(MtpSequence& seq, std::span<const int32_t> next_tokens,
                   std::span<const float> hidden) {
  if (seq.retired) return;
  if (seq.pending() + std::ssize(next_tokens) > kMaxPendingMtpRows) {
    seq.retired = true;
    seq.next_tokens = {};
    seq.hidden = {};
    return;
  }
  seq.next_tokens.insert(seq.next_tokens.end(), next_tokens.begin(), next_tokens.end());
  seq.hidden.insert(seq.hidden.end(), hidden.begin(), hidden.end());
}

absl::StatusOr<MtpDrafter> MtpDrafter::Create(Engine* engine, int draft_k) {
  auto adapter = std::make_shared<ReferenceForwardEngine>(engine);
  EM_ASSIGN_OR_RETURN(MtpDrafter d, Create(adapter.get(), draft_k));
  d.owned_ = std::move(adapter);
  return d;
}

absl::StatusOr<MtpDrafter> MtpDrafter::Create(ForwardEngine* engine, int draft_k) {
  if (engine->model().mtp().empty()) {
    return absl::FailedPreconditionError(
        "speculative decoding needs the MTP module (num_nextn_predict_layers >= 1, loaded)");
  }
  if (draft_k < 1 || draft_k > kMaxDraftTokens) {
    return absl::InvalidArgumentError(
        absl::StrFormat("draft_k %d must lie in [1, %d]", draft_k, kMaxDraftTokens));
  }
  return MtpDrafter(engine, nullptr, draft_k);
}

absl::Status MtpDrafter::Draft(std::span<MtpSequence* const> seqs, std::span<const int> k,
                               int64_t* mtp_rows) {
  const int64_t D = engine_->model().config().hidden_size;
  int64_t rows = 0;
  // 1. The pending rows of every sequence that has some or wants drafts.
  std::vector<MtpInput> batch;
  std::vector<size_t> which;
  for (size_t i = 0; i < seqs.size(); ++i) {
    MtpSequence& s = *seqs[i];
    s.drafts.clear();
    if (s.retired) continue;
    if (s.pending() == 0) {
      if (k[i] > 0) {
        return absl::FailedPreconditionError("MTP draft without a pending row (no new token)");
      }
      continue;
    }
    batch.push_back(MtpInput{s.next_tokens, s.hidden, s.cache, false});
    which.push_back(i);
    rows += s.pending();
  }
  if (batch.empty()) return absl::OkStatus();
  absl::StatusOr<std::vector<SequenceOutput>> out = engine_->ForwardMtp(batch, 0);
  if (!out.ok()) return out.status();
  // 2. Chained drafts: (d_j, the module's last hidden state) at the next position.
  std::vector<int64_t> committed(seqs.size(), 0);
  std::vector<std::vector<float>> last_hidden(seqs.size());
  std::vector<size_t> active;
  for (size_t b = 0; b < which.size(); ++b) {
    MtpSequence& s = *seqs[which[b]];
    s.next_tokens.clear();
    s.hidden.clear();
    committed[which[b]] = s.cache->length();
    if (k[which[b]] == 0) continue;
    s.drafts.push_back(Argmax((*out)[b].logits));
    const std::vector<float>& h = (*out)[b].hidden;
    last_hidden[which[b]].assign(h.end() - D, h.end());
    if (k[which[b]] > 1) active.push_back(which[b]);
  }
  absl::Status status;
  for (int j = 1; !active.empty(); ++j) {
    batch.clear();
    for (size_t i : active) {
      batch.push_back(MtpInput{std::span<const int32_t>(&seqs[i]->drafts.back(), 1), last_hidden[i],
                               seqs[i]->cache, false});
    }
    rows += std::ssize(active);
    out = engine_->ForwardMtp(batch, 0);
    if (!out.ok()) {
      status = out.status();
      break;
    }
    std::vector<size_t> still;
    for (size_t b = 0; b < active.size(); ++b) {
      const size_t i = active[b];
      seqs[i]->drafts.push_back(Argmax((*out)[b].logits));
      last_hidden[i] = std::move((*out)[b].hidden);
      if (static_cast<int>(seqs[i]->drafts.size()) < k[i]) still.push_back(i);
    }
    active = std::move(still);
  }
  // 3. The chained positions held drafts: drop them.
  for (size_t i : which) {
    if (seqs[i]->cache->length() > committed[i]) seqs[i]->cache->Truncate(committed[i]);
  }
  if (mtp_rows != nullptr) *mtp_rows = rows;
  if (!status.ok()) {
    for (size_t i : which) seqs[i]->drafts.clear();
  }
  return status;
}

// ---- The adaptive policy ---------------------------------------------------------------------

namespace {
constexpr double kCostDecay = 0.1;  // weight of a new observation in the mean
// Acceptance counts fade by exp(-n / kAcceptanceWindow) per n new drafts: the estimate
// follows the last ~64 drafts whatever the batch size.
constexpr double kAcceptanceWindow = 64.0;
// The prior (acceptance 0.5) weighs one draft: a probe while off sees one sequence's drafts
// only, so a heavier prior would take many probes to learn a high acceptance.
constexpr double kPriorDrafts = 1.0;
constexpr int kProbeBurst = 4;         // consecutive steps of a probe while off
constexpr size_t kMaxRowPoints = 128;  // distinct row counts kept
}  // namespace

void RowCostModel::Observe(int64_t rows, double seconds) {
  auto it = mean_.find(rows);
  if (it == mean_.end()) {
    if (mean_.size() >= kMaxRowPoints) {
      // Forget the point farthest from this one; the policy cares about nearby sizes.
      auto far = std::max_element(mean_.begin(), mean_.end(), [&](const auto& a, const auto& b) {
        return std::abs(a.first - rows) < std::abs(b.first - rows);
      });
      mean_.erase(far);
    }
    mean_[rows] = seconds;
  } else {
    // A stalled step (the OS, a shard's hiccup) must not move the mean for long: each
    // observation counts at most 2x / at least 0.5x the current mean.
    const double clamped = std::clamp(seconds, 0.5 * it->second, 2.0 * it->second);
    const double before = it->second;
    it->second += kCostDecay * (clamped - it->second);
    // Every cost drifts together (the context grows, the machine's load changes): the other
    // points keep their ratio to this one, so a point not measured for a while (the verify
    // rows while drafting is off) does not go stale against the fresh ones.
    const double drift = it->second / before;
    for (auto& [r, t] : mean_) {
      if (r != rows) t *= drift;
    }
  }
}

double RowCostModel::Predict(int64_t rows) const {
  if (mean_.empty()) return -1.0;
  auto hi = mean_.lower_bound(rows);
  if (hi != mean_.end() && hi->first == rows) return hi->second;
  if (mean_.size() == 1) {
    const auto& [r, t] = *mean_.begin();
    return t * static_cast<double>(rows) / static_cast<double>(r);
  }
  // Two points to interpolate between (or extrapolate from, at either end).
  std::map<int64_t, double>::const_iterator a, b;
  if (hi == mean_.end()) {
    b = std::prev(hi);
    a = std::prev(b);
  } else if (hi == mean_.begin()) {
    a = hi;
    b = std::next(hi);
  } else {
    a = std::prev(hi);
    b = hi;
  }
  const double slope = (b->second - a->second) / static_cast<double>(b->first - a->first);
  const double t = a->second + slope * static_cast<double>(rows - a->first);
  // A noisy slope must not predict a free (or negative-cost) step.
  return std::max(t, 0.05 * std::min(a->second, b->second));
}

DraftPolicy::DraftPolicy(int draft_k, DraftPolicyOptions options)
    : draft_k_(draft_k), options_(options) {
  for (int j = 0; j < kMaxDraftTokens; ++j) {
    drafted_[j] = kPriorDrafts;
    accepted_[j] = 0.5 * kPriorDrafts;
  }
}

void DraftPolicy::ObserveAcceptance(std::span<const int64_t> drafted,
                                    std::span<const int64_t> accepted) {
  const double n = drafted.empty() ? 0.0 : static_cast<double>(drafted[0]);
  const double decay = std::exp(-n / kAcceptanceWindow);
  for (int j = 0; j < kMaxDraftTokens; ++j) {
    drafted_[j] *= decay;
    accepted_[j] *= decay;
    if (j < std::ssize(drafted)) {
      drafted_[j] += static_cast<double>(drafted[j]);
      accepted_[j] += static_cast<double>(accepted[j]);
    }
  }
}

double DraftPolicy::acceptance_rate(int position) const {
  return drafted_[position] > 0.0 ? accepted_[position] / drafted_[position] : -1.0;
}

double DraftPolicy::PredictedSpeedup(int64_t B, int k) const {
  const double t_plain = main_.Predict(B);
  const double t_verify = main_.Predict(B * (1 + k));
  // The MTP module runs over ~(1 + accepted) pending rows per sequence, then k - 1 chained.
  double expected = 0.0, run = 1.0;
  for (int j = 0; j < k; ++j) {
    const double a = acceptance_rate(j);
    if (a < 0.0) return -1.0;
    run *= a;
    expected += run;
  }
  const double t_mtp = mtp_.Predict(static_cast<int64_t>(std::llround(B * (1.0 + expected)))) +
                       (k - 1) * mtp_.Predict(B);
  if (t_plain <= 0.0 || t_verify <= 0.0 || t_mtp < 0.0) return -1.0;
  return (1.0 + expected) * t_plain / (t_verify + t_mtp);
}

std::string DraftPolicy::Describe(int64_t B, int k) const {
  return absl::StrFormat(
      "B=%d k=%d: T_main(%d rows)=%.3f ms, T_main(%d rows)=%.3f ms, T_mtp(%d rows)=%.3f ms, "
      "acceptance %.3f, predicted %.3fx",
      B, k, B, 1e3 * main_.Predict(B), B * (1 + k), 1e3 * main_.Predict(B * (1 + k)), B,
      1e3 * mtp_.Predict(B), acceptance_rate(0), PredictedSpeedup(B, k));
}

void KeepOneForProbe(const DraftPolicy& policy, std::vector<MtpSequence*>& seqs,
                     std::vector<int>& k) {
  if (!policy.probing()) return;
  int best = -1;
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (k[i] > 0 && !seqs[i]->retired && (best < 0 || seqs[i]->pending() < seqs[best]->pending())) {
      best = static_cast<int>(i);
    }
  }
  if (best < 0) {
    seqs.clear();
    k.clear();
    return;
  }
  seqs = {seqs[best]};
  k = {k[best]};
}

int DraftPolicy::Choose(int64_t B, int64_t pending_rows) {
  probing_ = false;
  if (!options_.adaptive || B == 0) return B == 0 ? 0 : draft_k_;
  if (burst_left_ > 0) {  // the rest of a probe while off: same sequence, next drafts
    --burst_left_;
    probing_ = true;
    return 1;
  }
  // Unmeasured: first the plain step at this B; then, while the costs of drafting cannot
  // be predicted (one main point only, or no MTP point), a probe: drafting for one sequence.
  if (!main_.Observed(B)) return 0;
  // Hysteresis: on takes the margin, staying on half of it (no flapping while the prediction
  // wanders around the margin, no staying on for a gain within the noise).
  int best = 0;
  double best_speedup = on_ ? 1.0 + 0.5 * (options_.margin - 1.0) : options_.margin;
  for (int k = 1; k <= draft_k_; ++k) {
    const double s = PredictedSpeedup(B, k);
    if (s < 0.0 || main_.points() < 2) {
      probing_ = true;
      return 1;
    }
    if (s > best_speedup) {
      best = k;
      best_speedup = s;
    }
  }
  // Every probe_interval steps the other choice, so both step costs (and, while off, the
  // acceptance) stay current.
  // While off, the interval doubles after each probe that confirms it (up to
  // kMaxPendingMtpRows steps): a probe costs the MTP module's catch-up over the skipped rows.
  // Switching on first feeds every sequence's pending rows to the MTP module at once: worth
  // it only when the expected gain over the next probe_interval steps exceeds that catch-up.
  if (best > 0 && !on_ && pending_rows > 0) {
    const double t_plain = main_.Predict(B), t_catch_up = mtp_.Predict(pending_rows);
    if (t_catch_up > options_.probe_interval * t_plain * (1.0 - 1.0 / best_speedup)) best = 0;
  }
  on_ = best > 0;
  if (best > 0) probe_backoff_ = 1;
  if (++steps_since_probe_ >= options_.probe_interval * probe_backoff_) {
    steps_since_probe_ = 0;
    if (best == 0) {
      probe_backoff_ = std::min<int>(
          2 * probe_backoff_, std::max<int>(1, kMaxPendingMtpRows / options_.probe_interval));
    }
    probing_ = best == 0;
    if (probing_) {
      burst_left_ = kProbeBurst - 1;
      return 1;
    }
    // While on: alternately a plain step and, below draft_k, one more draft than chosen (it
    // measures the next position's acceptance and the larger verify, which the choice
    // needs to ever move up).
    explore_deeper_ = !explore_deeper_;
    return explore_deeper_ && best < draft_k_ ? best + 1 : 0;
  }
  return best;
}

}  // namespace expertmesh
