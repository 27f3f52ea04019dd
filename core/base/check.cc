#include "core/base/check.h"

#include "spdlog/spdlog.h"

namespace expertmesh::base {

void CheckFailed(std::string_view condition, std::string_view message, std::source_location where) {
  spdlog::critical("check failed at {}:{} ({}): {}: {}", where.file_name(), where.line(),
                   where.function_name(), condition, message);
  spdlog::shutdown();
  std::abort();
}

}  // namespace expertmesh::base
