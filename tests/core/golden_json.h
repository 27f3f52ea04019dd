// Reads a committed golden JSON file (tests/golden/...) for the core tests.
#pragma once

#include <string>

#include "boost/json.hpp"
#include "core/base/file.h"
#include "gtest/gtest.h"

namespace expertmesh::testing {

inline boost::json::value ReadGoldenJson(const std::string& relative_path) {
  const std::string path = std::string(EXPERTMESH_SOURCE_DIR) + "/" + relative_path;
  absl::StatusOr<std::string> text = base::ReadFile(path);
  EXPECT_TRUE(text.ok()) << text.status();
  if (!text.ok()) return nullptr;
  std::error_code ec;
  boost::json::value v = boost::json::parse(*text, ec);
  EXPECT_FALSE(ec) << path << ": " << ec.message();
  return v;
}

}  // namespace expertmesh::testing
