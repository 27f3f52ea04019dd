// String helpers for the gateway. Debian's Abseil (20220623) has its own absl::string_view,
// distinct from std::string_view; Cat() is absl::StrCat that also takes std::string_view.
#pragma once

#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"

namespace expertmesh::gateway {
namespace strings_internal {
inline absl::string_view Fix(std::string_view s) { return {s.data(), s.size()}; }
template <typename T>
const T& Fix(const T& value) {
  return value;
}
}  // namespace strings_internal

template <typename... Args>
std::string Cat(const Args&... args) {
  return absl::StrCat(strings_internal::Fix(args)...);
}

}  // namespace expertmesh::gateway
