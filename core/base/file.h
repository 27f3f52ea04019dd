// Reading a whole file, with an error that names the file and the reason (missing, a
// directory, unreadable, too large) instead of an empty string.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace expertmesh::base {

// The whole file as bytes. NOT_FOUND when it does not exist, INVALID_ARGUMENT when it is not
// a regular file or is larger than max_bytes, the errno text otherwise.
absl::StatusOr<std::string> ReadFile(const std::string& path, int64_t max_bytes = int64_t{1} << 32);

}  // namespace expertmesh::base
