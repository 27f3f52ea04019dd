// Tolerances of the GPU expert-GEMM tests (grouped_gemm_gpu_test.cc, cuda_experts_gpu_test.cc)
// against the plain CPU reference, per MMA path. Derived on the CPU by
// promotion_emulation_test.cc (AccumulationTolerancesDerivedFromTheEmulation), which runs the
// kernels' CPU twin with the tensor cores' truncating accumulation (expert_reference.h:
// kFp8TensorCoreAccumulation, kF16TensorCoreAccumulation) on the GPU tests' shapes and checks
//   kAccumulationMargin x measured <= bound (<= kAccumulationMargin x measured x kRoundUp on the
//   FP8 path; the F16 path, whose 24-bit model flips no code, keeps its wider earlier bounds).
// Measured (14 bits, k32): random cases up to cosine 6.8e-6 and max err / peak 0.8% (0.8% of
// the intermediate codes flipped by one step), saturated 2.3e-5 and 0.9%.
// Truncation flips some requantized FP8 intermediate codes by one step (6%), which no amount
// of FP32 care removes: that, not the summation order, sizes the FP8 path's bounds.
// Batch-invariance checks stay bitwise.
#pragma once

#include "core/kernels/plan/kernel_plan.h"

namespace expertmesh::cuda::testing {

struct GemmBounds {
  double cosine_diff;  // CosineDiff(gpu, reference)
  double rel_to_peak;  // MaxRelToPeak(gpu, reference)
};

// bound >= this x the emulated error; the rest is for what the emulation does not model.
inline constexpr double kAccumulationMargin = 4.0;
// ... and at most this much more (bounds are rounded up, not chosen freely).
inline constexpr double kRoundUp = 3.0;

// Random weights and activations (bundled, ragged, DeepSeek-V3 and CudaExperts shapes).
inline GemmBounds RandomBounds(MmaPath path) {
  return path == MmaPath::kFp8E4M3 ? GemmBounds{5e-5, 0.05} : GemmBounds{1e-5, 0.02};
}
// Every value at +-448 (partial sums beyond 2^24).
inline GemmBounds SaturatedBounds(MmaPath path) {
  return path == MmaPath::kFp8E4M3 ? GemmBounds{2e-4, 0.05} : GemmBounds{1e-3, 0.05};
}

}  // namespace expertmesh::cuda::testing
