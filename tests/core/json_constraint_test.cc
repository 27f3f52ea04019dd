// JSON mode: the byte automaton (valid and invalid prefixes, numbers, strings with escapes and
// UTF-8, literals, the depth and whitespace bounds) and the token mask built on it.
#include "core/decode/json_constraint.h"

#include <cmath>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace expertmesh {
namespace {

// Whether `text` is a prefix of a JSON object the automaton accepts, and whether it is whole.
struct Read {
  bool alive;
  bool complete;
};
Read Feed(std::string_view text, JsonAutomaton::Limits limits = {}) {
  JsonAutomaton a(limits);
  const bool alive = a.Feed(text);
  return {alive, alive && a.complete()};
}

TEST(JsonAutomaton, CompleteObjects) {
  for (
      const char* text : {
          "{}",
          " {}",
          "{} \n",
          R"({"a":1})",
          R"({ "a" : [1, 2.5, -3e10, 0, -0.0e-1, 1E+2], "b": {"c": null}, "d": true, "e": false })",
          R"({"s": "esc \" \\ \/ \b \f \n \r \t \u00e9 \uD83D\uDE00"})",
          "{\"utf8\": \"h\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xe4\xb8\xad\"}",
          R"({"nested": [[[]], [{}], {"x": [{"y": []}]}]})",
          R"({"":""})",
      }) {
    const Read r = Feed(text);
    EXPECT_TRUE(r.alive) << text;
    EXPECT_TRUE(r.complete) << text;
  }
}

TEST(JsonAutomaton, PrefixesStayAliveButIncomplete) {
  const std::string whole = R"({"key": [1.5e-3, "t\u00e9xt", true, null, {"k": -12}]})";
  for (size_t n = 0; n < whole.size(); ++n) {
    const Read r = Feed(whole.substr(0, n));
    EXPECT_TRUE(r.alive) << whole.substr(0, n);
    EXPECT_FALSE(r.complete) << whole.substr(0, n);
  }
  EXPECT_TRUE(Feed(whole).complete);
}

TEST(JsonAutomaton, RejectsInvalidBytes) {
  for (const char* text : {
           "[]",           // the top level must be an object
           "\"a\"",        // ... not a string
           "1",            // ... nor a number
           "{a:1}",        // keys are strings
           "{\"a\" 1}",    // the colon
           "{\"a\":}",     // a value
           "{\"a\":1,}",   // trailing comma
           "{\"a\":1]",    // mismatched bracket
           "{\"a\":[1}",   // mismatched bracket
           "{\"a\":01}",   // leading zero
           "{\"a\":-}",    // a digit after the minus
           "{\"a\":1.}",   // a digit after the dot
           "{\"a\":1e}",   // a digit in the exponent
           "{\"a\":+1}",   // no plus sign
           "{\"a\":.5}",   // no leading dot
           "{\"a\":tru}",  // literals
           "{\"a\":nul1}",
           "{\"a\":True}",
           "{\"a\":\"\\x\"}",      // unknown escape
           "{\"a\":\"\\u12G4\"}",  // hex digits
           "{\"a\":\"\n\"}",       // raw control character
           "{}}",                  // after the object: only whitespace
           "{} x",
           "{\"a\":1}{",
           "{\"a\": \"\xc0\xaf\"}",          // overlong UTF-8
           "{\"a\": \"\xed\xa0\x80\"}",      // a UTF-8 surrogate
           "{\"a\": \"\xf4\x90\x80\x80\"}",  // beyond U+10FFFF
           "{\"a\": \"\x80\"}",              // a lone continuation byte
           "{\"a\": \"\xe2\x82\"}",          // a sequence cut short
       }) {
    EXPECT_FALSE(Feed(text).alive) << text;
  }
}

TEST(JsonAutomaton, DeadStaysDead) {
  JsonAutomaton a;
  EXPECT_FALSE(a.Feed("x"));
  EXPECT_TRUE(a.dead());
  EXPECT_FALSE(a.Feed("{}"));
  EXPECT_FALSE(a.complete());
}

TEST(JsonAutomaton, DepthIsBounded) {
  JsonAutomaton::Limits limits;
  limits.max_depth = 4;
  EXPECT_TRUE(Feed("{\"a\":[[[]]]}", limits).complete);  // depth 4
  EXPECT_FALSE(Feed("{\"a\":[[[[", limits).alive);       // depth 5
  // The default: 64 levels and no more.
  std::string deep = "{\"a\":";
  for (int i = 1; i < 64; ++i) deep += "[";
  EXPECT_TRUE(Feed(deep).alive);
  EXPECT_FALSE(Feed(deep + "[").alive);
  for (int i = 1; i < 64; ++i) deep += "]";
  EXPECT_TRUE(Feed(deep + "}").complete);
}

