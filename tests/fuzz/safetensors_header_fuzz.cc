// libFuzzer target: ParseSafetensorsHeader on untrusted bytes.
// Input layout: 8 bytes little-endian data-section size, then the header JSON.
// Beyond "never crash", an accepted header must satisfy the parser's own promises: every
// tensor lies inside the data section, its byte length is numel x dtype size, and no two
// tensors overlap. A broken promise traps, so the fuzzer reports it as a crash.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "core/format/safetensors.h"

namespace {

void Check(bool condition) {
  if (!condition) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  uint64_t data_size = 0;
  for (int i = 7; i >= 0; --i) data_size = (data_size << 8) | data[i];
  const std::string_view header(reinterpret_cast<const char*>(data + 8), size - 8);
  auto tensors = expertmesh::ParseSafetensorsHeader(header, data_size, "fuzz.safetensors");
  if (!tensors.ok()) {
    Check(!tensors.status().message().empty());
    return 0;
  }
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const expertmesh::TensorInfo& t : *tensors) {
    Check(t.begin <= t.end && t.end <= data_size);
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      Check(d >= 0);
      Check(!__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel));
    }
    Check(numel * static_cast<uint64_t>(expertmesh::DTypeSize(t.dtype)) == t.end - t.begin);
    if (t.end > t.begin) ranges.emplace_back(t.begin, t.end);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) Check(ranges[i].first >= ranges[i - 1].second);
  return 0;
}
