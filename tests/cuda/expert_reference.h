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

// 1 - 2<a,b> / (|a|^2 + |b|^2): 0 for equal tensors, scale-free (DeepGEMM's calc_diff).
double CosineDiff(std::span<const float> a, std::span<const float> b);
// max |a - b| / max(max |b|, tiny).
double MaxRelToPeak(std::span<const float> a, std::span<const float> b);

}  // namespace expertmesh::cuda::testing
