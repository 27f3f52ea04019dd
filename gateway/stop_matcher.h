// Stop strings over a stream of text deltas. Text that might be the start of a stop string is
// held back until the next delta decides it, so a stop string split across tokens is still
// matched and never emitted, and the emitted deltas concatenate to exactly the non-streamed
// text. The text ends right before the stop string completed first (the smallest end
// offset), so the result does not depend on where the deltas were cut. Pure: no tokenizer, no
// network.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace expertmesh::gateway {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stop_strings);

  // Feeds the next delta (whole UTF-8 characters); returns the text now safe to emit. After a
  // stop string is found, stopped() is true and further input is ignored.
  std::string Push(std::string_view delta);

  // At the end of generation: the held-back text (no stop string can complete any more).
  std::string Finish();

  bool stopped() const { return matched_.has_value(); }
  // The stop string that ended the text, when one did.
  const std::optional<std::string>& matched() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  std::string pending_;  // held back: a suffix that is a proper prefix of some stop string
  std::optional<std::string> matched_;
};

}  // namespace expertmesh::gateway
