// Variant choice and launch shapes of the CUDA backend (core/kernels/plan/kernel_plan.h) and the
// FP8 -> FP16 widening used by the sm_86 GEMM path (core/kernels/cuda/fp8_f16.h): host code, run
// everywhere.
#include "core/kernels/plan/kernel_plan.h"

#include <cmath>
#include <string>
#include <utility>

#include "core/kernels/cuda/fp8_f16.h"
#include "core/numerics/numerics.h"
#include "gtest/gtest.h"

namespace expertmesh {
namespace {

DeviceArch Arch(int major, int minor, int64_t smem = 99 * 1024) {
  DeviceArch a;
  a.major = major;
  a.minor = minor;
  a.max_smem_per_block = smem;
  return a;
}

TEST(KernelPlanTest, MmaPathPerComputeCapability) {
  EXPECT_EQ(*SelectMmaPath(Arch(8, 6)), MmaPath::kF16FromFp8);  // RTX 3090
  EXPECT_EQ(*SelectMmaPath(Arch(8, 7)), MmaPath::kF16FromFp8);  // Orin (sm_86 SASS)
  EXPECT_EQ(*SelectMmaPath(Arch(8, 9)), MmaPath::kFp8E4M3);     // RTX 4090
  EXPECT_EQ(*SelectMmaPath(Arch(9, 0)), MmaPath::kFp8E4M3);     // H100 / H200
  EXPECT_EQ(*SelectMmaPath(Arch(12, 0)), MmaPath::kFp8E4M3);    // RTX 5090
  for (auto [major, minor] : {std::pair{7, 5}, {8, 0}, {10, 0}, {11, 0}}) {
    absl::StatusOr<MmaPath> path = SelectMmaPath(Arch(major, minor));
    ASSERT_FALSE(path.ok()) << major << "." << minor;
    EXPECT_EQ(path.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_NE(path.status().message().find(std::to_string(major) + "." + std::to_string(minor)),
              std::string::npos);
  }
}

TEST(KernelPlanTest, DecodeAndPrefillTiles) {
  absl::StatusOr<GroupedGemmPlan> decode = PlanGroupedGemm(Arch(9, 0, 227 * 1024), 3);
  ASSERT_TRUE(decode.ok());
  EXPECT_EQ(decode->block_m, 16);
  EXPECT_EQ(decode->name(), "fp8_e4m3/m16");
  EXPECT_EQ(decode->smem_bytes, 2 * (16 + 256) * 144);
  absl::StatusOr<GroupedGemmPlan> edge = PlanGroupedGemm(Arch(8, 6), 16);
  ASSERT_TRUE(edge.ok());
  EXPECT_EQ(edge->block_m, 16);
  EXPECT_EQ(edge->path, MmaPath::kF16FromFp8);
  absl::StatusOr<GroupedGemmPlan> prefill = PlanGroupedGemm(Arch(8, 9), 17);
  ASSERT_TRUE(prefill.ok());
  EXPECT_EQ(prefill->block_m, 64);
  EXPECT_EQ(prefill->smem_bytes, 2 * (64 + 256) * 144);  // 92160: fits the 99 KB of sm_86/89/120
  EXPECT_LE(prefill->smem_bytes, 99 * 1024);
}

TEST(KernelPlanTest, RefusesWhatDoesNotFit) {
  absl::StatusOr<GroupedGemmPlan> plan = PlanGroupedGemm(Arch(8, 9, 48 * 1024), 100);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(PlanGroupedGemm(Arch(8, 0), 1).ok());
  EXPECT_FALSE(PlanGroupedGemm(Arch(9, 0), -1).ok());
}

// Static shared memory counts against the same opt-in limit as the dynamic bytes.
TEST(KernelPlanTest, StaticSharedMemoryCountsAgainstTheLimit) {
  const int64_t dynamic = GroupedGemmSmemBytes(64);  // 92160
  DeviceArch arch = Arch(8, 9, dynamic + 2304);
  arch.static_smem.grouped_gemm_m64 = 2304;  // s_arow[64] + s_amax[8][64]
  absl::StatusOr<GroupedGemmPlan> fits = PlanGroupedGemm(arch, 64);
  ASSERT_TRUE(fits.ok()) << fits.status();
  EXPECT_EQ(fits->smem_bytes, dynamic);
  EXPECT_EQ(fits->static_smem_bytes, 2304);
  EXPECT_EQ(fits->total_smem_bytes(), dynamic + 2304);
  EXPECT_EQ(GroupedGemmTotalSmemBytes(arch, 64), dynamic + 2304);
  arch.static_smem.grouped_gemm_m64 = 2305;  // one byte over: only the static part differs
  absl::StatusOr<GroupedGemmPlan> over = PlanGroupedGemm(arch, 64);
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(over.status().message().find("2305 (static)"), std::string::npos) << over.status();
  // The decode tile has its own static bytes.
  arch.static_smem.grouped_gemm_m16 = 576;
  absl::StatusOr<GroupedGemmPlan> decode = PlanGroupedGemm(arch, 3);
  ASSERT_TRUE(decode.ok());
  EXPECT_EQ(decode->static_smem_bytes, 576);

  // MLA decode, DeepSeek-V3 shapes: 16 heads x 32 tokens need 75776 dynamic bytes; with 192
  // static bytes (s_m, s_l, s_alpha of 16 heads) a limit one byte short of the sum takes the
  // 16-token chunk instead.
  const int64_t mla_dynamic = 16 * 576 * 4 + 32 * 576 * 2 + 16 * 32 * 4;
  DeviceArch mla = Arch(9, 0, mla_dynamic + 192);
  mla.static_smem.mla_decode = 192;
  absl::StatusOr<MlaDecodePlan> exact = PlanMlaDecode(mla, 128, 512, 64);
  ASSERT_TRUE(exact.ok());
  EXPECT_EQ(exact->tokens_per_chunk, 32);
  EXPECT_EQ(exact->total_smem_bytes(), mla_dynamic + 192);
  mla.max_smem_per_block = mla_dynamic + 191;
  absl::StatusOr<MlaDecodePlan> smaller = PlanMlaDecode(mla, 128, 512, 64);
  ASSERT_TRUE(smaller.ok());
  EXPECT_EQ(smaller->heads_per_cta, 16);
  EXPECT_EQ(smaller->tokens_per_chunk, 16);
  EXPECT_LE(smaller->total_smem_bytes(), mla.max_smem_per_block);
  mla.static_smem.mla_decode = 0;  // without static bytes the 32-token chunk would be chosen
  EXPECT_EQ(PlanMlaDecode(mla, 128, 512, 64)->tokens_per_chunk, 32);
  mla.static_smem.mla_decode = mla.max_smem_per_block;  // nothing left for dynamic bytes
  EXPECT_EQ(PlanMlaDecode(mla, 128, 512, 64).status().code(), absl::StatusCode::kResourceExhausted);
}

// cudaGetDeviceCount's answer -> device count or error (DeviceCount in dispatch.cc).
DeviceCountQuery Query(int error, std::string_view name, int count, int driver, int runtime) {
  DeviceCountQuery q;
  q.error = error;
  q.error_name = name;
  q.count = count;
  q.driver_version = driver;
  q.runtime_version = runtime;
  return q;
}

TEST(DeviceCountTest, ZeroOnlyWhenNoDeviceOrNoDriver) {
  EXPECT_EQ(*DeviceCountFromQuery(Query(kCudaSuccess, "", 2, 0, 0)), 2);
  EXPECT_EQ(*DeviceCountFromQuery(Query(kCudaErrorNoDevice, "cudaErrorNoDevice", 0, 13000, 13000)),
            0);
  // No NVIDIA driver installed at all (cudaDriverGetVersion reports 0): no GPU stack.
  EXPECT_EQ(*DeviceCountFromQuery(
                Query(kCudaErrorInsufficientDriver, "cudaErrorInsufficientDriver", 0, 0, 13000)),
            0);
}

TEST(DeviceCountTest, DriverOlderThanRuntimeIsAnError) {
  absl::StatusOr<int> old = DeviceCountFromQuery(
      Query(kCudaErrorInsufficientDriver, "cudaErrorInsufficientDriver", 0, 12080, 13000));
  ASSERT_FALSE(old.ok());
  EXPECT_EQ(old.status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string msg(old.status().message());
  EXPECT_NE(msg.find("cudaErrorInsufficientDriver"), std::string::npos) << msg;
  EXPECT_NE(msg.find("CUDA 12.8"), std::string::npos) << msg;
  EXPECT_NE(msg.find("CUDA 13.0"), std::string::npos) << msg;
  EXPECT_NE(msg.find("r580"), std::string::npos) << msg;
}

TEST(DeviceCountTest, OtherErrorsAreReportedByName) {
  // cudaErrorInitializationError (3), cudaErrorSystemDriverMismatch (803), cudaErrorUnknown
  // (999): a driver is there but the devices cannot be used.
  for (auto [code, name] : {std::pair<int, std::string>{3, "cudaErrorInitializationError"},
                            {803, "cudaErrorSystemDriverMismatch"},
                            {999, "cudaErrorUnknown"}}) {
    absl::StatusOr<int> n = DeviceCountFromQuery(Query(code, name, 0, 13000, 13000));
    ASSERT_FALSE(n.ok()) << name;
    EXPECT_EQ(n.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(std::string(n.status().message()).find(name), std::string::npos) << n.status();
  }
}

TEST(KernelPlanTest, GemmShapes) {
  EXPECT_TRUE(ValidateGroupedGemmShape(7168, 2048).ok());  // DeepSeek-V3
  EXPECT_TRUE(ValidateGroupedGemmShape(256, 144).ok());    // ragged last 128-block
  EXPECT_FALSE(ValidateGroupedGemmShape(7168, 2040).ok());
  EXPECT_FALSE(ValidateGroupedGemmShape(0, 128).ok());
  EXPECT_FALSE(ValidateGroupedGemmShape(100, 128).ok());
}

TEST(KernelPlanTest, MlaDecodeHeadsPerCta) {
  // DeepSeek-V3: 128 heads, kv_lora_rank 512, rope 64; 16 heads fit the 227 KB of an H200.
  absl::StatusOr<MlaDecodePlan> h200 = PlanMlaDecode(Arch(9, 0, 227 * 1024), 128, 512, 64);
  ASSERT_TRUE(h200.ok());
  EXPECT_EQ(h200->heads_per_cta, 16);
  EXPECT_EQ(h200->tokens_per_chunk, 32);
  EXPECT_EQ(h200->smem_bytes, 16 * 576 * 4 + 32 * 576 * 2 + 16 * 32 * 4);
  // 48 KB and 12 heads: 8 does not divide 12, 4 heads x 32 tokens fit.
  absl::StatusOr<MlaDecodePlan> small = PlanMlaDecode(Arch(8, 6, 48 * 1024), 12, 512, 64);
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(12 % small->heads_per_cta, 0);
  EXPECT_LE(small->smem_bytes, 48 * 1024);
  EXPECT_EQ(small->heads_per_cta, 4);
  EXPECT_FALSE(PlanMlaDecode(Arch(8, 6, 1024), 16, 512, 64).ok());
  EXPECT_FALSE(PlanMlaDecode(Arch(8, 6), 0, 512, 64).ok());
}

// Every e4m3 code widened by bit moves is the FP16 of value * 2^-8 (NaN codes excepted).
TEST(Fp8ToF16Test, AllCodesExact) {
  for (uint32_t code = 0; code < 256; ++code) {
    if ((code & 0x7F) == 0x7F) continue;  // NaN
    for (int pos = 0; pos < 4; ++pos) {
      const uint32_t v = code << (8 * pos) | (0x38u << (8 * ((pos + 1) % 4)));  // neighbour 1.0
      uint32_t lo = 0, hi = 0;
      cuda::Fp8x4ToF16x4Scaled(v, &lo, &hi);
      const uint32_t word = pos < 2 ? lo : hi;
      const uint16_t half = static_cast<uint16_t>(word >> (16 * (pos % 2)));
      const float widened = Fp16ToFloat(half) * std::sqrt(cuda::kF16FromFp8Unscale);
      const float expected = Fp8E4M3ToFloat(static_cast<uint8_t>(code));
      EXPECT_EQ(widened, expected) << "code " << code << " at byte " << pos;
      EXPECT_EQ(std::signbit(widened), std::signbit(expected)) << "code " << code;
    }
  }
}

}  // namespace
}  // namespace expertmesh
