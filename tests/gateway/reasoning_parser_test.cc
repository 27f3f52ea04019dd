// DeepSeek-R1's reasoning split (gateway/reasoning_parser.h): with and without the opening tag,
// never closed, and every way of cutting the text into deltas gives the whole text's split.
#include "gateway/reasoning_parser.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace expertmesh::gateway {
namespace {

ReasoningParser::Split Whole(std::string_view text) {
  ReasoningParser p;
  ReasoningParser::Split s = p.Feed(text);
  ReasoningParser::Split rest = p.Finish();
  s.reasoning += rest.reasoning;
  s.content += rest.content;
  return s;
}

// Feeds `text` cut at the given byte offsets; checks nothing is lost or reordered.
ReasoningParser::Split Pieces(std::string_view text, const std::vector<size_t>& cuts) {
  ReasoningParser p;
  ReasoningParser::Split all;
  size_t at = 0;
  for (size_t cut : cuts) {
    ReasoningParser::Split s = p.Feed(text.substr(at, cut - at));
    // Nothing goes to the content before the reasoning is over.
    if (!s.content.empty()) EXPECT_FALSE(p.in_reasoning());
    all.reasoning += s.reasoning;
    all.content += s.content;
    at = cut;
  }
  ReasoningParser::Split s = p.Feed(text.substr(at));
  ReasoningParser::Split rest = p.Finish();
  all.reasoning += s.reasoning + rest.reasoning;
  all.content += s.content + rest.content;
  return all;
}

TEST(ReasoningParser, SplitsThinkFromTheAnswer) {
  auto s = Whole("<think>\nLet me add.\n</think>\n\nThe answer is 4.");
  EXPECT_EQ(s.reasoning, "\nLet me add.\n");
  EXPECT_EQ(s.content, "\n\nThe answer is 4.");
}

TEST(ReasoningParser, NoOpeningTagStartsInsideTheReasoning) {
  // The later R1 template ends the generation prompt with "<think>\n".
  auto s = Whole("Let me add.\n</think>The answer is 4.");
  EXPECT_EQ(s.reasoning, "Let me add.\n");
  EXPECT_EQ(s.content, "The answer is 4.");
}

TEST(ReasoningParser, NeverClosedIsAllReasoning) {
  auto s = Whole("<think>still thinking when max_tokens came");
  EXPECT_EQ(s.reasoning, "still thinking when max_tokens came");
  EXPECT_EQ(s.content, "");
  auto bare = Whole("a partial marker at the end </thi");
  EXPECT_EQ(bare.reasoning, "a partial marker at the end </thi");
  EXPECT_EQ(Whole("").reasoning, "");
  EXPECT_EQ(Whole("<thi").reasoning, "<thi");  // a prefix of <think> that ended there
}

TEST(ReasoningParser, OnlyTheFirstCloseCounts) {
  auto s = Whole("<think>a</think>b</think>c<think>d");
  EXPECT_EQ(s.reasoning, "a");
  EXPECT_EQ(s.content, "b</think>c<think>d");
  auto empty = Whole("<think></think>answer");
  EXPECT_EQ(empty.reasoning, "");
  EXPECT_EQ(empty.content, "answer");
}

TEST(ReasoningParser, EveryCutGivesTheWholeSplit) {
  for (std::string_view text :
       {std::string_view("<think>\nLet me add: 2 + 2 < 5.\n</think>\n\nThe answer is 4."),
        std::string_view("Ünïcödé 思考 </thin </think> 答え <think> x"),
        std::string_view("<think></think>"), std::string_view("<<think>></think></think>")}) {
    const ReasoningParser::Split whole = Whole(text);
    for (size_t i = 0; i <= text.size(); ++i) {
      auto one = Pieces(text, {i});
      EXPECT_EQ(one.reasoning, whole.reasoning) << text << " cut at " << i;
      EXPECT_EQ(one.content, whole.content) << text << " cut at " << i;
      for (size_t j = i; j <= text.size(); ++j) {
        auto two = Pieces(text, {i, j});
        ASSERT_EQ(two.reasoning, whole.reasoning) << text << " cut at " << i << "," << j;
        ASSERT_EQ(two.content, whole.content) << text << " cut at " << i << "," << j;
      }
    }
    // Byte by byte.
    std::vector<size_t> every;
    for (size_t i = 1; i < text.size(); ++i) every.push_back(i);
    auto bytes = Pieces(text, every);
    EXPECT_EQ(bytes.reasoning, whole.reasoning);
    EXPECT_EQ(bytes.content, whole.content);
  }
}

TEST(ReasoningParser, HoldsBackOnlyWhatMayBeAMarker) {
  ReasoningParser p;
  EXPECT_EQ(p.Feed("<th").reasoning, "");  // may be <think>
  EXPECT_EQ(p.Feed("ink>Hmm </").reasoning, "Hmm ");
  EXPECT_EQ(p.Feed("b>").reasoning, "</b>");
  EXPECT_EQ(p.Feed("</think").reasoning, "");
  auto s = p.Feed(">Yes");
  EXPECT_EQ(s.reasoning, "");
  EXPECT_EQ(s.content, "Yes");
  EXPECT_FALSE(p.in_reasoning());
  EXPECT_EQ(p.Feed("</think>").content, "</think>");  // the content is not held back
}

TEST(ReasoningParser, PartialMarkerSuffix) {
  EXPECT_EQ(PartialMarkerSuffix("abc</th", "</think>"), 4u);
  EXPECT_EQ(PartialMarkerSuffix("abc<", "</think>"), 1u);
  EXPECT_EQ(PartialMarkerSuffix("abc", "</think>"), 0u);
  EXPECT_EQ(PartialMarkerSuffix("</think>", "</think>"), 0u);  // whole: not a partial
  EXPECT_EQ(PartialMarkerSuffix("", "</think>"), 0u);
}

}  // namespace
}  // namespace expertmesh::gateway
