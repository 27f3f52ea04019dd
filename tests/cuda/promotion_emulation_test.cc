// The CPU twin of the grouped GEMM's numerics (expert_reference.h PromotedExperts: per 128-deep
// K block a partial sum promoted into the FP32 accumulator with activation scale x weight scale;
// SwiGLU; 1 x 128 requantization; the same for down; weight; ascending-order combine), run with
// FP32 accumulation and with the tensor cores' truncating accumulation (14 bits kept on the FP8
// path, as DeepSeek-V3 measured on H800; 24 on the F16 path) on the GPU tests' shapes. What it
// measures derives the GPU tests' bounds (fp8_tolerance.h).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include "core/numerics/numerics.h"
#include "gtest/gtest.h"
#include "tests/cuda/expert_reference.h"
#include "tests/cuda/fp8_tolerance.h"

namespace expertmesh::cuda::testing {
namespace {

struct Case {
  const char* name;
  int64_t H, I;
  int32_t n_experts;
  int64_t rows;
  int k;
  WeightKind weights;
  bool saturate_x;
};

struct Inputs {
  std::vector<HostExpert> experts;
  QuantizedActivations x;
  ExpertRoutes routes;
};

Inputs MakeInputs(const Case& c) {
  std::mt19937 rng(1234);
  Inputs in;
  for (int32_t e = 0; e < c.n_experts; ++e) {
    in.experts.push_back(RandomExpert(c.H, c.I, c.weights, rng));
  }
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> xf(c.rows * c.H);
  for (int64_t i = 0; i < c.rows * c.H; ++i) {
    xf[i] = c.saturate_x ? (rng() % 2 ? 1.0f : -1.0f) : normal(rng) * (1.0f + (i / 128) % 5);
  }
  in.x = QuantizeActivations(xf, c.rows, c.H);
  std::vector<int32_t> pool;
  for (int32_t e = 0; e < c.n_experts; ++e) pool.push_back(e);
  for (int64_t r = 0; r < c.rows; ++r) {
    std::shuffle(pool.begin(), pool.end(), rng);
    std::vector<int32_t> chosen(pool.begin(), pool.begin() + c.k);
    std::sort(chosen.begin(), chosen.end());
    in.routes.AddRow(chosen, std::vector<float>(c.k, 0.7f));
  }
  return in;
}

// The GPU tests' shapes (grouped_gemm_gpu_test.cc; "cuda-experts" is cuda_experts_gpu_test.cc's
// 256 x 128 with three experts per row; DeepSeek-V3 with fewer rows: the depth is what counts).
const Case kCases[] = {
    {"bundled", 256, 128, 16, 40, 4, WeightKind::kRandom, false},
    {"ragged", 272, 144, 4, 150, 2, WeightKind::kRandom, false},
    {"cuda-experts", 256, 128, 8, 16, 3, WeightKind::kRandom, false},
    {"deepseek-v3", 7168, 2048, 4, 1, 2, WeightKind::kRandom, false},
    {"saturated", 256, 256, 4, 20, 2, WeightKind::kMaxMagnitude, true},
};

// What the twins measure on one case, computed once for the tests below.
struct Measured {
  const Case* c;
  double full_cos, full_rel;  // FP32-order twin vs reference
  struct Path {
    double cos_ref, rel_ref, cos_full, rel_full;  // truncating twin vs reference / FP32 twin
    int64_t flips, codes;
  } path[2];  // kF16FromFp8, kFp8E4M3
};

MmaAccumulation AccumulationOf(MmaPath path) {
  return path == MmaPath::kFp8E4M3 ? kFp8TensorCoreAccumulation : kF16TensorCoreAccumulation;
}

const std::vector<Measured>& Measurements() {
  static const std::vector<Measured> all = [] {
    std::vector<Measured> out;
    for (const Case& c : kCases) {
      const Inputs in = MakeInputs(c);
      const std::vector<float> ref = ReferenceExperts(in.experts, c.H, c.I, in.x, in.routes);
      const std::vector<float> full = PromotedExperts(in.experts, c.H, c.I, in.x, in.routes);
      Measured m{&c, CosineDiff(full, ref), MaxRelToPeak(full, ref), {}};
      std::printf(
          "[measured] %s: FP32 promotion order vs reference: cosine diff %.3g, max err "
          "/ peak %.3g\n",
          c.name, m.full_cos, m.full_rel);
      for (MmaPath path : {MmaPath::kF16FromFp8, MmaPath::kFp8E4M3}) {
        const MmaAccumulation acc = AccumulationOf(path);
        Measured::Path& p = m.path[static_cast<int>(path)];
        const std::vector<float> trunc =
            PromotedExperts(in.experts, c.H, c.I, in.x, in.routes, acc, &p.flips, &p.codes);
        p.cos_ref = CosineDiff(trunc, ref);
        p.rel_ref = MaxRelToPeak(trunc, ref);
        p.cos_full = CosineDiff(trunc, full);
        p.rel_full = MaxRelToPeak(trunc, full);
        std::printf(
            "[measured] %s %s (%d bits / k%d): truncated vs full FP32: cosine %.3g, "
            "max err / peak %.3g; vs reference: %.3g, %.3g; %lld of %lld codes "
            "flipped\n",
            c.name, MmaPathName(path), acc.kept_bits, acc.k_per_mma, p.cos_full, p.rel_full,
            p.cos_ref, p.rel_ref, static_cast<long long>(p.flips), static_cast<long long>(p.codes));
      }
      out.push_back(m);
    }
    return out;
  }();
  return all;
}

// The FP32-order twin (an idealised MMA) stays far inside every bound: the summation order
// alone is not what the tolerances are for.
TEST(PromotionEmulationTest, SummationOrderErrorIsWellInsideGpuTolerances) {
  for (const Measured& m : Measurements()) {
    for (MmaPath path : {MmaPath::kF16FromFp8, MmaPath::kFp8E4M3}) {
      const GemmBounds b = m.c->saturate_x ? SaturatedBounds(path) : RandomBounds(path);
      EXPECT_LE(m.full_cos * kAccumulationMargin, b.cosine_diff) << m.c->name;
      EXPECT_LE(m.full_rel * kAccumulationMargin, b.rel_to_peak) << m.c->name;
    }
  }
}

// 14-bit accumulation flips requantized intermediate codes (a few per mille), FP32's 24 bits
// (the F16 path's model) all but none.
TEST(PromotionEmulationTest, TruncatedAccumulationFlipsSomeIntermediateCodes) {
  int64_t flips14 = 0, flips24 = 0, codes = 0;
  for (const Measured& m : Measurements()) {
    if (m.c->saturate_x) continue;
    flips24 += m.path[static_cast<int>(MmaPath::kF16FromFp8)].flips;
    flips14 += m.path[static_cast<int>(MmaPath::kFp8E4M3)].flips;
    codes += m.path[static_cast<int>(MmaPath::kFp8E4M3)].codes;
  }
  EXPECT_GT(flips14, 0);
  EXPECT_LT(flips14, codes / 50);
  EXPECT_LT(flips24, flips14);
}

// The derivation of fp8_tolerance.h: per path and class (random, saturated), the largest error
// of the truncating twin against the plain reference and against the FP32-order twin over the
// GPU tests' shapes, times kAccumulationMargin, must fit the bound. On the FP8 path, which the
// truncation model sizes, the bound must also be no looser than kRoundUp times that; the F16
// path (24 bits: no code flipped) keeps its wider bounds from the summation-order derivation.
TEST(PromotionEmulationTest, AccumulationTolerancesDerivedFromTheEmulation) {
  for (MmaPath path : {MmaPath::kF16FromFp8, MmaPath::kFp8E4M3}) {
    for (bool saturated : {false, true}) {
      double worst_cos = 0.0, worst_rel = 0.0;
      for (const Measured& m : Measurements()) {
        if (m.c->saturate_x != saturated) continue;
        const Measured::Path& p = m.path[static_cast<int>(path)];
        worst_cos = std::max({worst_cos, p.cos_ref, p.cos_full});
        worst_rel = std::max({worst_rel, p.rel_ref, p.rel_full});
      }
      const GemmBounds b = saturated ? SaturatedBounds(path) : RandomBounds(path);
      std::printf(
          "[derived] %s %s: cosine %.3g x %.0f = %.3g (bound %.3g), max err / peak "
          "%.3g x %.0f = %.3g (bound %.3g)\n",
          MmaPathName(path), saturated ? "saturated" : "random", worst_cos, kAccumulationMargin,
          worst_cos * kAccumulationMargin, b.cosine_diff, worst_rel, kAccumulationMargin,
          worst_rel * kAccumulationMargin, b.rel_to_peak);
      EXPECT_GE(b.cosine_diff, worst_cos * kAccumulationMargin) << MmaPathName(path);
      EXPECT_GE(b.rel_to_peak, worst_rel * kAccumulationMargin) << MmaPathName(path);
      if (path == MmaPath::kFp8E4M3) {
        EXPECT_LE(b.cosine_diff, worst_cos * kAccumulationMargin * kRoundUp);
        EXPECT_LE(b.rel_to_peak, worst_rel * kAccumulationMargin * kRoundUp);
      }
    }
  }
}

}  // namespace
}  // namespace expertmesh::cuda::testing
