// The --device flag of every service (core/backend/backend.h).
#include "core/backend/backend.h"

#include "gtest/gtest.h"

namespace expertmesh {
namespace {

TEST(DeviceSpecTest, ParsesCpuAndCudaLists) {
  absl::StatusOr<DeviceSpec> cpu = ParseDeviceSpec("cpu");
  ASSERT_TRUE(cpu.ok());
  EXPECT_FALSE(cpu->cuda);
  EXPECT_EQ(cpu->text, "cpu");
  absl::StatusOr<DeviceSpec> one = ParseDeviceSpec("cuda:3");
  ASSERT_TRUE(one.ok());
  EXPECT_TRUE(one->cuda);
  EXPECT_EQ(one->devices, (std::vector<int>{3}));
  EXPECT_EQ(ParseDeviceSpec("cuda:0,1,7")->devices, (std::vector<int>{0, 1, 7}));
  EXPECT_EQ(ParseDeviceSpec("cuda:0,cuda:1")->devices, (std::vector<int>{0, 1}));
  EXPECT_EQ(ParseDeviceSpec("cuda:0,0")->devices, (std::vector<int>{0, 0}));
  for (const char* bad :
       {"", "gpu", "cuda:", "cuda:x", "cuda:1,", "cuda:-1", "cuda:1,,2", "cuda:1 ", "CPU"}) {
    EXPECT_FALSE(ParseDeviceSpec(bad).ok()) << bad;
  }
}

}  // namespace
}  // namespace expertmesh
