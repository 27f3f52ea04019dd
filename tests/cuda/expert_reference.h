// Host-only helpers of the CUDA backend tests: random block-quantized experts, the plain-loop
// CPU reference of the routed-expert FFN (the RoutedExperts contract of core/model/experts.h
// written out directly) and error metrics. No CUDA: the CPU emulation test uses them too.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "core/model/experts.h"
#include "core/numerics/quant.h"

namespace expertmesh::cuda::testing {

// One routed expert in the checkpoint's format (host copies).
struct HostExpert {
  std::vector<uint8_t> gate, up, down;                  // [I, H], [I, H], [H, I] e4m3
  std::vector<float> gate_scale, up_scale, down_scale;  // 128 x 128 block scale_inv
};

enum class WeightKind {
  kRandom,        // normal, std 1/sqrt(fan_in), varied per block
  kMaxMagnitude,  // every block saturates: codes +-448 with scale_inv 1
};

HostExpert RandomExpert(int64_t H, int64_t I, WeightKind kind, std::mt19937& rng);

// out: [R, H] = sum over each row's pairs (ascending expert) of weight * expert(x), the
// intermediate fake-quantized per 128 channels; float accumulation in k order.
std::vector<float> ReferenceExperts(std::span<const HostExpert> experts, int64_t H, int64_t I,
                                    const QuantizedActivations& x, const ExpertRoutes& routes);

// How the tensor cores add the products of one 128-deep K block into the MMA's FP32 partial
// (the kernels promote each block's partial into the FP32 accumulator outside the MMA).
// kept_bits = 0: every product added in FP32, round to nearest (an idealised MMA). Otherwise the
// alignment model of the tensor cores: per MMA instruction, the incoming partial and its
// k_per_mma products are aligned to the largest exponent among them and every term is truncated
// (toward zero) to kept_bits significant bits of that exponent before an exact sum.
struct MmaAccumulation {
  int k_per_mma = 32;
  int kept_bits = 0;
};
// FP32 in k order (the previous CPU twin): the baseline the truncation error is measured against.
inline constexpr MmaAccumulation kFullFp32Accumulation{32, 0};
// FP8 tensor cores (sm_89+, mma m16n8k32 e4m3): DeepSeek-V3 (sec. 3.3.2) measured about 14 bits
// kept by H800 FP8 GEMM accumulation.
inline constexpr MmaAccumulation kFp8TensorCoreAccumulation{32, 14};
// FP16 tensor cores with FP32 accumulation (the sm_86 path, mma m16n8k16): aligned and
// truncated to FP32's 24 bits (Fasi et al., "Numerical behavior of NVIDIA tensor cores", 2021).
inline constexpr MmaAccumulation kF16TensorCoreAccumulation{16, 24};

// The CPU twin of the grouped GEMM kernels' numerics: per 128-deep K block a partial sum of the
// raw FP8 products accumulated as `acc` models, promoted into the FP32 accumulator with
// activation scale x weight scale; SwiGLU; 1 x 128 requantization; the same for down; weight;
// ascending-order combine. out: [R, H]. `flips` (optional) counts the requantized intermediate
// codes that differ from those of the full-FP32 twin.
std::vector<float> PromotedExperts(std::span<const HostExpert> experts, int64_t H, int64_t I,
                                   const QuantizedActivations& x, const ExpertRoutes& routes,
                                   const MmaAccumulation& acc = kFullFp32Accumulation,
                                   int64_t* flips = nullptr, int64_t* codes = nullptr);

// 1 - 2<a,b> / (|a|^2 + |b|^2): 0 for equal tensors, scale-free (DeepGEMM's calc_diff).
double CosineDiff(std::span<const float> a, std::span<const float> b);
// max |a - b| / max(max |b|, tiny).
double MaxRelToPeak(std::span<const float> a, std::span<const float> b);

}  // namespace expertmesh::cuda::testing
