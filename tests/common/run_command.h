// Running the project's binaries from tests: a shell command's exit and output, and the path
// of a built binary (EXPERTMESH_BINARY_DIR is set for every test by em_add_test).
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <string>

namespace expertmesh::testing {

struct Outcome {
  int exit_code = -1;  // -1: killed by a signal
  int signal = 0;
  std::string output;  // stdout and stderr
};

inline Outcome RunCommand(const std::string& command) {
  Outcome o;
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return o;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) o.output.append(buf, n);
  const int status = pclose(p);
  if (WIFEXITED(status)) o.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) o.signal = WTERMSIG(status);
  return o;
}

// build/<preset>/<dir>/<name>.
inline std::string Binary(const std::string& dir, const std::string& name) {
  return std::string(EXPERTMESH_BINARY_DIR) + "/" + dir + "/" + name;
}

}  // namespace expertmesh::testing
