// DeepSeek block quantization of weights (128 x 128 blocks, float32 weight_scale_inv) and
// per-token 1 x 128 quantization of activations. Plain scalar reference code: every faster
// path (SIMD, CUDA, the wire encoder) is tested against it.
#include "core/numerics/quant.h"

#include <algorithm>
#include <cmath>

#include "core/base/check.h"
#include "core/numerics/numerics.h"
#include "spdlog/fmt/fmt.h"

namespace expertmesh {
namespace {

// Broken caller invariant (a buffer of the wrong size): fail loudly in every build type.
void CheckSize(size_t actual, int64_t expected, const char* what) {
  EM_CHECK(actual == static_cast<size_t>(expected),
           fmt::format("{}: buffer has {} elements, expected {}", what, actual, expected));
}

}  // namespace

void QuantizeWeightBlocks(std::span<const float> w, int64_t rows, int64_t cols, BlockShape block,
                          std::span<uint8_t> fp8, std::span<float> scale_inv) {
  const int64_t nb_rows = NumBlocks(rows, block.rows);
  const int64_t nb_cols = NumBlocks(cols, block.cols);
  CheckSize(w.size(), rows * cols, "QuantizeWeightBlocks(w)");
  CheckSize(fp8.size(), rows * cols, "QuantizeWeightBlocks(fp8)");
  CheckSize(scale_inv.size(), nb_rows * nb_cols, "QuantizeWeightBlocks(scale_inv)");
  for (int64_t br = 0; br < nb_rows; ++br) {
    const int64_t r0 = br * block.rows;
    const int64_t r1 = std::min(rows, r0 + block.rows);
    for (int64_t bc = 0; bc < nb_cols; ++bc) {
      const int64_t c0 = bc * block.cols;
      const int64_t c1 = std::min(cols, c0 + block.cols);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
      }
      const float s = amax > 0.0f ? amax / kFp8E4M3Max : 1.0f;
      scale_inv[br * nb_cols + bc] = s;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) fp8[r * cols + c] = FloatToFp8E4M3(w[r * cols + c] / s);
      }
    }
  }
}

void DequantizeWeightRow(const uint8_t* fp8, const float* scale_inv, int64_t rows, int64_t cols,
                         BlockShape block, int64_t r, float* out) {
  EM_CHECK(r >= 0 && r < rows, fmt::format("DequantizeWeightRow: row {} outside [0, {})", r, rows));
  const float* table = Fp8E4M3Table();
  const int64_t nb_cols = NumBlocks(cols, block.cols);
  const float* row_scales = scale_inv + (r / block.rows) * nb_cols;
  const uint8_t* row = fp8 + r * cols;
  for (int64_t c = 0; c < cols; ++c) out[c] = table[row[c]] * row_scales[c / block.cols];
}

QuantizedActivations QuantizeActivations(std::span<const float> x, int64_t n_rows, int64_t dim) {
  CheckSize(x.size(), n_rows * dim, "QuantizeActivations(x)");
  QuantizedActivations q;
  q.n_rows = n_rows;
  q.dim = dim;
  const int64_t groups = q.groups();
  q.fp8.resize(n_rows * dim);
  q.scales.resize(n_rows * groups);
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * kActQuantGroup;
      const int64_t c1 = std::min(dim, c0 + kActQuantGroup);
      float amax = kActQuantMinAmax;
      for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(x[r * dim + c]));
      const float s = amax / kFp8E4M3Max;
      q.scales[r * groups + g] = s;
      for (int64_t c = c0; c < c1; ++c) q.fp8[r * dim + c] = FloatToFp8E4M3(x[r * dim + c] / s);
    }
  }
  return q;
}

void DequantizeActivations(const QuantizedActivations& q, std::span<float> out) {
  CheckSize(out.size(), q.n_rows * q.dim, "DequantizeActivations(out)");
  const float* table = Fp8E4M3Table();
  const int64_t groups = q.groups();
  for (int64_t r = 0; r < q.n_rows; ++r) {
    for (int64_t c = 0; c < q.dim; ++c) {
      out[r * q.dim + c] = table[q.fp8[r * q.dim + c]] * q.scales[r * groups + c / kActQuantGroup];
    }
  }
}

void FakeQuantizeActivations(std::span<float> x, int64_t n_rows, int64_t dim) {
  const QuantizedActivations q = QuantizeActivations(x, n_rows, dim);
  DequantizeActivations(q, x);
}

}  // namespace expertmesh
