// Reads a committed golden JSON file (tests/golden/...) for the core tests.
#pragma once

#include <fstream>
#include <sstream>
#include <string>

#include "boost/json.hpp"
#include "gtest/gtest.h"

namespace expertmesh::testing {

inline boost::json::value ReadGoldenJson(const std::string& relative_path) {
  const std::string path = std::string(EXPERTMESH_SOURCE_DIR) + "/" + relative_path;
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::stringstream text;
  text << in.rdbuf();
  std::error_code ec;
  boost::json::value v = boost::json::parse(text.str(), ec);
  EXPECT_FALSE(ec) << path << ": " << ec.message();
  return v;
}

inline std::string ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace expertmesh::testing
