// NcclGroup over every visible GPU (one GPU is a group of one): all-reduce and all-gather of
// small integers, which are exact in float, so results compare exactly.
#include "core/kernels/cuda/nccl_group.h"

#include "core/kernels/cuda/device_buffer.h"
#include "tests/cuda/gpu_test_util.h"

namespace expertmesh::cuda::testing {
namespace {

TEST(NcclGroupTest, AllReduceAndAllGatherOverVisibleGpus) {
  EM_REQUIRE_GPU();
  const int n = VisibleDevices();
  std::vector<int> devices(n);
  for (int d = 0; d < n; ++d) devices[d] = d;
  auto group = NcclGroup::Create(devices);
  ASSERT_TRUE(group.ok()) << group.status();
  const size_t count = 1000;
  std::vector<DeviceBuffer<float>> sums, gathered;
  std::vector<float*> sum_ptrs, gather_ptrs;
  std::vector<const float*> send_ptrs;
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(SetDevice(devices[r]).ok());
    std::vector<float> v(count);
    for (size_t i = 0; i < count; ++i) v[i] = static_cast<float>((r + 1) * static_cast<int>(i));
    sums.push_back(*DeviceBuffer<float>::FromHost(v));
    gathered.push_back(*DeviceBuffer<float>::Create(n * count));
    sum_ptrs.push_back(sums.back().get());
    gather_ptrs.push_back(gathered.back().get());
  }
  for (int r = 0; r < n; ++r) send_ptrs.push_back(sums[r].get());
  // The uploads are asynchronous (legacy default stream of each device, pageable source):
  // every device must finish its own before NCCL reads the buffers on its streams.
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(SetDevice(devices[r]).ok());
    ASSERT_TRUE(CudaStatus(cudaDeviceSynchronize(), "upload").ok()) << "device " << devices[r];
  }
  // Gather first (the inputs), then reduce in place.
  ASSERT_TRUE((*group)->AllGather(send_ptrs, gather_ptrs, count).ok());
  ASSERT_TRUE((*group)->Synchronize().ok());
  ASSERT_TRUE((*group)->AllReduceSum(sum_ptrs, count).ok());
  ASSERT_TRUE((*group)->Synchronize().ok());
  const int rank_sum = n * (n + 1) / 2;
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(SetDevice(devices[r]).ok());
    std::vector<float> s(count), g(n * count);
    ASSERT_TRUE(sums[r].CopyToHost(s).ok());
    ASSERT_TRUE(gathered[r].CopyToHost(g).ok());
    for (size_t i = 0; i < count; ++i) {
      ASSERT_EQ(s[i], static_cast<float>(rank_sum * static_cast<int>(i))) << "rank " << r;
      for (int q = 0; q < n; ++q) {
        ASSERT_EQ(g[q * count + i], static_cast<float>((q + 1) * static_cast<int>(i)));
      }
    }
  }
}

TEST(NcclGroupTest, RejectsDuplicateAndMissingDevices) {
  EM_REQUIRE_GPU();
  EXPECT_EQ(NcclGroup::Create({0, 0}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(NcclGroup::Create({VisibleDevices()}).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(NcclGroup::Create({}).ok());
}

}  // namespace
}  // namespace expertmesh::cuda::testing
