// Speculative decoding with DeepSeek-V3's multi-token-prediction (MTP) module, shared by the
// in-process generator (core/decode/generate.h) and the attention service's scheduler.
//
// One step of a sequence whose main KV cache holds positions [0, L) and whose next token
// t[L] is already sampled:
//   1. Draft. The MTP module at position i reads (t[i+1], h[i]) -- h the main model's hidden
//      state after the final norm (SequenceOutput::hidden), as vLLM, SGLang and TensorRT-LLM
//      feed DeepSeek's released weights -- and predicts t[i+2]. Its own 1-layer KV cache lags
//      behind the main one by the rows not yet fed to it (pending rows: fed lazily, so a paused
//      drafter costs nothing per step). Feeding the pending rows up to position L-1 yields draft d1
//      (the argmax, a deterministic draft); for k > 1 the same module is reused, as SGLang does:
//      (d_j, its own last hidden state, after its shared_head.norm as SGLang's NextN module
//      returns it) at the next position yields d_{j+1}. Those chained
//      entries are dropped from the MTP cache right after (they hold drafts, not the truth).
//   2. Verify. The main forward takes [t[L], d1..dk] with logits at every position. Position
//      j accepts d_{j+1} (VerifyDrafts): greedy when it equals the argmax; with temperature
//      by rejection sampling, which keeps the sampling distribution exactly. The first
//      rejection emits the corrected token; when all k are accepted the last position's
//      logits give one more (bonus) token. So a step emits accepted + 1 tokens.
//   3. Roll back. The main cache is truncated to L + accepted + 1 positions; the retained
//      positions' hidden states and their next tokens become the MTP module's pending rows.
//
// Greedy output with drafting is token for token the output without it (every row of a
// forward is computed alone, whatever else is in the batch), and both caches end equal to
// those of a run without drafting.
//
// DraftPolicy decides per step whether drafting pays at the current batch size, from the
// measured acceptance and the measured cost of a step as a function of its rows.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/decode/sampling.h"
#include "core/engine/engine.h"
#include "core/engine/forward_engine.h"
#include "core/engine/kv_cache.h"

namespace expertmesh {

inline constexpr int kMaxDraftTokens = 4;
// A sequence whose MTP module has fallen more than this many rows behind (drafting paused
// that long) stops drafting for good: its pending rows are dropped, so a paused drafter
// costs neither time (no catch-up) nor unbounded memory.
inline constexpr int64_t kMaxPendingMtpRows = 256;

// ---- The acceptance rule -------------------------------------------------------------------

struct RejectionResult {
  int32_t token = 0;
  bool accepted = false;  // token is the draft
};

// The general rule for a draft d ~ q against the target p (both [vocab], each summing to 1):
// accept d with probability min(1, p(d) / q(d)); otherwise sample from
// normalize(max(0, p - q)). The emitted token is distributed exactly as p.
// `uniform` returns draws in [0, 1).
RejectionResult RejectionSample(std::span<const double> p, std::span<const double> q, int32_t draft,
                                const std::function<double()>& uniform);

// The same rule for a deterministic draft (q one-hot at d), against the sampler's
// distribution p for `logits` [vocab]: accept with probability p(d), else sample from p with
// d removed and renormalized. Greedy (temperature 0): accept iff d is the argmax; no random
// draws. The emitted token is recorded in the sampler (penalties) and reported with its
// logprobs as Sampler::Sample reports them.
struct VerifiedToken {
  SampledToken token;
  bool accepted = false;
};
VerifiedToken VerifyDraft(Sampler& sampler, std::span<const float> logits, int32_t draft);

// A whole verification: logits [drafts.size() + 1, vocab] from the forward of
// [t[L], d1..dk]. Returns the emitted tokens (accepted drafts, then the correction or the
// bonus token): accepted + 1 of them.
struct Verification {
  std::vector<SampledToken> tokens;
  int accepted = 0;
};
Verification VerifyDrafts(Sampler& sampler, std::span<const float> logits,
                          std::span<const int32_t> drafts, int64_t vocab_size);

// ---- The drafter -----------------------------------------------------------------------------

// One sequence's MTP state. The caller owns the MTP cache (Engine::NewMtpCache, or paged).
struct MtpSequence {
  MlaKvCache* cache = nullptr;       // the MTP module's cache: 1 layer
  std::vector<int32_t> next_tokens;  // pending rows: t[i+1] ...
  std::vector<float> hidden;         // ... and h[i]: [pending, hidden_size]
  std::vector<int32_t> drafts;       // drafted tokens, verified by the next main forward
  bool retired = false;              // fell kMaxPendingMtpRows behind: never drafts again
  int64_t pending() const { return static_cast<int64_t>(next_tokens.size()); }
};

// Rows the main model produced: hidden [n, hidden_size] at n positions whose next tokens are
// next_tokens [n]. They become the MTP module's pending rows (dropped once retired).
void AppendMtpRows(MtpSequence& seq, std::span<const int32_t> next_tokens,
                   std::span<const float> hidden);

class MtpDrafter {
 public:
  // The engine's model must carry an MTP module (num_nextn_predict_layers >= 1, loaded).
  // draft_k in [1, kMaxDraftTokens]. `engine` must outlive the drafter.
  static absl::StatusOr<MtpDrafter> Create(Engine* engine, int draft_k);
  // The same over any ForwardEngine (the GPU engine in the attention service).
  static absl::StatusOr<MtpDrafter> Create(ForwardEngine* engine, int draft_k);

