#include "core/decode/generate.h"

#include <chrono>

#include "absl/strings/str_format.h"
#include "core/base/status.h"

namespace expertmesh {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

}  // namespace

absl::StatusOr<std::unique_ptr<BatchGenerator>> BatchGenerator::Create(
    Engine* engine, BatchGeneratorOptions options) {
  std::unique_ptr<BatchGenerator> g(new BatchGenerator(engine));
  StepperOptions so;
  so.mtp = options.mtp;
  so.draft_k = options.draft_k;
  so.policy = options.policy;
  EM_ASSIGN_OR_RETURN(g->stepper_, DecodeStepper::Create(&g->forward_, so));
  return g;
}

absl::StatusOr<std::vector<BatchResult>> BatchGenerator::Generate(
    std::span<const BatchRequest> requests, BatchStats* stats, const TokenCallback& on_tokens) {
  const int64_t max_context = stepper_->max_context();
  BatchStats local;
  BatchStats& st = stats != nullptr ? *stats : local;
  st = {};
  const size_t n = requests.size();
  std::vector<StepSequence> seqs(n);
  std::vector<std::unique_ptr<Sampler>> samplers;
  caches_.clear();
  mtp_caches_.clear();
  for (size_t i = 0; i < n; ++i) {
    const BatchRequest& r = requests[i];
    if (r.prompt.empty() || r.max_tokens < 1 ||
        static_cast<int64_t>(r.prompt.size()) >= max_context) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "request %d: needs a prompt shorter than the context (%d) and max_tokens >= 1", i,
          max_context));
    }
    EM_ASSIGN_OR_RETURN(Sampler sampler, Sampler::Create(r.sampling));
    samplers.push_back(std::make_unique<Sampler>(std::move(sampler)));
    caches_.push_back(engine_->NewCache());
    StepSequence& s = seqs[i];
    s.max_tokens = r.max_tokens;
    s.ignore_eos = r.ignore_eos;
    s.stop_token_ids = r.stop_token_ids;
    s.sampler = samplers.back().get();
    s.cache = caches_.back().get();
    s.prompt_len = static_cast<int64_t>(r.prompt.size());
    s.tokens = r.prompt;
    if (mtp()) {
      mtp_caches_.push_back(engine_->NewMtpCache());
      s.mtp.cache = mtp_caches_.back().get();
    }
  }

  // Steps over the sequences still running until none is; the first prefills every prompt.
  std::vector<BatchResult> results(n);
  std::vector<StepSequence*> batch;
  std::vector<size_t> index;
  for (bool prefill = true;; prefill = false) {
    batch.clear();
    index.clear();
    for (size_t i = 0; i < n; ++i) {
      if (seqs[i].stop == StopReason::kNone) {
        batch.push_back(&seqs[i]);
        index.push_back(i);
      }
    }
    if (batch.empty()) break;
    const auto t = Clock::now();
    EM_ASSIGN_OR_RETURN(const StepStats step, stepper_->Step(batch));
    if (prefill) {
      st.prefill_seconds = Since(t);
    } else {
      st.decode_seconds += Since(t);
      ++st.decode_steps;
      if (step.verified_drafts) ++st.draft_steps;
    }
    for (size_t b = 0; b < batch.size(); ++b) {
      const StepSequence& s = *batch[b];
      std::vector<SampledToken>& out = results[index[b]].tokens;
      out.insert(out.end(), s.emitted.begin(), s.emitted.end());
      if (!prefill) st.decode_tokens += static_cast<int64_t>(s.emitted.size());
      if (on_tokens && !s.emitted.empty()) on_tokens(index[b], s.emitted);
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const StepSequence& s = seqs[i];
    results[i].drafted = s.drafted;
    results[i].accepted = s.accepted;
    st.drafted += s.drafted;
    st.accepted += s.accepted;
  }
  return results;
}

}  // namespace expertmesh
