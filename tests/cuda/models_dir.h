// Where the CUDA tests find the bundled models: $EXPERTMESH_MODELS_DIR when set (tools/gpu-check.sh
// sets it: a bundled binary runs in another checkout than the one it was built in), else this
// source tree's models/. Host-only.
#pragma once

#include <cstdlib>
#include <string>

namespace expertmesh::testing {

inline std::string ModelsRoot() {
  const char* env = std::getenv("EXPERTMESH_MODELS_DIR");
  return env != nullptr && *env != '\0' ? std::string(env)
                                        : std::string(EXPERTMESH_SOURCE_DIR) + "/models";
}

inline std::string ModelDir(const std::string& name) { return ModelsRoot() + "/" + name; }

}  // namespace expertmesh::testing
