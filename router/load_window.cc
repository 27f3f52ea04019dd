#include "router/load_window.h"

#include <algorithm>

#include "core/base/check.h"

namespace expertmesh {

LoadWindow::LoadWindow(int32_t n_layers, int32_t n_routed_experts, absl::Time start,
                       LoadWindowOptions options)
    : n_layers_(std::max(n_layers, 0)),
      n_routed_experts_(std::max(n_routed_experts, 0)),
      start_(start),
      options_(options),
      index_(static_cast<size_t>(std::max(options.buckets, 1)), -1),
      tokens_(index_.size()) {
  EM_CHECK(options_.bucket > absl::ZeroDuration() && options_.buckets >= 1,
           "LoadWindow: a positive bucket length and at least one bucket");
}

int64_t LoadWindow::BucketIndex(absl::Time t) const {
  if (t <= start_) return 0;
  absl::Duration rest;
  return absl::IDivDuration(t - start_, options_.bucket, &rest);
}

void LoadWindow::Add(const v1::LoadReport& report, absl::Time now) {
  const int64_t bucket = BucketIndex(now);
  const size_t slot = static_cast<size_t>(bucket % static_cast<int64_t>(index_.size()));
  std::vector<uint64_t>& tokens = tokens_[slot];
  if (index_[slot] != bucket) {  // the slot held an older bucket (or none): start it afresh
    index_[slot] = bucket;
    tokens.assign(static_cast<size_t>(n_layers_) * n_routed_experts_, 0);
  }
  for (const v1::LayerExpertLoad& l : report.loads()) {
    if (l.layer() < 0 || l.layer() >= n_layers_ || l.expert() < 0 ||
        l.expert() >= n_routed_experts_) {
      continue;
    }
    tokens[static_cast<size_t>(l.layer()) * n_routed_experts_ + l.expert()] += l.tokens();
  }
}

LoadWindow::Sums LoadWindow::Sum(absl::Time now) const {
  Sums out;
  out.tokens.assign(static_cast<size_t>(n_layers_) * n_routed_experts_, 0);
  out.length = length();
  const int64_t newest = BucketIndex(now);
  const int64_t oldest = newest - static_cast<int64_t>(index_.size()) + 1;
  // From the start of the oldest bucket kept (or of counting) to now: at most `length`.
  out.span = std::max(absl::ZeroDuration(),
                      now - (start_ + options_.bucket * std::max<int64_t>(oldest, 0)));
  for (size_t slot = 0; slot < index_.size(); ++slot) {
    if (index_[slot] < 0 || index_[slot] < oldest || index_[slot] > newest) continue;
    for (size_t i = 0; i < out.tokens.size(); ++i) out.tokens[i] += tokens_[slot][i];
  }
  return out;
}

}  // namespace expertmesh
