#include "core/base/utf8.h"

#include <cstdint>
#include <utility>

namespace expertmesh {

namespace {
// Expected sequence length for a lead byte (0: not a lead), and the allowed range of the
// second byte (Unicode Table 3-7).
int Utf8Length(uint8_t b) {
  if (b < 0x80) return 1;
  if (b >= 0xC2 && b <= 0xDF) return 2;
  if (b >= 0xE0 && b <= 0xEF) return 3;
  if (b >= 0xF0 && b <= 0xF4) return 4;
  return 0;
}
std::pair<uint8_t, uint8_t> SecondByteRange(uint8_t lead) {
  switch (lead) {
    case 0xE0:
      return {0xA0, 0xBF};
    case 0xED:
      return {0x80, 0x9F};
    case 0xF0:
      return {0x90, 0xBF};
    case 0xF4:
      return {0x80, 0x8F};
    default:
      return {0x80, 0xBF};
  }
}
// Number of bytes at `s[i..]` that are a valid (possibly incomplete) prefix of one sequence.
int ValidPrefix(std::string_view s, size_t i, int length) {
  int n = 1;
  while (n < length && i + n < s.size()) {
    uint8_t c = static_cast<uint8_t>(s[i + n]);
    auto [lo, hi] = n == 1 ? SecondByteRange(static_cast<uint8_t>(s[i]))
                           : std::pair<uint8_t, uint8_t>{0x80, 0xBF};
    if (c < lo || c > hi) break;
    ++n;
  }
  return n;
}
}  // namespace

bool IsValidUtf8(std::string_view bytes) {
  size_t i = 0;
  while (i < bytes.size()) {
    const int length = Utf8Length(static_cast<uint8_t>(bytes[i]));
    if (length == 0 || ValidPrefix(bytes, i, length) != length) return false;
    i += static_cast<size_t>(length);
  }
  return true;
}

std::string Utf8Lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    int length = Utf8Length(static_cast<uint8_t>(bytes[i]));
    if (length == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
      continue;
    }
    int n = ValidPrefix(bytes, i, length);
    if (n == length) {
      out.append(bytes.substr(i, n));
    } else {
      out += "\xEF\xBF\xBD";  // one U+FFFD per maximal subpart
    }
    i += n;
  }
  return out;
}

size_t Utf8StablePrefix(std::string_view bytes) {
  size_t n = bytes.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    size_t i = n - back;
    uint8_t b = static_cast<uint8_t>(bytes[i]);
    if ((b & 0xC0) == 0x80) continue;  // continuation byte: look further back
    int length = Utf8Length(b);
    if (length > static_cast<int>(back) &&
        ValidPrefix(bytes, i, length) == static_cast<int>(back)) {
      return i;  // an incomplete sequence that more bytes may complete
    }
    return n;
  }
  return n;
}

}  // namespace expertmesh
