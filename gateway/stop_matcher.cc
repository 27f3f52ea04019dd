#include "gateway/stop_matcher.h"

#include <algorithm>
#include <utility>

namespace expertmesh::gateway {

StopMatcher::StopMatcher(std::vector<std::string> stop_strings) {
  for (std::string& s : stop_strings) {
    if (!s.empty()) stops_.push_back(std::move(s));
  }
}

std::string StopMatcher::Push(std::string_view delta) {
  if (stopped()) return {};
  pending_.append(delta);
  if (stops_.empty()) return std::exchange(pending_, {});

  // The stop string that is completed first wins (the smallest end offset; on a tie the one
  // starting earlier). That is what a character-by-character feed finds, so the result does
  // not depend on how the text was cut into deltas.
  size_t best_pos = std::string::npos;
  size_t best_end = std::string::npos;
  const std::string* best = nullptr;
  for (const std::string& stop : stops_) {
    size_t pos = pending_.find(stop);
    if (pos == std::string::npos) continue;
    size_t end = pos + stop.size();
    if (end < best_end || (end == best_end && pos < best_pos)) {
      best_pos = pos;
      best_end = end;
      best = &stop;
    }
  }
  if (best != nullptr) {
    matched_ = *best;
    std::string out = pending_.substr(0, best_pos);
    pending_.clear();
    return out;
  }

  // Hold back the longest suffix that is a proper prefix of a stop string.
  size_t hold = 0;
  for (const std::string& stop : stops_) {
    size_t max_k = std::min(stop.size() - 1, pending_.size());
    for (size_t k = max_k; k > hold; --k) {
      if (std::string_view(pending_).substr(pending_.size() - k) ==
          std::string_view(stop).substr(0, k)) {
        hold = k;
        break;
      }
    }
  }
  std::string out = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string StopMatcher::Finish() {
  if (stopped()) return {};
  return std::exchange(pending_, {});
}

}  // namespace expertmesh::gateway
