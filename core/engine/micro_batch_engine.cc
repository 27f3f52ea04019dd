#include "core/engine/micro_batch_engine.h"

#include <algorithm>
#include <optional>

#include "absl/strings/str_cat.h"

namespace expertmesh {

std::vector<size_t> SplitMicroBatches(std::span<const int64_t> rows, int micro_batches,
                                      int64_t min_rows) {
  const size_t n = rows.size();
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  const int64_t by_rows = min_rows > 0 ? total / min_rows : total;
  const size_t k = static_cast<size_t>(std::max<int64_t>(
      1,
      std::min<int64_t>({static_cast<int64_t>(micro_batches), static_cast<int64_t>(n), by_rows})));
  std::vector<size_t> ends;
  int64_t acc = 0;
  for (size_t i = 0; i + 1 < n && ends.size() + 1 < k; ++i) {
    acc += rows[i];
    const size_t j = ends.size() + 1;  // the cut after this sequence would end micro-batch j
    const size_t left = n - (i + 1);   // sequences after this one
    const bool reached = acc * static_cast<int64_t>(k) >= total * static_cast<int64_t>(j);
    if ((reached && left >= k - j) || left == k - j) ends.push_back(i + 1);
  }
  ends.push_back(n);
  return ends;
}

// Micro-batch i's RoutedExperts: the baton is given up while the experts run (a remote round
// trip, or local experts on other cores) and taken back before the layer goes on.
class MicroBatchForwardEngine::BatonExperts final : public RoutedExperts {
 public:
  BatonExperts(RoutedExperts* inner, std::mutex* baton) : inner_(inner), baton_(baton) {}
  absl::Status Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                   std::span<float> out) override {
    Released r(baton_);
    return inner_->Run(layer, x, routes, out);
  }
  absl::Status RunUnquantized(int layer, std::span<const float> x, const ExpertRoutes& routes,
                              std::span<float> out) override {
    Released r(baton_);
    return inner_->RunUnquantized(layer, x, routes, out);
  }
  absl::Status RunPerExpert(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                            std::span<uint16_t> pair_out) override {
    Released r(baton_);
    return inner_->RunPerExpert(layer, x, routes, pair_out);
  }

 private:
  // The caller holds the baton (RunMicroBatch): released for the scope, held again after.
  struct Released {
    explicit Released(std::mutex* m) : m(m) { m->unlock(); }
    ~Released() { m->lock(); }
    std::mutex* m;
  };
  RoutedExperts* const inner_;
  std::mutex* const baton_;
};

// A persistent thread for one micro-batch (no thread is created per step).
struct MicroBatchForwardEngine::Worker {
  size_t index = 0;
  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;
  std::optional<std::span<const SequenceInput>> job;                  // set: run it
  std::optional<absl::StatusOr<std::vector<SequenceOutput>>> result;  // set: done
  std::thread thread;
};

absl::StatusOr<std::unique_ptr<MicroBatchForwardEngine>> MicroBatchForwardEngine::Create(
    const Model& model, std::span<RoutedExperts* const> experts, EngineOptions engine,
    MicroBatchOptions options) {
  if (options.micro_batches < 1 || options.micro_batches > MicroBatchOptions::kMax ||
      options.min_rows < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("micro-batches: ", options.micro_batches, " (want 1..",
                     MicroBatchOptions::kMax, "), min rows ", options.min_rows, " (want >= 1)"));
  }
  if (std::ssize(experts) != options.micro_batches) {
    return absl::InvalidArgumentError(absl::StrCat("micro-batches: ", experts.size(),
                                                   " RoutedExperts for ", options.micro_batches,
                                                   " micro-batches"));
  }
  std::unique_ptr<MicroBatchForwardEngine> m(new MicroBatchForwardEngine(model, options));
  for (RoutedExperts* e : experts) {
    m->baton_experts_.push_back(e == nullptr ? nullptr
                                             : std::make_unique<BatonExperts>(e, &m->baton_));
    absl::StatusOr<std::unique_ptr<Engine>> eng =
        Engine::Create(model, m->baton_experts_.back().get(), engine);
    if (!eng.ok()) return eng.status();
    m->engines_.push_back(*std::move(eng));
  }
  for (int i = 1; i < options.micro_batches; ++i) {
    auto w = std::make_unique<Worker>();
    w->index = static_cast<size_t>(i);
    w->thread = std::thread([p = m.get(), raw = w.get()] { p->WorkerLoop(*raw); });
    m->workers_.push_back(std::move(w));
  }
  return m;
}

