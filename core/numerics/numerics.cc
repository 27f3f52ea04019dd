// Scalar conversions between float32 and FP8 E4M3 (float8_e4m3fn), BF16 and FP16.
//
// NOTES: every encoder works on the float32 bit pattern. For a normal result the mantissa is
// rounded to nearest even by adding (half - 1 + lsb) below the kept bits; a carry out of the
// mantissa moves into the exponent, which is exactly the right result (including rounding up to
// the next binade). Subnormal results are computed as an integer count of the smallest
// subnormal: |x| * 2^k is exact in float32 and std::nearbyint rounds half to even in the
// default floating-point environment.
#include "core/numerics/numerics.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "core/base/check.h"
#include "spdlog/fmt/fmt.h"

namespace expertmesh {
namespace {

constexpr uint32_t kF32SignMask = 0x80000000u;
constexpr uint32_t kF32AbsMask = 0x7FFFFFFFu;
constexpr uint32_t kF32InfBits = 0x7F800000u;

// Broken caller invariant (mismatched buffer sizes): fail loudly in every build type.
void CheckSameSize(size_t in, size_t out, const char* what) {
  EM_CHECK(in == out, fmt::format("{}: input has {} elements but output has {}", what, in, out));
}

// Rounds the float32 magnitude bits `abs_bits` (a normal number in the target format) to a
// format with `man_bits` mantissa bits and exponent bias `bias`; returns exponent|mantissa.
// The caller guarantees the result does not underflow; overflow shows as a large code.
constexpr uint32_t RoundNormal(uint32_t abs_bits, int man_bits, int bias) {
  const int drop = 23 - man_bits;
  const uint32_t lsb = (abs_bits >> drop) & 1u;
  const uint32_t rounded = abs_bits + ((1u << (drop - 1)) - 1u) + lsb;
  // Re-bias the exponent from 127 to `bias`.
  return (rounded >> drop) - (static_cast<uint32_t>(127 - bias) << man_bits);
}

// Number of smallest subnormals (2^min_sub_exp) nearest to |x|, ties to even.
inline uint32_t RoundSubnormal(float abs_x, int min_sub_exp) {
  return static_cast<uint32_t>(std::nearbyint(std::ldexp(abs_x, -min_sub_exp)));
}

std::array<float, 256> BuildFp8Table() {
  std::array<float, 256> table{};
  for (int code = 0; code < 256; ++code) {
    const int exponent = (code >> 3) & 0xF;
    const int mantissa = code & 0x7;
    float magnitude;
    if ((code & 0x7F) == 0x7F) {
      magnitude = std::numeric_limits<float>::quiet_NaN();
    } else if (exponent == 0) {
      magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // mantissa * 2^-6 / 8
    } else {
      magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 7 - 3);
    }
    table[code] = (code & 0x80) ? -magnitude : magnitude;
  }
  return table;
}

}  // namespace

const float* Fp8E4M3Table() {
  static const std::array<float, 256> table = BuildFp8Table();
  return table.data();
}

float Fp8E4M3ToFloat(uint8_t code) { return Fp8E4M3Table()[code]; }

uint8_t FloatToFp8E4M3(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint8_t sign = static_cast<uint8_t>((bits & kF32SignMask) >> 24);
  const uint32_t abs_bits = bits & kF32AbsMask;
  if (abs_bits > kF32InfBits) return sign | 0x7F;  // NaN
  // 448 is the largest finite value; everything from 448 up (infinity included) saturates,
  // as PyTorch's float8_e4m3fn cast does.
  constexpr uint32_t kMaxBits = 0x43E00000u;  // 448.0f
  if (abs_bits >= kMaxBits) return sign | 0x7E;
  constexpr uint32_t kMinNormalBits = 0x3C800000u;  // 2^-6
  if (abs_bits < kMinNormalBits) {
    // Subnormal: multiples of 2^-9; a result of 8 is the smallest normal (code 0x08).
    return sign | static_cast<uint8_t>(RoundSubnormal(std::bit_cast<float>(abs_bits), -9));
  }
  // Below 448 the rounded result is at most 448 (code 0x7E), never the NaN code.
  return sign | static_cast<uint8_t>(RoundNormal(abs_bits, 3, 7));
}

float Bf16ToFloat(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

uint16_t FloatToBf16(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  if ((bits & kF32AbsMask) > kF32InfBits) {
    return static_cast<uint16_t>((bits >> 16) | 0x0040);  // quiet NaN, sign kept
  }
  const uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7FFFu + lsb) >> 16);  // overflow carries into inf
}

float Fp16ToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const int exponent = (bits >> 10) & 0x1F;
  const uint32_t mantissa = bits & 0x3FFu;
  float magnitude;
  if (exponent == 0x1F) {
    return std::bit_cast<float>(sign | kF32InfBits | (mantissa << 13));  // inf / NaN
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else {
    magnitude = std::ldexp(static_cast<float>(1024 + mantissa), exponent - 15 - 10);
  }
  return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(magnitude));
}

uint16_t FloatToFp16(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint16_t sign = static_cast<uint16_t>((bits & kF32SignMask) >> 16);
  const uint32_t abs_bits = bits & kF32AbsMask;
  if (abs_bits > kF32InfBits) return sign | 0x7E00;  // quiet NaN
  constexpr uint32_t kOverflowBits = 0x47800000u;    // 65536: rounds to inf whatever the rest
  if (abs_bits >= kOverflowBits) return sign | 0x7C00;
  constexpr uint32_t kMinNormalBits = 0x38800000u;  // 2^-14
  if (abs_bits < kMinNormalBits) {
    // Subnormal: multiples of 2^-24; a result of 1024 is the smallest normal (0x0400).
    return sign | static_cast<uint16_t>(RoundSubnormal(std::bit_cast<float>(abs_bits), -24));
  }
  // Values in [65520, 65536) carry into exponent 31 with mantissa 0: infinity, as IEEE wants.
  return sign | static_cast<uint16_t>(RoundNormal(abs_bits, 10, 15));
}

void Fp8E4M3ToFloat(std::span<const uint8_t> in, std::span<float> out) {
  CheckSameSize(in.size(), out.size(), "Fp8E4M3ToFloat");
  const float* table = Fp8E4M3Table();
  for (size_t i = 0; i < in.size(); ++i) out[i] = table[in[i]];
}

void Bf16ToFloat(std::span<const uint16_t> in, std::span<float> out) {
  CheckSameSize(in.size(), out.size(), "Bf16ToFloat");
  for (size_t i = 0; i < in.size(); ++i) out[i] = Bf16ToFloat(in[i]);
}

void FloatToBf16(std::span<const float> in, std::span<uint16_t> out) {
  CheckSameSize(in.size(), out.size(), "FloatToBf16");
  for (size_t i = 0; i < in.size(); ++i) out[i] = FloatToBf16(in[i]);
}

}  // namespace expertmesh
