// DeepSeek-R1's reasoning, split from the answer while the text streams: what the model writes
// between <think> and </think> is reasoning_content, the rest content (as vLLM's and SGLang's
// deepseek_r1 reasoning parsers). The output may open with <think> (R1 as released) or start
// inside the reasoning with no opening tag (later R1 templates end the generation prompt with
// "<think>\n"); either way the text up to </think> is reasoning, and a stream that never
// closes it is reasoning throughout, as vLLM's parser reads it. Markers split across deltas
// are held back until they are decided, so the pieces concatenate to the same split as the
// whole text gives.
#pragma once

#include <string>
#include <string_view>

namespace expertmesh::gateway {

inline constexpr std::string_view kThinkBegin = "<think>";
inline constexpr std::string_view kThinkEnd = "</think>";

// The length of the longest suffix of `text` that is a proper prefix of `marker` (the part of
// the text that may still become the marker).
size_t PartialMarkerSuffix(std::string_view text, std::string_view marker);

class ReasoningParser {
 public:
  struct Split {
    std::string reasoning;
    std::string content;
  };
  // The next piece of generated text; returns what is decided so far.
  Split Feed(std::string_view text);
  // The end of the output: whatever was held back.
  Split Finish();
  bool in_reasoning() const { return state_ != State::kContent; }

 private:
  enum class State { kStart, kReasoning, kContent };
  Split Drain(bool final);

  State state_ = State::kStart;
  std::string pending_;
};

}  // namespace expertmesh::gateway