MicroBatchForwardEngine::MicroBatchForwardEngine(const Model& model, MicroBatchOptions options)
    : model_(model), options_(options) {}

MicroBatchForwardEngine::~MicroBatchForwardEngine() {
  for (auto& w : workers_) {
    {
      std::lock_guard<std::mutex> lock(w->mu);
      w->stop = true;
    }
    w->cv.notify_all();
    w->thread.join();
  }
}

void MicroBatchForwardEngine::WorkerLoop(Worker& w) {
  while (true) {
    std::span<const SequenceInput> part;
    {
      std::unique_lock<std::mutex> lock(w.mu);
      w.cv.wait(lock, [&] { return w.stop || w.job.has_value(); });
      if (w.stop) return;
      part = *w.job;
      w.job.reset();
    }
    absl::StatusOr<std::vector<SequenceOutput>> out = RunMicroBatch(w.index, part);
    {
      std::lock_guard<std::mutex> lock(w.mu);
      w.result = std::move(out);
    }
    w.cv.notify_all();
  }
}

absl::StatusOr<std::vector<SequenceOutput>> MicroBatchForwardEngine::RunMicroBatch(
    size_t i, std::span<const SequenceInput> part) {
  std::lock_guard<std::mutex> hold(baton_);
  return engines_[i]->Forward(part);
}

absl::StatusOr<std::vector<SequenceOutput>> MicroBatchForwardEngine::Forward(
    std::span<const SequenceInput> batch) {
  std::vector<int64_t> rows;
  rows.reserve(batch.size());
  for (const SequenceInput& in : batch) rows.push_back(std::ssize(in.tokens));
  const std::vector<size_t> ends =
      SplitMicroBatches(rows, options_.micro_batches, options_.min_rows);
  last_split_ = static_cast<int>(ends.size());
  if (ends.size() == 1) return RunMicroBatch(0, batch);
  // The caches' lengths before the step: a failed micro-batch rolls the others back too.
  std::vector<int64_t> starts;
  for (const SequenceInput& in : batch) starts.push_back(in.cache ? in.cache->length() : 0);
  for (size_t j = 1; j < ends.size(); ++j) {
    Worker& w = *workers_[j - 1];
    {
      std::lock_guard<std::mutex> lock(w.mu);
      w.job = batch.subspan(ends[j - 1], ends[j] - ends[j - 1]);
      w.result.reset();
    }
    w.cv.notify_all();
  }
  std::vector<absl::StatusOr<std::vector<SequenceOutput>>> parts;
  parts.push_back(RunMicroBatch(0, batch.first(ends[0])));
  for (size_t j = 1; j < ends.size(); ++j) {
    Worker& w = *workers_[j - 1];
    std::unique_lock<std::mutex> lock(w.mu);
    w.cv.wait(lock, [&] { return w.result.has_value(); });
    parts.push_back(std::move(*w.result));
    w.result.reset();
  }
  std::vector<SequenceOutput> out;
  out.reserve(batch.size());
  for (size_t j = 0; j < parts.size(); ++j) {
    if (parts[j].ok()) continue;
    // Engine::Forward rolled the failed micro-batch back; the others' rows go too, so the
    // whole step is undone as one unsplit Forward's failure would be.
    for (size_t k = 0; k < parts.size(); ++k) {
      if (!parts[k].ok()) continue;
      for (size_t s = k == 0 ? 0 : ends[k - 1]; s < ends[k]; ++s) {
        batch[s].cache->Truncate(starts[s]);
      }
    }
    return parts[j].status();
  }
  for (auto& p : parts) {
    for (SequenceOutput& o : *p) out.push_back(std::move(o));
  }
  return out;
}

absl::StatusOr<std::vector<SequenceOutput>> MicroBatchForwardEngine::ForwardMtp(
    std::span<const MtpInput> batch, int depth) {
  std::lock_guard<std::mutex> hold(baton_);
  return engines_[0]->ForwardMtp(batch, depth);
}

}  // namespace expertmesh
