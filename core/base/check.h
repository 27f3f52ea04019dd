// Invariant checks that end the process: a broken invariant inside the program (never bad
// input, which gets a Status) is logged with its place and aborts, so a core dump shows it.
#pragma once

#include <string_view>

namespace expertmesh::base {

[[noreturn]] void CheckFailed(std::string_view condition, std::string_view message,
                              const char* file, int line);

}  // namespace expertmesh::base

// EM_CHECK(cond, "what broke"): aborts with the condition, the message and the place.
#define EM_CHECK(cond, message)                                            \
  do {                                                                     \
    if (!(cond)) [[unlikely]] {                                            \
      ::expertmesh::base::CheckFailed(#cond, message, __FILE__, __LINE__); \
    }                                                                      \
  } while (0)
