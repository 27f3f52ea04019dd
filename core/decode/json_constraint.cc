#include "core/decode/json_constraint.h"

#include <algorithm>
#include <array>
#include <limits>

namespace expertmesh {
namespace {

bool IsWhitespace(uint8_t b) { return b == ' ' || b == '\t' || b == '\n' || b == '\r'; }
bool IsDigit(uint8_t b) { return b >= '0' && b <= '9'; }
bool IsHex(uint8_t b) { return IsDigit(b) || (b >= 'a' && b <= 'f') || (b >= 'A' && b <= 'F'); }

}  // namespace

JsonAutomaton::JsonAutomaton(Limits limits) : limits_(limits) {
  limits_.max_depth = std::clamp(limits_.max_depth, 1, kMaxDepthLimit);
  limits_.max_whitespace = std::clamp(limits_.max_whitespace, 0, 255);
}

bool JsonAutomaton::Whitespace(uint8_t) {
  if (whitespace_ >= limits_.max_whitespace) return Fail();
  ++whitespace_;
  return true;
}

bool JsonAutomaton::Open(bool object) {
  if (depth_ >= limits_.max_depth) return Fail();
  const uint64_t bit = uint64_t{1} << depth_;
  objects_ = object ? (objects_ | bit) : (objects_ & ~bit);
  ++depth_;
  state_ = object ? State::kObjectFirst : State::kArrayFirst;
  return true;
}

bool JsonAutomaton::Close(bool object) {
  if (depth_ == 0) return Fail();
  const bool top_is_object = (objects_ >> (depth_ - 1)) & 1;
  if (top_is_object != object) return Fail();
  --depth_;
  return EndValue();
}

bool JsonAutomaton::EndValue() {
  state_ = depth_ == 0 ? State::kDone : State::kAfter;
  return true;
}

bool JsonAutomaton::StartValue(uint8_t b) {
  switch (b) {
    case '{':
      return Open(true);
    case '[':
      return Open(false);
    case '"':
      key_ = false;
      state_ = State::kString;
      return true;
    case '-':
      state_ = State::kMinus;
      return true;
    case '0':
      state_ = State::kZero;
      return true;
    case 't':
      literal_ = "true";
      break;
    case 'f':
      literal_ = "false";
      break;
    case 'n':
      literal_ = "null";
      break;
    default:
      if (b >= '1' && b <= '9') {
        state_ = State::kInt;
        return true;
      }
      return Fail();
  }
  left_ = 1;
  state_ = State::kLiteral;
  return true;
}

bool JsonAutomaton::Feed(std::string_view bytes) {
  for (char c : bytes) {
    if (!Feed(static_cast<uint8_t>(c))) return false;
  }
  return true;
}

bool JsonAutomaton::Feed(uint8_t b) {
  // Whitespace runs are counted where whitespace is allowed (between tokens); any other byte
  // ends the run.
  const bool ws = IsWhitespace(b);
  switch (state_) {
    case State::kDead:
      return false;
    case State::kStart:
      if (ws) return Whitespace(b);
      whitespace_ = 0;
      return b == '{' ? Open(true) : Fail();
    case State::kDone:
      return ws ? Whitespace(b) : Fail();
    case State::kValue:
    case State::kArrayFirst:
      if (ws) return Whitespace(b);
      whitespace_ = 0;
      if (b == ']' && state_ == State::kArrayFirst) return Close(false);
      return StartValue(b);
    case State::kObjectFirst:
    case State::kObjectKey:
      if (ws) return Whitespace(b);
      whitespace_ = 0;
      if (b == '}' && state_ == State::kObjectFirst) return Close(true);
      if (b != '"') return Fail();
      key_ = true;
      state_ = State::kString;
      return true;
    case State::kColon:
      if (ws) return Whitespace(b);
      whitespace_ = 0;
      if (b != ':') return Fail();
      state_ = State::kValue;
      return true;
    case State::kAfter: {
      if (ws) return Whitespace(b);
      whitespace_ = 0;
      const bool object = (objects_ >> (depth_ - 1)) & 1;
      if (b == ',') {
        state_ = object ? State::kObjectKey : State::kValue;
        return true;
      }
      if (b == '}' || b == ']') return Close(b == '}');
      return Fail();
    }
    case State::kString:
      if (b == '"') {
        if (key_) {
          state_ = State::kColon;
          return true;
        }
        return EndValue();
      }
      if (b == '\\') {
        state_ = State::kEscape;
        return true;
      }
      if (b < 0x20) return Fail();  // control characters must be escaped
      if (b < 0x80) return true;
      // UTF-8 lead bytes (RFC 3629): no overlong forms, no surrogates, nothing past U+10FFFF.
      lo_ = 0x80;
      hi_ = 0xBF;
      if (b >= 0xC2 && b <= 0xDF) {
        left_ = 1;
      } else if (b >= 0xE0 && b <= 0xEF) {
        left_ = 2;
        if (b == 0xE0) lo_ = 0xA0;
        if (b == 0xED) hi_ = 0x9F;
      } else if (b >= 0xF0 && b <= 0xF4) {
        left_ = 3;
        if (b == 0xF0) lo_ = 0x90;
        if (b == 0xF4) hi_ = 0x8F;
      } else {
        return Fail();
      }
      state_ = State::kUtf8;
      return true;
    case State::kUtf8:
      if (b < lo_ || b > hi_) return Fail();
      lo_ = 0x80;
      hi_ = 0xBF;
      if (--left_ == 0) state_ = State::kString;
      return true;
    case State::kEscape:
      switch (b) {
        case '"':
        case '\\':
        case '/':
        case 'b':
        case 'f':
        case 'n':
        case 'r':
        case 't':
          state_ = State::kString;
          return true;
        case 'u':
          left_ = 4;
          state_ = State::kHex;
          return true;
        default:
          return Fail();
      }
    case State::kHex:
      if (!IsHex(b)) return Fail();
      if (--left_ == 0) state_ = State::kString;
      return true;
    case State::kMinus:
      if (b == '0') {
        state_ = State::kZero;
        return true;
      }
      if (b >= '1' && b <= '9') {
        state_ = State::kInt;
        return true;
      }
      return Fail();
    case State::kDot:
      if (!IsDigit(b)) return Fail();
      state_ = State::kFrac;
      return true;
    case State::kExp:
      if (b == '+' || b == '-') {
        state_ = State::kExpSign;
        return true;
      }
      [[fallthrough]];
    case State::kExpSign:
      if (!IsDigit(b)) return Fail();
      state_ = State::kExpDigits;
      return true;
    case State::kZero:
    case State::kInt:
    case State::kFrac:
    case State::kExpDigits:
      if (IsDigit(b) && state_ != State::kZero) return true;
      if (b == '.' && (state_ == State::kZero || state_ == State::kInt)) {
        state_ = State::kDot;
        return true;
      }
      if ((b == 'e' || b == 'E') && state_ != State::kExpDigits) {
        state_ = State::kExp;
        return true;
      }
      // The number ended: the byte belongs to what follows it.
      EndValue();
      return Feed(b);
    case State::kLiteral:
      if (b != static_cast<uint8_t>(literal_[left_])) return Fail();
      if (literal_[++left_] == '\0') return EndValue();
      return true;
  }
  return Fail();
}

JsonConstraint::JsonConstraint(std::shared_ptr<const TokenByteTable> table,
                               std::vector<int32_t> end_tokens, JsonAutomaton::Limits limits)
    : table_(std::move(table)), end_tokens_(std::move(end_tokens)), automaton_(limits) {}

bool JsonConstraint::IsEnd(int32_t token) const {
  return std::find(end_tokens_.begin(), end_tokens_.end(), token) != end_tokens_.end();
}

bool JsonConstraint::Allowed(int32_t token) const {
  if (IsEnd(token)) return automaton_.complete();
  if (token < 0 || static_cast<size_t>(token) >= table_->size()) return false;
  const std::string& bytes = (*table_)[static_cast<size_t>(token)];
  if (bytes.empty()) return false;
  JsonAutomaton next = automaton_;
  return next.Feed(bytes);
}

void JsonConstraint::Mask(std::span<float> logits) {
  // Which first bytes the automaton takes: most states take a handful, so most tokens are
  // ruled out without copying the automaton.
  std::array<bool, 256> first{};
  for (int b = 0; b < 256; ++b) {
    JsonAutomaton next = automaton_;
    first[static_cast<size_t>(b)] = next.Feed(static_cast<uint8_t>(b));
  }
  constexpr float kOut = -std::numeric_limits<float>::infinity();
  bool any = false;
  const size_t vocab = logits.size();
  for (size_t t = 0; t < vocab; ++t) {
    const auto token = static_cast<int32_t>(t);
    bool allowed;
    if (IsEnd(token)) {
      allowed = automaton_.complete();
    } else if (t >= table_->size() || (*table_)[t].empty() ||
               !first[static_cast<uint8_t>((*table_)[t][0])]) {
      allowed = false;
    } else if ((*table_)[t].size() == 1) {
      allowed = true;
    } else {
      JsonAutomaton next = automaton_;
      allowed = next.Feed((*table_)[t]);
    }
    if (allowed) {
      any = any || logits[t] != kOut;
    } else {
      logits[t] = kOut;
    }
  }
  if (!any) {
    // Nothing can continue (a vocabulary without the bytes needed): end rather than emit a
    // token outside the grammar.
    for (int32_t e : end_tokens_) {
      if (e >= 0 && static_cast<size_t>(e) < vocab) logits[static_cast<size_t>(e)] = 0.0f;
    }
  }
}

void JsonConstraint::Accept(int32_t token) {
  if (IsEnd(token)) return;
  if (token < 0 || static_cast<size_t>(token) >= table_->size()) return;
  automaton_.Feed((*table_)[static_cast<size_t>(token)]);
}

}  // namespace expertmesh
