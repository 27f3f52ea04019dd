// The FP8 linear layer (grouped GEMM down kernel in dense mode) against plain CPU loops over
// the dequantized activations and weights, on both MMA paths and both tile heights. No
// requantization inside, so only the summation order differs (~1e-7 relative, as measured for
// the expert GEMM by promotion_emulation_test.cc): bounds 1e-5 cosine difference and 1e-3 of
// the peak leave room for the tensor cores' accumulation.
#include <random>

#include "core/kernels/cuda/device_buffer.h"
#include "core/kernels/cuda/dispatch.h"
#include "tests/cuda/gpu_test_util.h"

namespace expertmesh::cuda::testing {
namespace {

struct Shape {
  const char* name;
  int64_t rows, K, N;
};

TEST(Fp8LinearGpuTest, MatchesCpuOnModelShapes) {
  EM_REQUIRE_GPU();
  absl::StatusOr<DeviceArch> arch = QueryDeviceArch(0);
  ASSERT_TRUE(arch.ok());
  for (const Shape& sh :
       {Shape{"bundled kv_a_proj_with_mqa", 5, 256, 144}, Shape{"bundled o_proj", 33, 128, 256},
        Shape{"deepseek-v3 q_a_proj", 70, 7168, 1536}}) {
    std::mt19937 rng(static_cast<uint32_t>(sh.K + sh.N));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> xf(sh.rows * sh.K), wf(sh.N * sh.K);
    for (float& v : xf) v = normal(rng);
    for (float& v : wf) v = normal(rng) / 30.0f;
    const QuantizedActivations x = QuantizeActivations(xf, sh.rows, sh.K);
    std::vector<uint8_t> w(sh.N * sh.K);
    std::vector<float> ws(NumBlocks(sh.N, 128) * NumBlocks(sh.K, 128));
    QuantizeWeightBlocks(wf, sh.N, sh.K, {128, 128}, w, ws);
    // Reference: dequantized values, float sums in k order.
    std::vector<float> xd(sh.rows * sh.K), row(sh.K), ref(sh.rows * sh.N);
    DequantizeActivations(x, xd);
    for (int64_t n = 0; n < sh.N; ++n) {
      DequantizeWeightRow(w.data(), ws.data(), sh.N, sh.K, {128, 128}, n, row.data());
      for (int64_t r = 0; r < sh.rows; ++r) {
        float acc = 0.0f;
        for (int64_t k = 0; k < sh.K; ++k) acc += xd[r * sh.K + k] * row[k];
        ref[r * sh.N + n] = acc;
      }
    }
    auto x_d = *DeviceBuffer<uint8_t>::FromHost(x.fp8);
    auto xs_d = *DeviceBuffer<float>::FromHost(x.scales);
    auto w_d = *DeviceBuffer<uint8_t>::FromHost(w);
    auto ws_d = *DeviceBuffer<float>::FromHost(ws);
    auto y_d = *DeviceBuffer<float>::Create(sh.rows * sh.N);
    Fp8LinearParams p;
    p.n_rows = static_cast<int32_t>(sh.rows);
    p.in_features = static_cast<int32_t>(sh.K);
    p.out_features = static_cast<int32_t>(sh.N);
    p.x = x_d.get();
    p.x_scales = xs_d.get();
    p.weight = w_d.get();
    p.weight_scale_inv = ws_d.get();
    p.y = y_d.get();
    std::vector<MmaPath> paths = {MmaPath::kF16FromFp8};
    if (*SelectMmaPath(*arch) == MmaPath::kFp8E4M3) paths.push_back(MmaPath::kFp8E4M3);
    for (MmaPath path : paths) {
      ASSERT_TRUE(Fp8Linear(*arch, p, nullptr, path).ok());
      std::vector<float> got(sh.rows * sh.N);
      ASSERT_TRUE(y_d.CopyToHost(got).ok());
      const double cos_diff = CosineDiff(got, ref), rel = MaxRelToPeak(got, ref);
      std::printf("[measured] FP8 linear %s %s: cosine diff %.3g, max err / peak %.3g\n", sh.name,
                  MmaPathName(path), cos_diff, rel);
      EXPECT_LE(cos_diff, 1e-5) << sh.name << " " << MmaPathName(path);
      EXPECT_LE(rel, 1e-3) << sh.name << " " << MmaPathName(path);
    }
  }
}

TEST(Fp8LinearGpuTest, RejectsUnalignedShapes) {
  EM_REQUIRE_GPU();
  absl::StatusOr<DeviceArch> arch = QueryDeviceArch(0);
  ASSERT_TRUE(arch.ok());
  Fp8LinearParams p;
  p.n_rows = 1;
  p.in_features = 200;  // not a multiple of 128
  p.out_features = 128;
  EXPECT_EQ(Fp8Linear(*arch, p, nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.in_features = 256;
  p.out_features = 100;  // not a multiple of 16
  EXPECT_EQ(Fp8Linear(*arch, p, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace expertmesh::cuda::testing
