// Scalar number formats of DeepSeek-V3 checkpoints and wire messages: FP8 E4M3 exactly as
// PyTorch's float8_e4m3fn (bias 7, max 448, no infinities, NaN = 0x7F/0xFF, subnormals),
// BF16 and FP16. Encoders round to nearest even; the FP8 encoder saturates to +-448.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace expertmesh {

inline constexpr float kFp8E4M3Max = 448.0f;

// Exact decode of one float8_e4m3fn code.
float Fp8E4M3ToFloat(uint8_t code);
// Round-to-nearest-even encode with saturation to +-448; NaN -> 0x7F (sign kept: 0xFF).
uint8_t FloatToFp8E4M3(float x);

float Bf16ToFloat(uint16_t bits);
uint16_t FloatToBf16(float x);  // RNE; NaN stays NaN (quiet)
float Fp16ToFloat(uint16_t bits);
uint16_t FloatToFp16(float x);  // RNE; overflow -> inf

// Bulk helpers: out.size() == in.size().
void Fp8E4M3ToFloat(std::span<const uint8_t> in, std::span<float> out);
void Bf16ToFloat(std::span<const uint16_t> in, std::span<float> out);
void FloatToBf16(std::span<const float> in, std::span<uint16_t> out);

// The 256-entry decode table (index = code), built once.
const float* Fp8E4M3Table();

}  // namespace expertmesh
