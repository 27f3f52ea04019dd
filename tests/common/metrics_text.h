// Reading a value from the Prometheus text exposition in tests.
#pragma once

#include <string>

namespace expertmesh::testing {

// The value of `series` ("name" or "name{labels}") in `text`; -1 when absent.
inline double MetricValue(const std::string& text, const std::string& series) {
  size_t pos = 0;
  while ((pos = text.find(series + " ", pos)) != std::string::npos) {
    if (pos == 0 || text[pos - 1] == '\n') return std::stod(text.substr(pos + series.size() + 1));
    pos += series.size();
  }
  return -1;
}

}  // namespace expertmesh::testing
