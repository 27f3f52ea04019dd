// libFuzzer target: Tokenizer::Encode / Decode / StreamDecoder on untrusted bytes, with the
// bundled model's tokenizer (DeepSeek-V3 scheme, no normalizer).
// Promises checked (a broken one traps, so the fuzzer reports it as a crash):
//   - Encode succeeds exactly when the input is valid UTF-8, with ids inside the vocabulary;
//   - Decode(Encode(text)) == text (byte-level BPE without a normalizer loses nothing);
//   - for the input read as a list of 16-bit ids, every StreamDecoder chunk is valid UTF-8 and
//     the chunks add up to Decode.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/text/tokenizer.h"

namespace {

void Check(bool condition) {
  if (!condition) __builtin_trap();
}

const expertmesh::Tokenizer& Tiny() {
  static const expertmesh::Tokenizer* tokenizer = [] {
    auto t =
        expertmesh::Tokenizer::Load(EXPERTMESH_SOURCE_DIR "/models/expertmesh-tiny/tokenizer.json");
    Check(t.ok());
    return t->release();
  }();
  return *tokenizer;
}

bool ValidUtf8(std::string_view s) { return expertmesh::Utf8Lossy(s) == s; }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const expertmesh::Tokenizer& tok = Tiny();
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto ids = tok.Encode(text, /*add_bos=*/false);
  Check(ids.ok() == ValidUtf8(text));
  if (ids.ok()) {
    for (int32_t id : *ids) Check(id >= 0 && id < tok.vocab_size());
    Check(tok.Decode(*ids, false) == text);
  }
  std::vector<int32_t> raw_ids;
  for (size_t i = 0; i + 1 < size; i += 2) raw_ids.push_back(data[i] | (data[i + 1] & 0x1F) << 8);
  for (bool skip : {false, true}) {
    auto stream = tok.NewStreamDecoder(skip);
    std::string all;
    for (int32_t id : raw_ids) {
      std::string chunk = stream.Push(id);
      Check(ValidUtf8(chunk));
      all += chunk;
    }
    all += stream.Flush();
    Check(all == tok.Decode(raw_ids, skip));
  }
  return 0;
}
