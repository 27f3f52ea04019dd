#include "tests/cuda/expert_reference.h"

#include <algorithm>
#include <cmath>

#include "core/numerics/numerics.h"

namespace expertmesh::cuda::testing {
namespace {

void MakeWeight(int64_t rows, int64_t cols, WeightKind kind, std::mt19937& rng,
                std::vector<uint8_t>& fp8, std::vector<float>& scale) {
  std::vector<float> w(rows * cols);
  const BlockShape block{128, 128};
  fp8.resize(rows * cols);
  scale.resize(NumBlocks(rows, 128) * NumBlocks(cols, 128));
  if (kind == WeightKind::kMaxMagnitude) {
    for (int64_t i = 0; i < rows * cols; ++i) fp8[i] = rng() % 2 ? 0x7E : 0xFE;  // +-448
    std::fill(scale.begin(), scale.end(), 1.0f);
    return;
  }
  std::normal_distribution<float> normal(0.0f, 1.0f / std::sqrt(static_cast<float>(cols)));
  std::uniform_real_distribution<float> block_gain(0.25f, 4.0f);
  std::vector<float> gains(scale.size());
  for (float& g : gains) g = block_gain(rng);
  const int64_t nb_cols = NumBlocks(cols, 128);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      w[r * cols + c] = normal(rng) * gains[(r / 128) * nb_cols + c / 128];
    }
  }
  QuantizeWeightBlocks(w, rows, cols, block, fp8, scale);
}

}  // namespace

HostExpert RandomExpert(int64_t H, int64_t I, WeightKind kind, std::mt19937& rng) {
  HostExpert e;
  MakeWeight(I, H, kind, rng, e.gate, e.gate_scale);
  MakeWeight(I, H, kind, rng, e.up, e.up_scale);
  MakeWeight(H, I, kind, rng, e.down, e.down_scale);
  return e;
}

std::vector<float> ReferenceExperts(std::span<const HostExpert> experts, int64_t H, int64_t I,
                                    const QuantizedActivations& x, const ExpertRoutes& routes) {
  const BlockShape block{128, 128};
  std::vector<float> xf(x.n_rows * H);
  DequantizeActivations(x, xf);
  std::vector<float> out(x.n_rows * H, 0.0f), wrow(std::max(H, I)), h(I), y(H);
  for (int64_t r = 0; r < routes.n_rows(); ++r) {
    const float* xr = xf.data() + r * H;
    for (int32_t p = routes.offsets[r]; p < routes.offsets[r + 1]; ++p) {
      const HostExpert& e = experts[routes.experts[p]];
      for (int64_t i = 0; i < I; ++i) {
        DequantizeWeightRow(e.gate.data(), e.gate_scale.data(), I, H, block, i, wrow.data());
        float g = 0.0f;
        for (int64_t k = 0; k < H; ++k) g += xr[k] * wrow[k];
        DequantizeWeightRow(e.up.data(), e.up_scale.data(), I, H, block, i, wrow.data());
        float u = 0.0f;
        for (int64_t k = 0; k < H; ++k) u += xr[k] * wrow[k];
        h[i] = g / (1.0f + std::exp(-g)) * u;
      }
      FakeQuantizeActivations(h, 1, I);
      for (int64_t c = 0; c < H; ++c) {
        DequantizeWeightRow(e.down.data(), e.down_scale.data(), H, I, block, c, wrow.data());
        float acc = 0.0f;
        for (int64_t k = 0; k < I; ++k) acc += h[k] * wrow[k];
        y[c] = acc;
      }
      for (int64_t c = 0; c < H; ++c) out[r * H + c] += routes.weights[p] * y[c];
    }
  }
  return out;
}

double CosineDiff(std::span<const float> a, std::span<const float> b) {
  double ab = 0.0, aa = 0.0, bb = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    ab += static_cast<double>(a[i]) * b[i];
    aa += static_cast<double>(a[i]) * a[i];
    bb += static_cast<double>(b[i]) * b[i];
  }
  if (aa + bb == 0.0) return 0.0;
  return 1.0 - 2.0 * ab / (aa + bb);
}

double MaxRelToPeak(std::span<const float> a, std::span<const float> b) {
  double peak = 1e-30, err = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    peak = std::max(peak, std::fabs(static_cast<double>(b[i])));
    err = std::max(err, std::fabs(static_cast<double>(a[i]) - b[i]));
  }
  return err / peak;
}

}  // namespace expertmesh::cuda::testing
