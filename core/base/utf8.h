// UTF-8 checks and repair on raw bytes, by Unicode's Table 3-7 (well-formed sequences: no
// overlong forms, no surrogates, nothing above U+10FFFF). The gateway validates request text
// with it; the tokenizer repairs and holds back decoded bytes with it.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace expertmesh {

// True when `bytes` is well-formed UTF-8 throughout.
bool IsValidUtf8(std::string_view bytes);

// Replaces invalid UTF-8 in `bytes` with U+FFFD, one per maximal invalid subpart (as Rust's
// String::from_utf8_lossy and the WHATWG decoder do).
std::string Utf8Lossy(std::string_view bytes);

// Length of the longest prefix of `bytes` after which no byte can change how the prefix
// decodes: everything except a trailing, still-completable UTF-8 sequence.
size_t Utf8StablePrefix(std::string_view bytes);

}  // namespace expertmesh