TEST(JsonAutomaton, WhitespaceRunsAreBounded) {
  JsonAutomaton::Limits limits;
  limits.max_whitespace = 3;
  EXPECT_TRUE(Feed("{   \"a\"   :   1   }   ", limits).complete);
  EXPECT_FALSE(Feed("{    ", limits).alive);
  EXPECT_FALSE(Feed("{\"a\":1}    ", limits).alive);  // not forever after the end either
  EXPECT_FALSE(Feed("    {", limits).alive);
  // Whitespace inside strings is text, not a run.
  EXPECT_TRUE(Feed("{\"a\":\"          \"}", limits).complete);
}

// A small vocabulary of multi-byte tokens, as a BPE vocabulary has.
class JsonConstraintTest : public ::testing::Test {
 protected:
  static constexpr int32_t kEos = 0;
  JsonConstraintTest() {
    auto t = std::make_shared<TokenByteTable>();
    *t = {"",    "{", "}",  "\"", "a", ":", " ",    "1",    "{\"",  "\":",
          "\"}", "x", "ab", "[",  "]", ",", "true", "\xc3", "\xa9", "<special>"};
    (*t)[19].clear();  // a special token: no bytes
    table = t;
  }
  std::vector<int32_t> Allowed(const JsonConstraint& c) const {
    std::vector<int32_t> out;
    for (int32_t t = 0; t < static_cast<int32_t>(table->size()); ++t) {
      if (c.Allowed(t)) out.push_back(t);
    }
    return out;
  }
  std::shared_ptr<const TokenByteTable> table;
};

TEST_F(JsonConstraintTest, MaskFollowsTheAutomaton) {
  JsonConstraint c(table, {kEos});
  // At the start: '{', '{"' and whitespace.
  EXPECT_EQ(Allowed(c), (std::vector<int32_t>{1, 6, 8}));
  std::vector<float> logits(table->size(), 1.0f);
  c.Mask(logits);
  for (int32_t t = 0; t < static_cast<int32_t>(logits.size()); ++t) {
    EXPECT_EQ(std::isinf(logits[t]), !c.Allowed(t)) << t;
  }
  for (int32_t t : {8, 4, 9, 7}) {  // {"a":1
    ASSERT_TRUE(c.Allowed(t)) << t;
    c.Accept(t);
  }
  EXPECT_FALSE(c.Allowed(kEos));  // not complete yet
  EXPECT_TRUE(c.Allowed(2));      // }
  EXPECT_TRUE(c.Allowed(15));     // ,
  EXPECT_TRUE(c.Allowed(7));      // more digits
  EXPECT_FALSE(c.Allowed(11));    // x
  EXPECT_FALSE(c.Allowed(19));    // special tokens never
  c.Accept(2);
  EXPECT_TRUE(c.automaton().complete());
  // Complete: only the end token and whitespace.
  EXPECT_EQ(Allowed(c), (std::vector<int32_t>{kEos, 6}));
}

TEST_F(JsonConstraintTest, PartialUtf8TokensInsideStrings) {
  JsonConstraint c(table, {kEos});
  for (int32_t t : {8, 4, 9, 3}) c.Accept(t);  // {"a":"
  EXPECT_TRUE(c.Allowed(17));                  // a UTF-8 lead byte
  EXPECT_FALSE(c.Allowed(18));                 // a lone continuation byte
  c.Accept(17);
  EXPECT_EQ(Allowed(c), (std::vector<int32_t>{18}));  // only its continuation
  c.Accept(18);
  EXPECT_TRUE(c.Allowed(10));  // "}
  c.Accept(10);
  EXPECT_TRUE(c.automaton().complete());
}

TEST_F(JsonConstraintTest, NothingLeftKeepsTheEndTokens) {
  // A vocabulary that cannot close what it opened: the mask lets the sequence end rather than
  // leave nothing to sample.
  auto t = std::make_shared<TokenByteTable>(TokenByteTable{"", "{", "x"});
  JsonConstraint c(t, {0});
  c.Accept(1);
  std::vector<float> logits(3, 1.0f);
  c.Mask(logits);
  EXPECT_FALSE(std::isinf(logits[0]));
  EXPECT_TRUE(std::isinf(logits[1]) && std::isinf(logits[2]));
}

}  // namespace
}  // namespace expertmesh
