#include "attention-service/sequence.h"

#include <chrono>

namespace expertmesh::attention {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "unknown";
}

std::optional<SequenceEvent> SequenceStream::Next(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                    [this] { return !events_.empty(); })) {
    return std::nullopt;
  }
  SequenceEvent e = std::move(events_.front());
  events_.pop_front();
  return e;
}

void SequenceStream::Push(SequenceEvent event) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(event));
  }
  cv_.notify_one();
}

}  // namespace expertmesh::attention
