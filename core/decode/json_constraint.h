// JSON mode (OpenAI's response_format {"type": "json_object"}) enforced while decoding.
//
// JsonAutomaton reads bytes and stays alive exactly while they are a prefix of one JSON object
// (RFC 8259 syntax: strings with escapes and well-formed UTF-8, numbers, true/false/null,
// nested objects and arrays), followed by whitespace. It is a pushdown automaton whose stack is
// a 64-bit word (one bit per open container), so a copy is a few bytes: checking a token is
// copying the automaton and feeding it the token's bytes. Two bounds keep a model from looping
// forever inside the grammar: the nesting depth (at most 64) and runs of whitespace (at most
// `max_whitespace` bytes in a row); strings and numbers are bounded only by max_tokens.
//
// JsonConstraint applies it to a sequence's tokens: before each sample, Mask() sets the logit
// of every token whose bytes would kill the automaton to -inf, and of the end tokens (EOS,
// stop tokens) unless the object is complete; Accept() feeds the sampled token. So a sequence
// that ends by "stop" (an end token) has produced one whole JSON object. Special tokens (no
// bytes in the table) are never allowed. A sequence cut by max_tokens may end mid-object.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace expertmesh {

// The bounds of JsonAutomaton.
struct JsonLimits {
  static constexpr int kMaxDepth = 64;
  int max_depth = kMaxDepth;  // open objects and arrays, [1, 64]
  int max_whitespace = 16;    // whitespace bytes in a row
};

class JsonAutomaton {
 public:
  static constexpr int kMaxDepthLimit = JsonLimits::kMaxDepth;
  using Limits = JsonLimits;
  explicit JsonAutomaton(Limits limits = {});

  // Feeds one byte; false when it cannot continue a JSON object (the automaton is then dead
  // and rejects everything).
  bool Feed(uint8_t byte);
  // Feeds every byte; false at the first one rejected.
  bool Feed(std::string_view bytes);
  // A whole top-level object has been read (only whitespace may follow).
  bool complete() const { return state_ == State::kDone; }
  bool dead() const { return state_ == State::kDead; }
  int depth() const { return depth_; }

 private:
  enum class State : uint8_t {
    kStart,        // before the top-level object
    kValue,        // a value is expected (after ':' or ',' in an array)
    kArrayFirst,   // after '[': a value or ']'
    kObjectFirst,  // after '{': a key or '}'
    kObjectKey,    // after ',' in an object: a key
    kColon,        // after a key
    kAfter,        // after a value in a container: ',' or its closing bracket
    kString,
    kEscape,     // after '\'
    kHex,        // \uXXXX: hex_left digits to go
    kUtf8,       // utf8_left continuation bytes to go, the next in [lo, hi]
    kMinus,      // '-' read: a digit must follow
    kZero,       // a leading 0: '.', 'e' or the end of the number
    kInt,        // integer digits
    kDot,        // '.' read: a digit must follow
    kFrac,       // fraction digits
    kExp,        // 'e' read: a sign or a digit
    kExpSign,    // the exponent's sign read: a digit must follow
    kExpDigits,  // exponent digits
    kLiteral,    // inside true / false / null
    kDone,       // the top-level object is complete
    kDead,
  };
  bool Whitespace(uint8_t b);  // a whitespace byte where whitespace may stand
  bool StartValue(uint8_t b);  // the first byte of a value
  bool EndValue();             // a value ended: what follows depends on the stack
  bool Open(bool object);      // '{' or '['
  bool Close(bool object);     // '}' or ']'
  bool Fail() {
    state_ = State::kDead;
    return false;
  }

  Limits limits_;
  State state_ = State::kStart;
  bool key_ = false;         // the string being read is an object key
  uint8_t depth_ = 0;        // open containers
  uint8_t whitespace_ = 0;   // whitespace bytes in a row
  uint8_t left_ = 0;         // kHex / kUtf8: bytes to go; kLiteral: index into literal_
  uint8_t lo_ = 0, hi_ = 0;  // kUtf8: the next byte's range
  const char* literal_ = nullptr;
  uint64_t objects_ = 0;  // bit d: the container at depth d+1 is an object (else an array)
};

// Per token: its bytes as the model emits them (a byte-level BPE token's decoded bytes), empty
// for special tokens and unused ids (never allowed by a constraint).
using TokenByteTable = std::vector<std::string>;

// Logits masking for one constrained sequence (core/decode/step.h calls it before sampling).
class TokenConstraint {
 public:
  virtual ~TokenConstraint() = default;
  // Sets the logits of the tokens not allowed next to -infinity. Never masks everything: when
  // no token could continue, the end tokens stay allowed.
  virtual void Mask(std::span<float> logits) = 0;
  // The token sampled (or an end token).
  virtual void Accept(int32_t token) = 0;
};

class JsonConstraint : public TokenConstraint {
 public:
  // `end_tokens`: EOS and the stop tokens, allowed only once the object is complete.
  JsonConstraint(std::shared_ptr<const TokenByteTable> table, std::vector<int32_t> end_tokens,
                 JsonAutomaton::Limits limits = {});
  void Mask(std::span<float> logits) override;
  void Accept(int32_t token) override;
  const JsonAutomaton& automaton() const { return automaton_; }
  // Whether `token` may come next.
  bool Allowed(int32_t token) const;

 private:
  bool IsEnd(int32_t token) const;
  std::shared_ptr<const TokenByteTable> table_;
  std::vector<int32_t> end_tokens_;
  JsonAutomaton automaton_;
};

}  // namespace expertmesh
