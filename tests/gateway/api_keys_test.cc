// The gateway's API-key check (gateway/api_keys.h).
#include "gateway/api_keys.h"

#include "gtest/gtest.h"

namespace expertmesh::gateway {
namespace {

TEST(ApiKeyCheckerTest, AcceptsExactlyTheConfiguredKeys) {
  const ApiKeyChecker keys({"sk-first", "sk-second-key"});
  EXPECT_FALSE(keys.empty());
  EXPECT_TRUE(keys.Accepts("sk-first"));
  EXPECT_TRUE(keys.Accepts("sk-second-key"));
  for (const char* wrong : {"", "sk-firs", "sk-first ", "sk-firsT", "sk-second"}) {
    EXPECT_FALSE(keys.Accepts(wrong)) << wrong;
  }
  EXPECT_FALSE(keys.Accepts(std::string_view("sk-first\0", 9)));
}

TEST(ApiKeyCheckerTest, EmptyListAcceptsNothingAndSaysSo) {
  const ApiKeyChecker none({});
  EXPECT_TRUE(none.empty());
  EXPECT_FALSE(none.Accepts(""));
}

}  // namespace
}  // namespace expertmesh::gateway
