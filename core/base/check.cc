#include "core/base/check.h"

#include <cstdlib>

#include "spdlog/spdlog.h"

namespace expertmesh::base {

void CheckFailed(std::string_view condition, std::string_view message, const char* file, int line) {
  spdlog::critical("check failed at {}:{} ({}): {}", file, line, condition, message);
  spdlog::shutdown();
  std::abort();
}

}  // namespace expertmesh::base
