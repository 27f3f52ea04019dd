// Byte-level BPE tokenizer driven by tokenizer.json; see core/text/tokenizer.h.
//
// NOTES: the pipeline mirrors Hugging Face `tokenizers` step by step (added-token extraction,
// normalizer, pre-tokenizer, byte-level mapping, BPE with a priority queue), because the only
// acceptable result is the same ids. Pieces are plain UTF-8 strings: no offsets are tracked.
#include "core/text/tokenizer.h"

#include "core/base/json.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <boost/json.hpp>
#include <cctype>
#include <filesystem>
#include <mutex>
#include <queue>
#include <unordered_map>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/base/file.h"
#include "core/base/status.h"

namespace expertmesh {
namespace {

namespace json = boost::json;

// ---------------------------------------------------------------------------------------------
// UTF-8 helpers

// Texts are limited to kMaxTextBytes so that ICU's int32_t offsets hold them.
constexpr size_t kMaxTextBytes = size_t{1} << 30;

// The code point at / before byte offset *i of `s` (< kMaxTextBytes); moves *i past it.
// Negative for an ill-formed sequence.
UChar32 NextCodePoint(std::string_view s, size_t* i) {
  int32_t pos = static_cast<int32_t>(*i);
  UChar32 c;
  U8_NEXT(reinterpret_cast<const uint8_t*>(s.data()), pos, static_cast<int32_t>(s.size()), c);
  *i = static_cast<size_t>(pos);
  return c;
}
UChar32 PrevCodePoint(std::string_view s, size_t* i) {
  int32_t pos = static_cast<int32_t>(*i);
  UChar32 c;
  U8_PREV(reinterpret_cast<const uint8_t*>(s.data()), 0, pos, c);
  *i = static_cast<size_t>(pos);
  return c;
}

// Returns the offset of the first invalid byte, or npos when `s` is valid UTF-8.
size_t FindInvalidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    size_t start = i;
    if (NextCodePoint(s, &i) < 0) return start;
  }
  return std::string_view::npos;
}

// Code points of valid UTF-8 `s`, with their byte offsets.
struct CodePoint {
  UChar32 c;
  size_t offset;
  size_t length;
};
std::vector<CodePoint> CodePoints(std::string_view s) {
  std::vector<CodePoint> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t start = i;
    UChar32 c = NextCodePoint(s, &i);
    out.push_back({c, start, i - start});
  }
  return out;
}

void AppendUtf8(UChar32 c, std::string* out) {
  uint8_t buf[4];
  int32_t n = 0;
  [[maybe_unused]] UBool error = false;
  U8_APPEND(buf, n, 4, c, error);
  out->append(reinterpret_cast<const char*>(buf), n);
}

// Rust's char::is_whitespace (the White_Space property) and char::is_alphanumeric.
bool IsWhitespace(UChar32 c) { return u_isUWhiteSpace(c); }
bool IsAlphanumeric(UChar32 c) {
  if (u_isUAlphabetic(c)) return true;
  int8_t t = u_charType(c);
  return t == U_DECIMAL_DIGIT_NUMBER || t == U_LETTER_NUMBER || t == U_OTHER_NUMBER;
}

// ---------------------------------------------------------------------------------------------
// GPT-2's byte <-> printable-character table (bytes_to_unicode): printable Latin-1 bytes map
// to themselves, the other 68 bytes to U+0100.. in byte order.
struct ByteLevelTable {
  std::string byte_to_char[256];  // UTF-8 of the character for each byte
  std::unordered_map<UChar32, uint8_t> char_to_byte;
  ByteLevelTable() {
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      UChar32 c = printable ? b : next++;
      AppendUtf8(c, &byte_to_char[b]);
      char_to_byte[c] = static_cast<uint8_t>(b);
    }
  }
};
const ByteLevelTable& ByteLevel() {
  static const ByteLevelTable* table = new ByteLevelTable();
  return *table;
}

// GPT-2's pre-tokenization pattern, used by ByteLevel with use_regex = true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------------------------
// Unicode version of the regexes. `tokenizers` runs Split patterns on Oniguruma with Unicode
// 16.0.0 tables; PCRE2 10.42 (Debian 12) has Unicode 14.0.0 ones, so a character added since
// (U+1FABF 🪿 is \p{S} in Unicode 15) would split differently. UnicodeRegex rewrites a pattern
// so that PCRE2 matches as Unicode 16 does:
//   \p{X}, \pX (X a general category): the code points that joined X since Unicode 14 are added
//     (unicode_additions.inc, from tools/tokenizer/make_unicode_tables.py; exact on PCRE2 with
//     Unicode 14 to 16 tables, as no code point left these categories); \P{X} outside a class,
//     \d and \D (\p{Nd}) likewise. \P{X} inside a class is left to PCRE2.
//   \s, \S: the White_Space property (stable since Unicode 6.3; PCRE2 also counts U+180E).
// \w and \p{<script>} are left to PCRE2. tests/tokenizer/deepseek_conformance_test.py checks
// the result against `tokenizers` on DeepSeek-V3's vocabulary.
struct CategoryAddition {
  std::string_view category;
  std::string_view items;  // PCRE2 class items: \x{..} and \x{..}-\x{..}
};
constexpr CategoryAddition kCategoryAdditions[] = {
#include "core/text/unicode_additions.inc"
};
constexpr std::string_view kWhiteSpace =
    R"(\t\n\x{b}\f\r\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f})"
    R"(\x{205f}\x{3000})";
