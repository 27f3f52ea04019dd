// The expert load of the last minute or so: dispatchers report, every few seconds, how many
// tokens they routed to each (layer, expert) since their last report (deltas). The window
// adds each report to the bucket of its arrival time (5 s buckets, 12 of them: the last 60 s
// by default) and forgets buckets older than that, so its sums follow the traffic of now
// rather than since the router started (the router's totals, GetStatus, keep those). A report
// covers the interval before its arrival, so the window's span is approximate to one report
// interval. Plain logic with time passed in; the router calls it under its lock.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/time/time.h"
#include "expertmesh/v1/router.pb.h"

namespace expertmesh {

struct LoadWindowOptions {
  absl::Duration bucket = absl::Seconds(5);
  int buckets = 12;  // window length = bucket * buckets
};

class LoadWindow {
 public:
  // Counts (layer, expert) pairs in [0, n_layers) x [0, n_routed_experts); `start` is when
  // counting began (a younger window's rate is over its age, not its full length).
  LoadWindow(int32_t n_layers, int32_t n_routed_experts, absl::Time start,
             LoadWindowOptions options = {});

  // Adds a report's tokens at time `now`; pairs outside the model's range are ignored.
  void Add(const v1::LoadReport& report, absl::Time now);

  struct Sums {
    // tokens[layer * n_routed_experts + expert]: routed within the window.
    std::vector<uint64_t> tokens;
    absl::Duration length;  // the configured window length
    // From the start of the oldest bucket counted (or of counting) to now, at most `length`:
    // what a rate divides by.
    absl::Duration span;
  };
  Sums Sum(absl::Time now) const;

  int32_t n_layers() const { return n_layers_; }
  int32_t n_routed_experts() const { return n_routed_experts_; }
  absl::Duration length() const { return options_.bucket * options_.buckets; }

 private:
  int64_t BucketIndex(absl::Time t) const;  // whole buckets since start_

  int32_t n_layers_;
  int32_t n_routed_experts_;
  absl::Time start_;
  LoadWindowOptions options_;
  // A ring of options_.buckets buckets; slot i holds bucket index index_[i] (-1 = empty).
  std::vector<int64_t> index_;
  std::vector<std::vector<uint64_t>> tokens_;  // [bucket][layer * n_routed_experts + expert]
};

}  // namespace expertmesh
