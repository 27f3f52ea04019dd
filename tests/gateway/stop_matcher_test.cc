// Stop strings across token boundaries: for random texts cut into random deltas, the emitted
// text equals the whole text cut before the first stop string, whatever the cuts.
#include "gateway/stop_matcher.h"

#include <random>

#include "gtest/gtest.h"

namespace expertmesh::gateway {
namespace {

std::string RunChunks(StopMatcher& m, const std::vector<std::string>& chunks) {
  std::string out;
  for (const std::string& c : chunks) {
    out += m.Push(c);
    if (m.stopped()) break;
  }
  out += m.Finish();
  return out;
}

TEST(StopMatcher, NoStopsPassesEverythingThrough) {
  StopMatcher m({});
  EXPECT_EQ(m.Push("abc"), "abc");
  EXPECT_EQ(m.Push("def"), "def");
  EXPECT_EQ(m.Finish(), "");
  EXPECT_FALSE(m.stopped());
}

TEST(StopMatcher, StopSplitAcrossDeltasIsHeldBackAndNotEmitted) {
  StopMatcher m({"END"});
  EXPECT_EQ(m.Push("Hello E"), "Hello ");  // "E" could start "END"
  EXPECT_EQ(m.Push("N"), "");
  EXPECT_EQ(m.Push("D and more"), "");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(*m.matched(), "END");
  EXPECT_EQ(m.Push("ignored"), "");
  EXPECT_EQ(m.Finish(), "");
}

TEST(StopMatcher, FalseStartIsReleased) {
  StopMatcher m({"END"});
  EXPECT_EQ(m.Push("EN"), "");
  EXPECT_EQ(m.Push("x"), "ENx");
  EXPECT_EQ(m.Push("EN"), "");
  EXPECT_EQ(m.Finish(), "EN");  // generation ended: held text is real text
  EXPECT_FALSE(m.stopped());
}

TEST(StopMatcher, EarliestStopWinsAndMultibyteStops) {
  StopMatcher m({"bb", "ab", "\xc3\xa9t\xc3\xa9"});
  EXPECT_EQ(m.Push("x\xc3\xa9"), "x");
  EXPECT_EQ(m.Push("t\xc3\xa9 ab"), "");
  EXPECT_EQ(*m.matched(), "\xc3\xa9t\xc3\xa9");
  StopMatcher n({"bb", "ab"});
  EXPECT_EQ(n.Push("cabb"), "c");
  EXPECT_EQ(*n.matched(), "ab");
  // A short stop completed inside a longer one's partial match ends the text first.
  StopMatcher o({"abcd", "bc"});
  EXPECT_EQ(o.Push("xabcd"), "xa");
  EXPECT_EQ(*o.matched(), "bc");
}

// Reference: read the text byte by byte; at the first end offset where a stop string is
// complete, cut before it (on a tie, before the one starting earlier).
std::string Reference(const std::string& text, const std::vector<std::string>& stops) {
  for (size_t end = 1; end <= text.size(); ++end) {
    size_t cut = std::string::npos;
    for (const std::string& s : stops) {
      if (s.size() <= end && text.compare(end - s.size(), s.size(), s) == 0) {
        cut = std::min(cut, end - s.size());
      }
    }
    if (cut != std::string::npos) return text.substr(0, cut);
  }
  return text;
}

TEST(StopMatcher, RandomTextsAndCutsMatchTheReference) {
  std::mt19937 rng(1234);
  const std::vector<std::string> alphabet = {"a", "b", "\n", " ", "\xc3\xa9", "\xe2\x82\xac"};
  auto random_string = [&](int min_chars, int max_chars) {
    std::string s;
    int n = std::uniform_int_distribution<int>(min_chars, max_chars)(rng);
    for (int i = 0; i < n; ++i) s += alphabet[rng() % alphabet.size()];
    return s;
  };
  int stopped = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<std::string> stops;
    int n_stops = 1 + rng() % 3;
    for (int i = 0; i < n_stops; ++i) stops.push_back(random_string(1, 4));
    // Text built from whole characters, cut into deltas of 1..4 characters.
    std::vector<std::string> chunks;
    std::string text;
    int n_chunks = 1 + rng() % 12;
    for (int i = 0; i < n_chunks; ++i) {
      chunks.push_back(random_string(0, 4));
      text += chunks.back();
    }
    StopMatcher m(stops);
    std::string got = RunChunks(m, chunks);
    std::string want = Reference(text, stops);
    std::string detail;
    for (const std::string& s : stops) detail += "stop[" + s + "] ";
    for (const std::string& c : chunks) detail += "chunk[" + c + "] ";
    ASSERT_EQ(got, want) << "trial " << trial << " " << detail;
    EXPECT_EQ(m.stopped(), want.size() != text.size()) << "trial " << trial;
    stopped += m.stopped();
  }
  EXPECT_GT(stopped, 500);  // the generator does exercise matches
}

}  // namespace
}  // namespace expertmesh::gateway
