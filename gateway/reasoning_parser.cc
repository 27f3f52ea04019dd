#include "gateway/reasoning_parser.h"

#include <algorithm>

namespace expertmesh::gateway {

size_t PartialMarkerSuffix(std::string_view text, std::string_view marker) {
  const size_t longest = std::min(text.size(), marker.size() - 1);
  for (size_t n = longest; n > 0; --n) {
    if (text.substr(text.size() - n) == marker.substr(0, n)) return n;
  }
  return 0;
}

ReasoningParser::Split ReasoningParser::Feed(std::string_view text) {
  pending_.append(text);
  return Drain(false);
}

ReasoningParser::Split ReasoningParser::Finish() { return Drain(true); }

ReasoningParser::Split ReasoningParser::Drain(bool final) {
  Split out;
  if (state_ == State::kStart) {
    // An opening tag, if the output has one, is not part of the reasoning.
    if (pending_.size() < kThinkBegin.size() && kThinkBegin.starts_with(pending_) && !final) {
      return out;  // may still become <think>
    }
    if (std::string_view(pending_).starts_with(kThinkBegin)) pending_.erase(0, kThinkBegin.size());
    state_ = State::kReasoning;
  }
  if (state_ == State::kReasoning) {
    const size_t end = pending_.find(kThinkEnd);
    if (end == std::string::npos) {
      const size_t keep = final ? 0 : PartialMarkerSuffix(pending_, kThinkEnd);
      out.reasoning = pending_.substr(0, pending_.size() - keep);
      pending_.erase(0, pending_.size() - keep);
      return out;
    }
    out.reasoning = pending_.substr(0, end);
    pending_.erase(0, end + kThinkEnd.size());
    state_ = State::kContent;
  }
  out.content = std::move(pending_);
  pending_.clear();
  return out;
}

}  // namespace expertmesh::gateway
