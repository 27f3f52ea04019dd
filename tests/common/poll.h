// PollUntil: waits for a condition another thread or process makes true (a router's expiry, a
// map reaching the dispatcher, blocks returning at a step boundary), bounded by a timeout.
#pragma once

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace expertmesh::testing {

// Calls pred() until it returns true or `timeout` has passed, sleeping `every` between tries.
// Returns whether pred() held; pred() is always tried at least once and once more at the end.
template <typename Pred>
bool PollUntil(Pred&& pred, absl::Duration timeout, absl::Duration every = absl::Milliseconds(5)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    if (pred()) return true;
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(every);
  }
}

}  // namespace expertmesh::testing
