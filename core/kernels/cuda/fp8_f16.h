// FP8 E4M3 -> FP16 widening by bit moves, for the sm_86 grouped GEMM path (Ampere has no FP8
// tensor cores and no FP8 convert instruction). Host and device code: the CPU unit tests check
// it against core/numerics/numerics.h for all 256 codes.
//
// An e4m3 byte s.eeee.mmm placed at bits 14..7 of an FP16 (s.0eeee.mmm0000000) is an FP16 of
// the same sign, exponent field 0eeee (bias 15 instead of 7) and the same mantissa, that is the
// e4m3 value times 2^-8 -- exactly, subnormals included (FP16 has more exponent and mantissa
// range below). So the GEMM multiplies FP16 values a*2^-8 and b*2^-8 exactly in the FP32
// accumulator and scales the 128-deep partial sums by 2^16 (kF16FromFp8Unscale) together with
// the block scales. NaN codes (0x7F, 0xFF) become 480; DeepSeek weights and our quantized
// activations never hold NaN.
#pragma once

#include <cstdint>

#include "core/kernels/cuda/host_device.h"

namespace expertmesh::cuda {

inline constexpr float kF16FromFp8Unscale = 65536.0f;  // (2^8)^2

// Bytes b0..b3 of v (b0 least significant, lowest k) -> two f16x2 words:
// *lo = (b0, b1), *hi = (b2, b3), the lower-k element in the low half of each word.
EM_HOST_DEVICE void Fp8x4ToF16x4Scaled(uint32_t v, uint32_t* lo, uint32_t* hi) {
  *lo = ((v & 0x80u) << 8) | ((v & 0x7Fu) << 7) | ((v & 0x8000u) << 16) | ((v & 0x7F00u) << 15);
  *hi = ((v & 0x800000u) >> 8) | ((v & 0x7F0000u) >> 9) | (v & 0x80000000u) |
        ((v & 0x7F000000u) >> 1);
}

}  // namespace expertmesh::cuda