  int draft_k() const { return draft_k_; }
  // Feeds each sequence's pending rows to the MTP module, then drafts k[i] tokens for
  // sequence i into seqs[i]->drafts (k[i] = 0: only feeds). Sequences without pending rows
  // and k = 0, and retired sequences, are skipped (no drafts). On return every MTP cache
  // holds exactly the fed positions.
  // mtp_rows (if not null) gets the rows the module ran over.
  absl::Status Draft(std::span<MtpSequence* const> seqs, std::span<const int> k,
                     int64_t* mtp_rows = nullptr);

 private:
  MtpDrafter(ForwardEngine* engine, std::shared_ptr<ForwardEngine> owned, int draft_k)
      : engine_(engine), owned_(std::move(owned)), draft_k_(draft_k) {}
  ForwardEngine* engine_;
  std::shared_ptr<ForwardEngine> owned_;  // the adapter when created over an Engine
  int draft_k_;
};

// ---- The adaptive policy ---------------------------------------------------------------------

// Seconds of a forward as a function of its rows, measured online: an exponentially
// weighted mean per observed row count (each observation clamped to [0.5, 2] x the mean; the
// other points follow its relative change, so all costs drift together); between
// observed counts linear interpolation, beyond them linear extrapolation from the two nearest
// (proportional to rows from a single one).
class RowCostModel {
 public:
  void Observe(int64_t rows, double seconds);
  // < 0 when nothing was observed yet.
  double Predict(int64_t rows) const;
  bool Observed(int64_t rows) const { return mean_.contains(rows); }
  size_t points() const { return mean_.size(); }

 private:
  std::map<int64_t, double> mean_;  // rows -> seconds
};

struct DraftPolicyOptions {
  bool adaptive = true;     // false: always draft draft_k tokens
  int probe_interval = 32;  // one step in this many takes the other choice, to re-measure
  // Start drafting when the predicted speed-up exceeds this (keep drafting while it exceeds
  // 1 + (margin - 1) / 2): hysteresis against timing noise (step
  // times on a shared 2-core machine swing by ~20% between steps, and a wrong switch costs
  // the MTP catch-up), so gains under 20% are forgone.
  double margin = 1.2;
};

// Chooses the number of drafts per step (0 = off) for a batch of B decoding sequences:
// with measured per-position acceptance alpha_j (P(d_j accepted | d_1..d_{j-1} accepted)),
// drafting k emits B * (1 + sum_{j<=k} prod_{i<=j} alpha_i) tokens in
// T_main(B * (1 + k)) + T_mtp(k, B) seconds against B tokens in T_main(B) without; the k
// with the best predicted tokens/s wins. T_main comes from a RowCostModel over main forward
// rows, T_mtp from one over MTP rows. It first measures the plain step at this B, then
// probes drafting (for one sequence) while T_main has one point or T_mtp none; every
// probe_interval steps it takes another choice (a probe while off: drafting for one sequence
// during 4 consecutive steps; while on, alternately a plain step and a step with one draft
// more) so the estimates stay current; while off the interval doubles after each probe, up
// to kMaxPendingMtpRows steps (sequences paused longer retire). Switching on from off also needs
// the predicted gain over probe_interval steps to exceed the MTP catch-up over the pending rows.
class DraftPolicy {
 public:
  DraftPolicy(int draft_k, DraftPolicyOptions options);

  // pending_rows: the decoding sequences' rows not yet fed to the MTP module (their sum),
  // which switching drafting on must feed first.
  int Choose(int64_t decoding, int64_t pending_rows = 0);
  // After a step: its main forward (rows, seconds; prefill steps too: they give the cost
  // of many rows), its MTP work (rows, seconds; 0 when it drafted nothing) and, per draft
  // position j, drafted[j] / accepted[j] counts.
  void ObserveMain(int64_t rows, double seconds) { main_.Observe(rows, seconds); }
  void ObserveMtp(int64_t rows, double seconds) { mtp_.Observe(rows, seconds); }
  void ObserveAcceptance(std::span<const int64_t> drafted, std::span<const int64_t> accepted);

  // alpha_{position+1}: accepted / drafted counts, starting from a prior of 0.5 worth one
  // draft.
  double acceptance_rate(int position) const;
  // The last Choose() was a probe while drafting is off: draft for one sequence only
  // (KeepOneForProbe), which measures acceptance at the cost of one sequence's catch-up.
  bool probing() const { return probing_; }
  // Predicted tokens/s ratio of drafting k against not, at batch B (< 0 when unknown).
  double PredictedSpeedup(int64_t decoding, int k) const;
  // The estimates behind PredictedSpeedup(B, k), for logs.
  std::string Describe(int64_t decoding, int k) const;

 private:
  int draft_k_;
  DraftPolicyOptions options_;
  RowCostModel main_, mtp_;
  double drafted_[kMaxDraftTokens] = {};
  double accepted_[kMaxDraftTokens] = {};
  int steps_since_probe_ = 0;
  int probe_backoff_ = 1;
  bool probing_ = false;
  int burst_left_ = 0;           // steps left in the current probe
  bool on_ = false;              // the last decision (not a probe) was to draft
  bool explore_deeper_ = false;  // while on, the next re-measuring step drafts one more
};

// On a probe (policy.probing()), keeps only the sequence with the fewest pending MTP rows
// among those with drafts wanted (the cheapest to catch up); seqs and k are the Draft()
// arguments of the step, filtered in place.
void KeepOneForProbe(const DraftPolicy& policy, std::vector<MtpSequence*>& seqs,
                     std::vector<int>& k);

}  // namespace expertmesh
