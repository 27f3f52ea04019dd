// Tokenizer: a byte-level BPE tokenizer driven by a Hugging Face tokenizer.json.
//
// Why: the gateway tokenizes prompts and detokenizes streamed tokens for any deepseek_v3
// checkpoint (the bundled tiny model and the real DeepSeek-V3/R1), so the tokenizer reads the
// model's own tokenizer.json and must give exactly the ids Hugging Face `tokenizers` gives;
// tests/tokenizer/ checks that against committed golden files, and against `tokenizers` itself
// on the released DeepSeek-V3/R1 tokenizer.json (deepseek_conformance_test.py).
//
// Supported tokenizer.json parts (anything else is rejected at Load with a clear error):
//   normalizer:    null, Sequence, NFC, NFD, NFKC, NFKD, Prepend, Replace (string pattern)
//   pre_tokenizer: null, Sequence, Split (Regex or String pattern, every behavior, invert),
//                  ByteLevel (add_prefix_space, use_regex with the GPT-2 pattern)
//   model:         BPE (merges as "a b" strings or [a, b] pairs, ignore_merges)
//   decoder:       null or ByteLevel
//   added_tokens:  special and non-special, with lstrip / rstrip / single_word / normalized.
// Split regexes run on PCRE2 in UTF + UCP mode (Unicode classes, look-ahead), rewritten so that
// \p{<general category>}, \d and \s match as Unicode 16.0 (the tables of `tokenizers`'
// Oniguruma) although PCRE2 10.42 has Unicode 14.0 ones (core/text/unicode_additions.inc).
//
// Pipeline of Encode (the same as `tokenizers`): cut out added tokens matched on the raw text
// (normalized=false), normalize the rest, cut out added tokens matched on normalized text,
// pre-tokenize each remaining piece, map its bytes to the byte-level alphabet, BPE-merge.
#ifndef EXPERTMESH_CORE_TOKENIZER_H_
#define EXPERTMESH_CORE_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/base/utf8.h"  // Utf8Lossy, Utf8StablePrefix

namespace expertmesh {

class Tokenizer {
 public:
  // Reads tokenizer.json. When a tokenizer_config.json stands beside it, its bos_token /
  // eos_token name the BOS / EOS tokens; otherwise BOS comes from a TemplateProcessing
  // post_processor and EOS stays unknown.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& tokenizer_json_path);
  // Builds from the text of a tokenizer.json (and optionally of a tokenizer_config.json).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view tokenizer_json,
                                                             std::string_view config_json = {});
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of `text`, special tokens written in the text included. InvalidArgument when
  // `text` is not valid UTF-8 (or 1 GiB or longer); FailedPrecondition when add_bos and the
  // tokenizer has no BOS; ResourceExhausted if a regex hits a PCRE2 limit. Thread-safe.
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos) const;

  // Text of `ids`. Ids outside the vocabulary are skipped; invalid UTF-8 produced by the
  // tokens becomes U+FFFD (one per maximal invalid subpart), as `tokenizers` does.
  std::string Decode(std::span<const int32_t> ids, bool skip_special_tokens) const;

  // Incremental detokenization for streaming: Push returns the text that became final.
  // Never returns a broken UTF-8 sequence; the concatenation of all Push results and Flush
  // equals Decode of all pushed ids. The tokenizer must outlive the decoder.
  class StreamDecoder {
   public:
    StreamDecoder(const Tokenizer* tokenizer, bool skip_special_tokens);
    std::string Push(int32_t id);
    // Returns what is held back (an incomplete UTF-8 sequence becomes U+FFFD) and resets.
    std::string Flush();

   private:
    const Tokenizer* tokenizer_;
    bool skip_special_tokens_;
    std::string pending_;  // bytes of an incomplete UTF-8 sequence at the end
  };
  StreamDecoder NewStreamDecoder(bool skip_special_tokens) const {
    return StreamDecoder(this, skip_special_tokens);
  }

  // Id of a vocabulary or added token, by its text as written in tokenizer.json.
  std::optional<int32_t> TokenId(std::string_view token) const;
  // Text of a token as written in tokenizer.json (byte-level alphabet for BPE tokens).
  std::optional<std::string_view> TokenText(int32_t id) const;
  bool IsSpecial(int32_t id) const;
  // Per id: the bytes the token decodes to (what Decode appends for it, before UTF-8 repair);
  // empty for special tokens and unused ids. For constrained decoding (core/decode/
  // json_constraint.h), which checks each token's bytes against a grammar.
  std::vector<std::string> TokenByteTable() const;

  // One more than the largest id (vocabulary and added tokens).
  int32_t vocab_size() const;
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  // Decoded bytes of one token (before UTF-8 repair); empty when skipped or unknown.
  void AppendTokenBytes(int32_t id, bool skip_special_tokens, std::string* out) const;

  std::unique_ptr<Impl> impl_;
};

}  // namespace expertmesh

#endif  // EXPERTMESH_CORE_TOKENIZER_H_
