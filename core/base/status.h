// Status plumbing shared by every library and service: early-return macros over absl::Status
// and absl::StatusOr, and an fmt formatter so `spdlog::info("{}", status)` prints the code and
// the message. One definition for the whole tree.
#pragma once

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "spdlog/fmt/fmt.h"

// Returns the status of `expr` (an absl::Status) from the enclosing function when it is not OK.
#define EM_RETURN_IF_ERROR(expr)                        \
  do {                                                  \
    if (::absl::Status _em_st = (expr); !_em_st.ok()) { \
      return _em_st;                                    \
    }                                                   \
  } while (0)

#define EM_STATUS_CONCAT_INNER_(a, b) a##b
#define EM_STATUS_CONCAT_(a, b) EM_STATUS_CONCAT_INNER_(a, b)

// `EM_ASSIGN_OR_RETURN(auto x, F());` or `EM_ASSIGN_OR_RETURN(x, F());`: evaluates the
// StatusOr `expr`, returns its status when not OK, otherwise moves its value into `lhs`.
#define EM_ASSIGN_OR_RETURN(lhs, expr) \
  EM_ASSIGN_OR_RETURN_IMPL_(EM_STATUS_CONCAT_(_em_statusor_, __LINE__), lhs, expr)
#define EM_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return std::move(tmp).status();  \
  lhs = *std::move(tmp)

template <>
struct fmt::formatter<absl::Status> : fmt::formatter<std::string> {
  template <typename FormatContext>
  auto format(const absl::Status& s, FormatContext& ctx) const {
    return fmt::formatter<std::string>::format(s.ToString(), ctx);
  }
};
