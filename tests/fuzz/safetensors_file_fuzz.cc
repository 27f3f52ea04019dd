// libFuzzer target: a whole safetensors file (8-byte length, header, data) opened with
// SafetensorsFile::Open from an in-memory file, then every tensor mapped and read through.
// Checks that Open never accepts a file whose tensors it cannot map, and that each mapping
// holds exactly the tensor's bytes, which match the file's bytes at the stated offsets.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "core/format/safetensors.h"

namespace {

void Check(bool condition) {
  if (!condition) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = memfd_create("fuzz.safetensors", MFD_CLOEXEC);
  if (fd < 0) return 0;
  size_t written = 0;
  while (written < size) {
    const ssize_t n = write(fd, data + written, size - written);
    if (n <= 0) break;
    written += static_cast<size_t>(n);
  }
  if (written == size) {
    const std::string path = "/proc/self/fd/" + std::to_string(fd);
    auto file = expertmesh::SafetensorsFile::Open(path);
    if (file.ok()) {
      uint64_t header_len = 0;
      for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
      for (const expertmesh::TensorInfo& t : (*file)->tensors()) {
        auto view = (*file)->Map(t);
        Check(view.ok());
        Check(view->size == t.end - t.begin);
        if (view->size > 0) {
          Check(std::memcmp(view->data, data + 8 + header_len + t.begin, view->size) == 0);
        }
      }
    }
  }
  close(fd);
  return 0;
}
