// A scalar twin of the grouped GEMM's numerics on the CPU: per 128-deep K block an FP32 partial
// sum, promoted into the FP32 accumulator with activation scale x weight scale; SwiGLU; 1 x 128
// requantization; the same for down; weight; ascending-order combine. Compared with the plain
// reference (expert_reference.h), it measures the error that the order of summation alone
// causes, which is what the GPU tests' tolerances (grouped_gemm_gpu_test.cc) are sized from:
// they must hold here with a wide margin.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include "core/numerics/numerics.h"
#include "gtest/gtest.h"
#include "tests/cuda/expert_reference.h"

namespace expertmesh::cuda::testing {
namespace {

// out: [R, H], as the kernels compute it (FP32 MMA partials in k order).
std::vector<float> PromotedExperts(std::span<const HostExpert> experts, int64_t H, int64_t I,
                                   const QuantizedActivations& x, const ExpertRoutes& routes) {
  const float* fp8 = Fp8E4M3Table();
  const int64_t nb_h = NumBlocks(H, 128), nb_i = NumBlocks(I, 128);
  std::vector<float> out(x.n_rows * H, 0.0f), h(I);
  for (int64_t r = 0; r < routes.n_rows(); ++r) {
    for (int32_t p = routes.offsets[r]; p < routes.offsets[r + 1]; ++p) {
      const HostExpert& e = experts[routes.experts[p]];
      for (int64_t i = 0; i < I; ++i) {
        float g = 0.0f, u = 0.0f;
        for (int64_t kb = 0; kb < nb_h; ++kb) {
          float pg = 0.0f, pu = 0.0f;
          for (int64_t k = kb * 128; k < std::min(H, kb * 128 + 128); ++k) {
            const float a = fp8[x.fp8[r * H + k]];
            pg += a * fp8[e.gate[i * H + k]];
            pu += a * fp8[e.up[i * H + k]];
          }
          const float sa = x.scales[r * nb_h + kb];
          g += pg * (sa * e.gate_scale[(i / 128) * nb_h + kb]);
          u += pu * (sa * e.up_scale[(i / 128) * nb_h + kb]);
        }
        h[i] = g / (1.0f + std::exp(-g)) * u;
      }
      const QuantizedActivations hq = QuantizeActivations(h, 1, I);
      for (int64_t c = 0; c < H; ++c) {
        float acc = 0.0f;
        for (int64_t kb = 0; kb < nb_i; ++kb) {
          float part = 0.0f;
          for (int64_t k = kb * 128; k < std::min(I, kb * 128 + 128); ++k) {
            part += fp8[hq.fp8[k]] * fp8[e.down[c * I + k]];
          }
          acc += part * (hq.scales[kb] * e.down_scale[(c / 128) * nb_i + kb]);
        }
        out[r * H + c] += acc * routes.weights[p];
      }
    }
  }
  return out;
}

struct Case {
  const char* name;
  int64_t H, I;
  int32_t n_experts;
  int64_t rows;
  int k;
  WeightKind weights;
  bool saturate_x;
  double max_cosine_diff, max_rel_to_peak;  // the GPU test's bounds for this case
};

TEST(PromotionEmulationTest, SummationOrderErrorIsWellInsideGpuTolerances) {
  for (const Case& c :
       {Case{"bundled", 256, 128, 16, 40, 4, WeightKind::kRandom, false, 1e-5, 0.02},
        Case{"ragged", 272, 144, 4, 150, 2, WeightKind::kRandom, false, 1e-5, 0.02},
        Case{"saturated", 256, 256, 4, 20, 2, WeightKind::kMaxMagnitude, true, 1e-3, 0.05}}) {
    std::mt19937 rng(1234);
    std::vector<HostExpert> experts;
    for (int32_t e = 0; e < c.n_experts; ++e) {
      experts.push_back(RandomExpert(c.H, c.I, c.weights, rng));
    }
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> xf(c.rows * c.H);
    for (int64_t i = 0; i < c.rows * c.H; ++i) {
      xf[i] = c.saturate_x ? (rng() % 2 ? 1.0f : -1.0f) : normal(rng) * (1.0f + (i / 128) % 5);
    }
    const QuantizedActivations x = QuantizeActivations(xf, c.rows, c.H);
    ExpertRoutes routes;
    std::vector<int32_t> pool;
    for (int32_t e = 0; e < c.n_experts; ++e) pool.push_back(e);
    for (int64_t r = 0; r < c.rows; ++r) {
      std::shuffle(pool.begin(), pool.end(), rng);
      std::vector<int32_t> chosen(pool.begin(), pool.begin() + c.k);
      std::sort(chosen.begin(), chosen.end());
      routes.AddRow(chosen, std::vector<float>(c.k, 0.7f));
    }
    const std::vector<float> ref = ReferenceExperts(experts, c.H, c.I, x, routes);
    const std::vector<float> promoted = PromotedExperts(experts, c.H, c.I, x, routes);
    const double cos_diff = CosineDiff(promoted, ref), rel = MaxRelToPeak(promoted, ref);
    std::printf(
        "[measured] %s: promotion order vs reference: cosine diff %.3g, max err / peak "
        "%.3g\n",
        c.name, cos_diff, rel);
    // A margin of 5x at least: the tensor cores' own order must fit in the rest.
    EXPECT_LE(cos_diff * 5, c.max_cosine_diff) << c.name;
    EXPECT_LE(rel * 5, c.max_rel_to_peak) << c.name;
  }
}

}  // namespace
}  // namespace expertmesh::cuda::testing
