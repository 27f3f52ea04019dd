// What a service process started by a test left in its log (stdout and stderr, where the
// sanitizers write their reports): for the failure message when it exits non-zero, so that a
// failure under ASan/UBSan/TSan explains itself instead of saying "exited with 1".
#pragma once

#include <fstream>
#include <iterator>
#include <string>

namespace expertmesh::testing {

// The sanitizer report in the log at `path` (from the first line of an AddressSanitizer,
// LeakSanitizer, ThreadSanitizer or UBSan report to the end, at most max_chars from its
// start); without one, its last tail_chars bytes. Says so when the log cannot be read.
inline std::string ChildLogReport(const std::string& path, size_t tail_chars = 2000,
                                  size_t max_chars = 20000) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "(no log at " + path + ")";
  const std::string text{std::istreambuf_iterator<char>(in), {}};
  size_t report = std::string::npos;
  for (const char* marker : {"==ERROR: ", "WARNING: ThreadSanitizer", "runtime error: "}) {
    const size_t at = text.find(marker);
    if (at != std::string::npos && (report == std::string::npos || at < report)) report = at;
  }
  if (report != std::string::npos) {
    const size_t line = text.rfind('\n', report);
    const size_t begin = line == std::string::npos ? 0 : line + 1;
    return "sanitizer report in " + path + ":\n" + text.substr(begin, max_chars);
  }
  return "end of " + path + ":\n" +
         text.substr(text.size() > tail_chars ? text.size() - tail_chars : 0);
}

}  // namespace expertmesh::testing