constexpr std::string_view kNotWhiteSpace =
    R"(\x{0}-\x{8}\x{e}-\x{1f}\x{21}-\x{84}\x{86}-\x{9f}\x{a1}-\x{167f}\x{1681}-\x{1fff})"
    R"(\x{200b}-\x{2027}\x{202a}-\x{202e}\x{2030}-\x{205e}\x{2060}-\x{2fff})"
    R"(\x{3001}-\x{d7ff}\x{e000}-\x{10ffff})";

std::string UnicodeRegex(std::string_view p) {
  auto additions = [](std::string_view category) -> std::optional<std::string_view> {
    for (const CategoryAddition& a : kCategoryAdditions) {
      if (a.category == category) return a.items;
    }
    return std::nullopt;
  };
  std::string out;
  out.reserve(p.size());
  bool in_class = false;
  size_t i = 0;
  while (i < p.size()) {
    char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      char d = p[i + 1];
      if (d == 'Q') {  // \Q...\E: literal text, copied as it is
        size_t end = p.find("\\E", i + 2);
        end = end == std::string_view::npos ? p.size() : end + 2;
        out.append(p.substr(i, end - i));
        i = end;
        continue;
      }
      std::string_view category;
      size_t len = 2;
      bool negated = d == 'P' || d == 'D';
      if (d == 'p' || d == 'P') {
        if (i + 2 < p.size() && p[i + 2] == '{') {
          size_t close = p.find('}', i + 3);
          if (close != std::string_view::npos) {
            category = p.substr(i + 3, close - i - 3);
            len = close + 1 - i;
          }
        } else if (i + 2 < p.size()) {
          category = p.substr(i + 2, 1);
          len = 3;
        }
      } else if (d == 'd' || d == 'D') {
        category = "Nd";
      }
      std::optional<std::string_view> added = category.empty() ? std::nullopt : additions(category);
      // In a class, "\\d-z" is an error for PCRE2; expanded, it would become a range: kept.
      if (in_class && i + len + 1 < p.size() && p[i + len] == '-' && p[i + len + 1] != ']') {
        out.append(p.substr(i, len));
        i += len;
        continue;
      }
      if (added && !(negated && in_class)) {
        std::string own = "\\p{" + std::string(category) + "}";
        if (in_class) {
          out += own;
          out += *added;
        } else {
          out += negated ? "[^" : "[";
          out += own;
          out += *added;
          out += ']';
        }
        i += len;
        continue;
      }
      if (d == 's' || d == 'S') {
        std::string_view items = d == 's' ? kWhiteSpace : kNotWhiteSpace;
        if (!in_class) out += '[';
        out += items;
        if (!in_class) out += ']';
        i += 2;
        continue;
      }
      out.append(p.substr(i, len));  // any other escape, copied whole
      i += len;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      ++i;
      if (i < p.size() && p[i] == '^') out += p[i++];
      if (i < p.size() && p[i] == ']') out += p[i++];  // a leading ']' is literal
      continue;
    }
    if (in_class && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {  // [:alpha:]
      size_t end = p.find(":]", i + 2);
      end = end == std::string_view::npos ? p.size() : end + 2;
      out.append(p.substr(i, end - i));
      i = end;
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out += c;
    ++i;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// PCRE2 regex (UTF + UCP), compiled once, matched from many threads.
class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Create(std::string_view source) {
    int error = 0;
    PCRE2_SIZE error_offset = 0;
    std::string pattern = UnicodeRegex(source);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP, &error, &error_offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      return absl::InvalidArgumentError(absl::StrCat("regex '", std::string(source), "' at ",
                                                     error_offset, " (of '", pattern,
                                                     "'): ", reinterpret_cast<char*>(message)));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter on failure
    return std::unique_ptr<Regex>(new Regex(code));
  }
  ~Regex() { pcre2_code_free(code_); }

  // Non-empty, non-overlapping matches of the regex in valid UTF-8 `s` as [begin, end).
  // Fails (rather than returning fewer matches) when PCRE2 hits a resource limit.
  absl::StatusOr<std::vector<std::pair<size_t, size_t>>> FindAll(std::string_view s) const {
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t pos = 0;
    while (pos <= s.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos,
                           PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        pcre2_match_data_free(md);
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof(message));
        return absl::ResourceExhaustedError(
            absl::StrCat("regex match failed: ", reinterpret_cast<char*>(message)));
      }
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[1] > ov[0]) {
        out.emplace_back(ov[0], ov[1]);
        pos = ov[1];
      } else {  // empty match: step over one code point
        pos = ov[0] + 1;
        while (pos < s.size() && (static_cast<uint8_t>(s[pos]) & 0xC0) == 0x80) ++pos;
      }
    }
    pcre2_match_data_free(md);
    return out;
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

std::string QuoteRegex(std::string_view literal) {
  std::string out;
  for (char c : literal) {
    if (static_cast<unsigned char>(c) < 0x80 && !std::isalnum(static_cast<unsigned char>(c))) {
      out += '\\';
    }
    out += c;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// JSON access that reports errors instead of throwing.

const json::object* Obj(const json::value* v) { return v ? v->if_object() : nullptr; }
const json::value* Field(const json::object* o, std::string_view key) {
  return o ? o->if_contains(key) : nullptr;  // JSON null kept: IsNull() tells it apart
}
std::optional<std::string> Str(const json::object* o, std::string_view key) {
  const json::value* v = Field(o, key);
  return v ? json_field::AsString(*v) : std::nullopt;
}
bool Bool(const json::object* o, std::string_view key, bool fallback) {
  const json::value* v = Field(o, key);
  return v ? json_field::AsBool(*v).value_or(fallback) : fallback;
}
bool IsNull(const json::value* v) { return v == nullptr || v->is_null(); }

absl::StatusOr<json::value> ParseJson(std::string_view text, std::string_view what) {
  boost::system::error_code ec;
  json::value v = json::parse(json::string_view(text.data(), text.size()), ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": ", ec.message()));
  return v;
}

// ---------------------------------------------------------------------------------------------
// Normalizers

struct NormalizerStep {
  enum Kind { kUnicode, kPrepend, kReplace } kind = kUnicode;
  const icu::Normalizer2* unicode = nullptr;  // NFC / NFD / NFKC / NFKD
  std::string text;                           // Prepend: prefix; Replace: replacement
  std::unique_ptr<Regex> pattern;             // Replace
};

absl::Status ParseNormalizer(const json::value* v, std::vector<NormalizerStep>* steps) {
  if (IsNull(v)) return absl::OkStatus();
  const json::object* o = Obj(v);
  std::string type = Str(o, "type").value_or("");
  if (type == "Sequence") {
    const json::value* list = Field(o, "normalizers");
    if (list == nullptr || !list->is_array()) {
      return absl::InvalidArgumentError("normalizer Sequence without normalizers");
    }
    for (const json::value& n : list->get_array()) {
      EM_RETURN_IF_ERROR(ParseNormalizer(&n, steps));
    }
    return absl::OkStatus();
  }
  NormalizerStep step;
  UErrorCode err = U_ZERO_ERROR;
  if (type == "NFC") {
    step.kind = NormalizerStep::kUnicode;
    step.unicode = icu::Normalizer2::getNFCInstance(err);
  } else if (type == "NFD") {
    step.kind = NormalizerStep::kUnicode;
    step.unicode = icu::Normalizer2::getNFDInstance(err);
  } else if (type == "NFKC") {
    step.kind = NormalizerStep::kUnicode;
    step.unicode = icu::Normalizer2::getNFKCInstance(err);
  } else if (type == "NFKD") {
    step.kind = NormalizerStep::kUnicode;
    step.unicode = icu::Normalizer2::getNFKDInstance(err);
  } else if (type == "Prepend") {
    step.kind = NormalizerStep::kPrepend;
    step.text = Str(o, "prepend").value_or("");
  } else if (type == "Replace") {
    step.kind = NormalizerStep::kReplace;
    const json::object* pat = Obj(Field(o, "pattern"));
    std::optional<std::string> content = Str(o, "content");
    std::optional<std::string> literal = Str(pat, "String");
    std::optional<std::string> regex = Str(pat, "Regex");
    if (!content || (!literal && !regex)) {
      return absl::InvalidArgumentError("Replace normalizer needs pattern and content");
    }
    step.text = *content;
    EM_ASSIGN_OR_RETURN(step.pattern, Regex::Create(regex ? *regex : QuoteRegex(*literal)));
  } else {
    return absl::UnimplementedError(absl::StrCat("unsupported normalizer type '", type, "'"));
  }
  if (U_FAILURE(err)) return absl::InternalError("ICU normalizer unavailable");
  steps->push_back(std::move(step));
  return absl::OkStatus();
}

absl::StatusOr<std::string> Normalize(const std::vector<NormalizerStep>& steps, std::string s) {
  for (const NormalizerStep& step : steps) {
    switch (step.kind) {
      case NormalizerStep::kUnicode: {
        UErrorCode err = U_ZERO_ERROR;
        std::string out;
        icu::StringByteSink<std::string> sink(&out);
        step.unicode->normalizeUTF8(0, icu::StringPiece(s.data(), s.size()), sink, nullptr, err);
        if (U_FAILURE(err)) {
          return absl::InternalError(absl::StrCat("ICU normalization: ", u_errorName(err)));
        }
        s = std::move(out);
        break;
      }
      case NormalizerStep::kPrepend:
        if (!s.empty()) s = step.text + s;
        break;
      case NormalizerStep::kReplace: {
        std::string out;
        size_t last = 0;
        EM_ASSIGN_OR_RETURN(auto matches, step.pattern->FindAll(s));
        for (auto [b, e] : matches) {
          out.append(s, last, b - last).append(step.text);
          last = e;
        }
        s = out.append(s, last);
        break;
      }
    }
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum Kind { kSplit, kByteLevel } kind;
  std::unique_ptr<Regex> pattern;  // Split, or ByteLevel with use_regex
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
};

// Splits `s` as tokenizers' NormalizedString::split does.
absl::Status SplitPiece(const PreTokenizerStep& step, const std::string& s,
                        std::vector<std::string>* out) {
  // Spans covering s: (begin, end, is_match).
  std::vector<std::tuple<size_t, size_t, bool>> spans;
  size_t last = 0;
  EM_ASSIGN_OR_RETURN(auto matches, step.pattern->FindAll(s));
  for (auto [b, e] : matches) {
    if (b > last) spans.emplace_back(last, b, false);
    spans.emplace_back(b, e, true);
    last = e;
  }
  if (last < s.size()) spans.emplace_back(last, s.size(), false);
  if (step.invert) {
    for (auto& span : spans) std::get<2>(span) = !std::get<2>(span);
  }
  std::vector<std::pair<size_t, size_t>> pieces;
  switch (step.behavior) {
    case SplitBehavior::kIsolated:
      for (auto [b, e, m] : spans) pieces.emplace_back(b, e);
      break;
    case SplitBehavior::kRemoved:
      for (auto [b, e, m] : spans) {
        if (!m) pieces.emplace_back(b, e);
      }
      break;
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (auto [b, e, m] : spans) {
        if (m && !previous_match && !pieces.empty()) {
          pieces.back().second = e;
        } else {
          pieces.emplace_back(b, e);
        }
        previous_match = m;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto [b, e, m] : spans) {
        if (previous_match && !m && !pieces.empty()) {
          pieces.back().second = e;
        } else {
          pieces.emplace_back(b, e);
        }
        previous_match = m;
      }
      break;
    }
    case SplitBehavior::kContiguous: {  // adjacent spans of the same kind merge
      bool previous_match = false;
      for (auto [b, e, m] : spans) {
        if (m == previous_match && !pieces.empty()) {
          pieces.back().second = e;
        } else {
          pieces.emplace_back(b, e);
        }
        previous_match = m;
      }
      break;
    }
  }
  for (auto [b, e] : pieces) {
    if (e > b) out->push_back(s.substr(b, e - b));
  }
  return absl::OkStatus();
}

absl::Status ParsePreTokenizer(const json::value* v, std::vector<PreTokenizerStep>* steps) {
  if (IsNull(v)) return absl::OkStatus();
  const json::object* o = Obj(v);
  std::string type = Str(o, "type").value_or("");
  if (!steps->empty() && steps->back().kind == PreTokenizerStep::kByteLevel) {
    return absl::UnimplementedError("pre-tokenizers after ByteLevel are not supported");
  }
  if (type == "Sequence") {
    const json::value* list = Field(o, "pretokenizers");
    if (list == nullptr || !list->is_array()) {
      return absl::InvalidArgumentError("pre_tokenizer Sequence without pretokenizers");
    }
    for (const json::value& p : list->get_array()) {
      EM_RETURN_IF_ERROR(ParsePreTokenizer(&p, steps));
    }
    return absl::OkStatus();
  }
  PreTokenizerStep step;
  if (type == "Split") {
    step.kind = PreTokenizerStep::kSplit;
    const json::object* pat = Obj(Field(o, "pattern"));
    std::optional<std::string> literal = Str(pat, "String");
    std::optional<std::string> regex = Str(pat, "Regex");
    if (!literal && !regex) return absl::InvalidArgumentError("Split without a pattern");
    EM_ASSIGN_OR_RETURN(step.pattern, Regex::Create(regex ? *regex : QuoteRegex(*literal)));
    static const std::pair<std::string_view, SplitBehavior> kBehaviors[] = {
        {"Removed", SplitBehavior::kRemoved},
        {"Isolated", SplitBehavior::kIsolated},
        {"MergedWithPrevious", SplitBehavior::kMergedWithPrevious},
        {"MergedWithNext", SplitBehavior::kMergedWithNext},
        {"Contiguous", SplitBehavior::kContiguous}};
    std::string behavior = Str(o, "behavior").value_or("");
    auto it = std::find_if(std::begin(kBehaviors), std::end(kBehaviors),
                           [&](const auto& b) { return b.first == behavior; });
    if (it == std::end(kBehaviors)) {
      return absl::InvalidArgumentError(absl::StrCat("unknown Split behavior '", behavior, "'"));
    }
    step.behavior = it->second;
    step.invert = Bool(o, "invert", false);
  } else if (type == "ByteLevel") {
    step.kind = PreTokenizerStep::kByteLevel;
    step.add_prefix_space = Bool(o, "add_prefix_space", true);
    if (Bool(o, "use_regex", true)) {
      EM_ASSIGN_OR_RETURN(step.pattern, Regex::Create(kGpt2Pattern));
    }
  } else {
    return absl::UnimplementedError(absl::StrCat("unsupported pre_tokenizer type '", type, "'"));
  }
  steps->push_back(std::move(step));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Added tokens

struct AddedToken {
  int32_t id;
  std::string content;  // as matched: normalized when `normalized`
  bool special, lstrip, rstrip, single_word, normalized;
};

// One piece of text between added tokens, or an added token (id >= 0).
struct Segment {
  int32_t id;
  std::string text;
};

// Finds `tokens` in `s` leftmost-longest and cuts `s` around them, honouring single_word,
// lstrip and rstrip as tokenizers' AddedVocabulary::find_matches does.
// Added tokens indexed by their first byte, so that a text is scanned once whatever their
// number (DeepSeek-V3 has about 800, all starting with '<').
struct AddedTokenSet {
  std::vector<const AddedToken*> by_first_byte[256];
  bool empty = true;
  void Add(const AddedToken* t) {
    if (t->content.empty()) return;
    by_first_byte[static_cast<uint8_t>(t->content[0])].push_back(t);
    empty = false;
  }
};

void SplitAddedTokens(const AddedTokenSet& tokens, const std::string& s,
                      std::vector<Segment>* out) {
  if (tokens.empty) {
    if (!s.empty()) out->push_back({-1, s});
    return;
  }
  size_t start_offset = 0, pos = 0;
  while (pos < s.size()) {
    const AddedToken* best = nullptr;
    for (const AddedToken* t : tokens.by_first_byte[static_cast<uint8_t>(s[pos])]) {
      if (s.compare(pos, t->content.size(), t->content) == 0 &&
          (best == nullptr || t->content.size() > best->content.size())) {
        best = t;
      }
    }
    if (best == nullptr) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + best->content.size();
    pos = stop;
    if (best->single_word) {
      bool start_space = true, stop_space = true;
      if (start > 0) {
        size_t i = start;
        start_space = !IsAlphanumeric(PrevCodePoint(s, &i));
      }
      if (stop < s.size()) {
        size_t i = stop;
        stop_space = !IsAlphanumeric(NextCodePoint(s, &i));
      }
      if (!start_space || !stop_space) continue;
    }
    if (best->lstrip) {
      size_t i = start;
      while (i > 0) {
        size_t j = i;
        if (!IsWhitespace(PrevCodePoint(s, &j))) break;
        i = j;
      }
      start = std::max(i, start_offset);
    }
    if (best->rstrip) {
      while (stop < s.size()) {
        size_t j = stop;
        if (!IsWhitespace(NextCodePoint(s, &j))) break;
        stop = j;
      }
    }
    if (start_offset < start) out->push_back({-1, s.substr(start_offset, start - start_offset)});
    out->push_back({best->id, ""});
    start_offset = stop;
  }
  if (start_offset < s.size()) out->push_back({-1, s.substr(start_offset)});
}

}  // namespace

// ---------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::vector<NormalizerStep> normalizer;
  std::vector<PreTokenizerStep> pre_tokenizer;

  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> id_to_token;  // indexed by id; added tokens included
  std::vector<uint8_t> id_is_special;
  // (left id << 32 | right id) -> (rank, merged id)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;
  std::optional<int32_t> unk_id;
  bool ignore_merges = false;

  std::vector<AddedToken> added;
  AddedTokenSet raw_added;         // matched before normalization
  AddedTokenSet normalized_added;  // matched after normalization
  std::unordered_map<std::string, int32_t> added_by_content;

  std::optional<int32_t> bos, eos;

  // Bounded cache of BPE results per pre-token; when full, new results are not stored.
  static constexpr size_t kCacheCapacity = 1 << 16;
  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  void Bpe(const std::string& word, std::vector<int32_t>* ids) const;
  void EncodePiece(const std::string& piece, std::vector<int32_t>* ids) const;

  // FromJson's phases, in order.
  absl::Status LoadPipeline(const json::object* root);  // normalizer, pre-tokenizer, decoder
  absl::StatusOr<int32_t> LoadVocab(const json::object* model);  // returns the largest id
  absl::Status LoadAddedTokens(const json::object* root, int32_t* max_id);
  absl::Status BuildIdTables(int32_t max_id);  // id -> token text, specials, matchers
  absl::Status LoadMerges(const json::object* model);
  absl::Status ResolveBosEos(const json::object* root, std::string_view config_json);
  std::optional<int32_t> IdOf(const std::optional<std::string>& name) const;
};

// Merges the symbols of `word` (a byte-level string) lowest rank first, leftmost on ties.
void Tokenizer::Impl::Bpe(const std::string& word, std::vector<int32_t>* ids) const {
  if (ignore_merges) {
    if (auto it = vocab.find(word); it != vocab.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // -1 at the ends
  };
  std::vector<Symbol> symbols;
  for (const CodePoint& cp : CodePoints(word)) {
    auto it = vocab.find(word.substr(cp.offset, cp.length));
    if (it != vocab.end()) {
      symbols.push_back({it->second, -1, -1});
    } else if (unk_id) {
      symbols.push_back({*unk_id, -1, -1});
    }
  }
  for (size_t i = 0; i < symbols.size(); ++i) {
    symbols[i].prev = static_cast<int32_t>(i) - 1;
    symbols[i].next = i + 1 < symbols.size() ? static_cast<int32_t>(i) + 1 : -1;
  }
  struct Candidate {
    int32_t rank, pos, new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  auto lookup = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
    auto it = merges.find(static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32 |
                          static_cast<uint32_t>(b));
    return it == merges.end() ? nullptr : &it->second;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (auto* m = lookup(symbols[i].id, symbols[i + 1].id)) {
      queue.push({m->first, static_cast<int32_t>(i), m->second});
    }
  }
  std::vector<uint8_t> removed(symbols.size(), 0);
  while (!queue.empty()) {
    Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (removed[top.pos] || left.next < 0) continue;
    const Symbol& right = symbols[left.next];
    auto* m = lookup(left.id, right.id);
    if (m == nullptr || m->second != top.new_id) continue;  // stale candidate
    int32_t right_pos = left.next;
    left.id = top.new_id;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    removed[right_pos] = 1;
    if (left.prev >= 0) {
      if (auto* p = lookup(symbols[left.prev].id, left.id)) {
        queue.push({p->first, left.prev, p->second});
      }
    }
    if (left.next >= 0) {
      if (auto* n = lookup(left.id, symbols[left.next].id)) {
        queue.push({n->first, top.pos, n->second});
      }
    }
  }
  for (int32_t i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) {
    ids->push_back(symbols[i].id);
  }
}

// Byte-level-maps one pre-token and appends its BPE ids, through the cache.
void Tokenizer::Impl::EncodePiece(const std::string& piece, std::vector<int32_t>* ids) const {
  std::string word;
  const ByteLevelTable& table = ByteLevel();
  for (unsigned char b : piece) word += table.byte_to_char[b];
  {
    std::lock_guard<std::mutex> lock(cache_mu);
    if (auto it = cache.find(word); it != cache.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> result;
  Bpe(word, &result);
  ids->insert(ids->end(), result.begin(), result.end());
  std::lock_guard<std::mutex> lock(cache_mu);
  if (cache.size() < kCacheCapacity) cache.emplace(std::move(word), std::move(result));
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  EM_ASSIGN_OR_RETURN(const std::string text, base::ReadFile(path));
  std::string config;
  std::filesystem::path config_path =
      std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  std::error_code ec;
  if (std::filesystem::exists(config_path, ec)) {
    EM_ASSIGN_OR_RETURN(config, base::ReadFile(config_path.string()));
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = FromJson(text, config);
  if (!tok.ok()) {
    return absl::Status(tok.status().code(), absl::StrCat(path, ": ", tok.status().message()));
  }
  return tok;
}

absl::Status Tokenizer::Impl::LoadPipeline(const json::object* root) {
  EM_RETURN_IF_ERROR(ParseNormalizer(Field(root, "normalizer"), &normalizer));
  EM_RETURN_IF_ERROR(ParsePreTokenizer(Field(root, "pre_tokenizer"), &pre_tokenizer));
  const bool byte_level =
      !pre_tokenizer.empty() && pre_tokenizer.back().kind == PreTokenizerStep::kByteLevel;
  const std::string decoder_type = Str(Obj(Field(root, "decoder")), "type").value_or("");
  if (decoder_type != "ByteLevel" || !byte_level) {
    return absl::UnimplementedError(
        "only byte-level BPE is supported (ByteLevel pre_tokenizer and decoder)");
  }
  return absl::OkStatus();
}

absl::StatusOr<int32_t> Tokenizer::Impl::LoadVocab(const json::object* model) {
  if (Str(model, "type").value_or("BPE") != "BPE" || Field(model, "vocab") == nullptr ||
      !Field(model, "vocab")->is_object()) {
    return absl::UnimplementedError("model must be BPE with a vocab");
  }
  if (!IsNull(Field(model, "continuing_subword_prefix")) ||
      !IsNull(Field(model, "end_of_word_suffix"))) {
    return absl::UnimplementedError("BPE continuing_subword_prefix/end_of_word_suffix");
  }
  if (Bool(model, "byte_fallback", false)) return absl::UnimplementedError("BPE byte_fallback");
  if (!IsNull(Field(model, "dropout")) && Field(model, "dropout")->is_double() &&
      Field(model, "dropout")->get_double() > 0) {
    return absl::UnimplementedError("BPE dropout");
  }
  ignore_merges = Bool(model, "ignore_merges", false);
  int32_t max_id = -1;
  for (const auto& [token, id_value] : Field(model, "vocab")->get_object()) {
    if (!id_value.is_int64() || id_value.get_int64() < 0 || id_value.get_int64() > (1 << 30)) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad id for token '", std::string(token), "'"));
    }
    const int32_t id = static_cast<int32_t>(id_value.get_int64());
    vocab.emplace(std::string(token), id);
    max_id = std::max(max_id, id);
  }
  if (std::optional<std::string> unk = Str(model, "unk_token")) {
    if (auto it = vocab.find(*unk); it != vocab.end()) unk_id = it->second;
  }
  return max_id;
}

absl::Status Tokenizer::Impl::LoadAddedTokens(const json::object* root, int32_t* max_id) {
  const json::value* list = Field(root, "added_tokens");
  if (list == nullptr || !list->is_array()) return absl::OkStatus();
  for (const json::value& v : list->get_array()) {
    const json::object* t = v.if_object();
    std::optional<std::string> content = Str(t, "content");
    const json::value* id_value = Field(t, "id");
    if (!content || id_value == nullptr || !id_value->is_int64() || id_value->get_int64() < 0 ||
        id_value->get_int64() > (1 << 30)) {
      return absl::InvalidArgumentError("added token without content or id");
    }
    AddedToken a{static_cast<int32_t>(id_value->get_int64()),
                 *content,
                 Bool(t, "special", false),
                 Bool(t, "lstrip", false),
                 Bool(t, "rstrip", false),
                 Bool(t, "single_word", false),
                 Bool(t, "normalized", false)};
    *max_id = std::max(*max_id, a.id);
    added.push_back(std::move(a));
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::BuildIdTables(int32_t max_id) {
  id_to_token.assign(max_id + 1, "");
  id_is_special.assign(max_id + 1, 0);
  for (const auto& [token, id] : vocab) id_to_token[id] = token;
  for (AddedToken& a : added) {
    id_is_special[a.id] = a.special;
    added_by_content[a.content] = a.id;
    // Normalized tokens are matched in normalized text, so their content is normalized too;
    // like `tokenizers`, the token's text (id_to_token, Decode) is then the normalized form.
    if (a.normalized) {
      EM_ASSIGN_OR_RETURN(a.content, Normalize(normalizer, a.content));
    }
    id_to_token[a.id] = a.content;
  }
  for (const AddedToken& a : added) (a.normalized ? normalized_added : raw_added).Add(&a);
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::LoadMerges(const json::object* model) {
  // "a b" strings or [a, b] pairs; rank = position.
  const json::value* list = Field(model, "merges");
  if (list == nullptr || !list->is_array()) return absl::OkStatus();
  int32_t rank = 0;
  for (const json::value& m : list->get_array()) {
    std::string a, b;
    if (m.is_string()) {
      std::string_view s = m.get_string();
      size_t space = s.find(' ', 1);
      if (space == std::string_view::npos) {
        return absl::InvalidArgumentError(absl::StrCat("bad merge '", std::string(s), "'"));
      }
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else if (m.is_array() && m.get_array().size() == 2 && m.get_array()[0].is_string() &&
               m.get_array()[1].is_string()) {
      a = m.get_array()[0].get_string();
      b = m.get_array()[1].get_string();
    } else {
      return absl::InvalidArgumentError("merge is neither \"a b\" nor [a, b]");
    }
    auto ia = vocab.find(a), ib = vocab.find(b), iab = vocab.find(a + b);
    if (ia == vocab.end() || ib == vocab.end() || iab == vocab.end()) {
      return absl::InvalidArgumentError(absl::StrCat("merge '", a, " ", b, "' outside vocab"));
    }
    uint64_t key = static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32 |
                   static_cast<uint32_t>(ib->second);
    merges.try_emplace(key, rank++, iab->second);
  }
  return absl::OkStatus();
}

std::optional<int32_t> Tokenizer::Impl::IdOf(const std::optional<std::string>& name) const {
  if (!name) return std::nullopt;
  if (auto it = added_by_content.find(*name); it != added_by_content.end()) return it->second;
  if (auto it = vocab.find(*name); it != vocab.end()) return it->second;
  return std::nullopt;
}

absl::Status Tokenizer::Impl::ResolveBosEos(const json::object* root,
                                            std::string_view config_json) {
  // tokenizer_config.json, else the post-processor's first special token.
  auto token_name = [](const json::value* v) -> std::optional<std::string> {
    if (v && v->is_string()) return std::string(v->get_string());
    return Str(Obj(v), "content");
  };
  if (!config_json.empty()) {
    EM_ASSIGN_OR_RETURN(json::value config, ParseJson(config_json, "tokenizer_config.json"));
    bos = IdOf(token_name(Field(config.if_object(), "bos_token")));
    eos = IdOf(token_name(Field(config.if_object(), "eos_token")));
  }
  if (!bos) {
    const json::object* post = Obj(Field(root, "post_processor"));
    const json::value* single = Field(post, "single");
    if (Str(post, "type").value_or("") == "TemplateProcessing" && single && single->is_array() &&
        !single->get_array().empty()) {
      const json::object* first = Obj(Field(Obj(&single->get_array()[0]), "SpecialToken"));
      bos = IdOf(Str(first, "id"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view tokenizer_json,
                                                               std::string_view config_json) {
  EM_ASSIGN_OR_RETURN(json::value doc, ParseJson(tokenizer_json, "tokenizer.json"));
  const json::object* root = doc.if_object();
  if (root == nullptr) return absl::InvalidArgumentError("tokenizer.json is not an object");
  auto impl = std::make_unique<Impl>();
  EM_RETURN_IF_ERROR(impl->LoadPipeline(root));
  const json::object* model = Obj(Field(root, "model"));
  EM_ASSIGN_OR_RETURN(int32_t max_id, impl->LoadVocab(model));
  EM_RETURN_IF_ERROR(impl->LoadAddedTokens(root, &max_id));
  EM_RETURN_IF_ERROR(impl->BuildIdTables(max_id));
  EM_RETURN_IF_ERROR(impl->LoadMerges(model));
  EM_RETURN_IF_ERROR(impl->ResolveBosEos(root, config_json));
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text, bool add_bos) const {
  if (text.size() >= kMaxTextBytes) {
    return absl::InvalidArgumentError(absl::StrCat("text of ", text.size(), " bytes is too long"));
  }
  if (size_t bad = FindInvalidUtf8(text); bad != std::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("text is not valid UTF-8 (byte ", bad, " of ", text.size(), ")"));
  }
  std::vector<int32_t> ids;
  if (add_bos) {
    if (!impl_->bos) return absl::FailedPreconditionError("the tokenizer has no BOS token");
    ids.push_back(*impl_->bos);
  }
  std::vector<Segment> raw, segments;
  SplitAddedTokens(impl_->raw_added, std::string(text), &raw);
  for (Segment& seg : raw) {
    if (seg.id >= 0) {
      segments.push_back(std::move(seg));
    } else {
      EM_ASSIGN_OR_RETURN(std::string normalized, Normalize(impl_->normalizer, seg.text));
      SplitAddedTokens(impl_->normalized_added, normalized, &segments);
    }
  }
  for (const Segment& seg : segments) {
    if (seg.id >= 0) {
      ids.push_back(seg.id);
      continue;
    }
    std::vector<std::string> pieces{seg.text};
    for (const PreTokenizerStep& step : impl_->pre_tokenizer) {
      std::vector<std::string> next;
      for (std::string& p : pieces) {
        if (step.kind == PreTokenizerStep::kByteLevel) {
          if (step.add_prefix_space && p.front() != ' ') p.insert(0, " ");
          if (step.pattern == nullptr) {
            next.push_back(std::move(p));
            continue;
          }
        }
        EM_RETURN_IF_ERROR(SplitPiece(step, p, &next));
      }
      pieces = std::move(next);
    }
    for (const std::string& p : pieces) impl_->EncodePiece(p, &ids);
  }
  return ids;
}

void Tokenizer::AppendTokenBytes(int32_t id, bool skip_special_tokens, std::string* out) const {
  if (id < 0 || id >= static_cast<int32_t>(impl_->id_to_token.size())) return;
  if (skip_special_tokens && impl_->id_is_special[id]) return;
  const std::string& token = impl_->id_to_token[id];
  if (token.empty()) return;
  // ByteLevel decoder: map every character back to its byte; a token with a character outside
  // the table (e.g. an added token such as "<｜User｜>") contributes its UTF-8 as it is.
  const ByteLevelTable& table = ByteLevel();
  std::string bytes;
  for (const CodePoint& cp : CodePoints(token)) {
    auto it = table.char_to_byte.find(cp.c);
    if (it == table.char_to_byte.end()) {
      out->append(token);
      return;
    }
    bytes.push_back(static_cast<char>(it->second));
  }
  out->append(bytes);
}

std::vector<std::string> Tokenizer::TokenByteTable() const {
  std::vector<std::string> table(static_cast<size_t>(vocab_size()));
  for (size_t id = 0; id < table.size(); ++id) {
    AppendTokenBytes(static_cast<int32_t>(id), true, &table[id]);
  }
  return table;
}

std::string Tokenizer::Decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  for (int32_t id : ids) AppendTokenBytes(id, skip_special_tokens, &bytes);
  return Utf8Lossy(bytes);
}

Tokenizer::StreamDecoder::StreamDecoder(const Tokenizer* tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string Tokenizer::StreamDecoder::Push(int32_t id) {
  tokenizer_->AppendTokenBytes(id, skip_special_tokens_, &pending_);
  size_t n = Utf8StablePrefix(pending_);
  std::string out = Utf8Lossy(std::string_view(pending_).substr(0, n));
  pending_.erase(0, n);
  return out;
}

std::string Tokenizer::StreamDecoder::Flush() {
  std::string out = Utf8Lossy(pending_);
  pending_.clear();
  return out;
}

std::optional<int32_t> Tokenizer::TokenId(std::string_view token) const {
  std::string key(token);
  if (auto it = impl_->added_by_content.find(key); it != impl_->added_by_content.end()) {
    return it->second;
  }
  if (auto it = impl_->vocab.find(key); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

std::optional<std::string_view> Tokenizer::TokenText(int32_t id) const {
  if (id < 0 || id >= static_cast<int32_t>(impl_->id_to_token.size()) ||
      impl_->id_to_token[id].empty()) {
    return std::nullopt;
  }
  return impl_->id_to_token[id];
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < static_cast<int32_t>(impl_->id_is_special.size()) &&
         impl_->id_is_special[id];
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_to_token.size()); }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }

}  // namespace expertmesh
