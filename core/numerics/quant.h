// DeepSeek block quantization.
// Weights: W [rows, cols] stored as FP8 E4M3 with a float32 weight_scale_inv per
//   block of [block_rows, block_cols] (128 x 128 in DeepSeek-V3, from
//   quantization_config.weight_block_size); edge blocks are ragged. W ~= fp8 * scale_inv.
// Activations: per token (row), per group of 128 channels, scale = amax / 448,
//   q = fp8(x / scale), x ~= q * scale -- as DeepSeek's act_quant does before each FP8 GEMM.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace expertmesh {

inline constexpr int kActQuantGroup = 128;
inline constexpr float kActQuantMinAmax = 1e-4f;

struct BlockShape {
  int rows = 128;
  int cols = 128;
};

// Number of scale blocks along a dimension of size n: ceil(n / block).
inline int64_t NumBlocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Quantizes w [rows, cols] (float) to fp8 [rows, cols] + scale_inv [nb_rows, nb_cols]
// with scale_inv = amax(block) / 448 (1.0 for an all-zero block).
void QuantizeWeightBlocks(std::span<const float> w, int64_t rows, int64_t cols, BlockShape block,
                          std::span<uint8_t> fp8, std::span<float> scale_inv);

// Dequantizes row r of a block-quantized weight into out [cols].
void DequantizeWeightRow(const uint8_t* fp8, const float* scale_inv, int64_t rows, int64_t cols,
                         BlockShape block, int64_t r, float* out);

// Per-token activation quantization of x [n_rows, dim]: fp8 [n_rows, dim],
// scales [n_rows, ceil(dim/128)] with scale = max(amax, kActQuantMinAmax) / 448 and
// q = fp8(x / scale); the last group of a row is ragged when dim % 128 != 0.
// The amax floor is DeepSeek's own choice (inference/kernel.py act_quant_kernel since the
// V3.1 update, and DeepGEMM's per_token_cast_to_fp8): an all-zero group gets a finite scale
// (1e-4/448) and codes 0 instead of 0/0 = NaN, and a group of tiny values is not blown up.
struct QuantizedActivations {
  int64_t n_rows = 0;
  int64_t dim = 0;
  std::vector<uint8_t> fp8;   // [n_rows, dim]
  std::vector<float> scales;  // [n_rows, groups()]
  int64_t groups() const { return NumBlocks(dim, kActQuantGroup); }
};
QuantizedActivations QuantizeActivations(std::span<const float> x, int64_t n_rows, int64_t dim);
// x ~= q * scale, row-wise into out [n_rows, dim].
void DequantizeActivations(const QuantizedActivations& q, std::span<float> out);
// Quantize then dequantize in place (what an FP8 GEMM sees of its input).
void FakeQuantizeActivations(std::span<float> x, int64_t n_rows, int64_t dim);

}  // namespace expertmesh
