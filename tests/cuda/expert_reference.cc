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

namespace {

// One 128-deep block's partial sum of products a[k] * b[k] (k in [0, n)), accumulated as `acc`
// models.
float BlockPartial(const float* fp8, const uint8_t* a, const uint8_t* b, int64_t n,
                   const MmaAccumulation& acc) {
  if (acc.kept_bits == 0) {
    float part = 0.0f;
    for (int64_t k = 0; k < n; ++k) part += fp8[a[k]] * fp8[b[k]];
    return part;
  }
  float part = 0.0f;
  double terms[65];
  for (int64_t k0 = 0; k0 < n; k0 += acc.k_per_mma) {
    const int64_t m = std::min<int64_t>(acc.k_per_mma, n - k0);
    terms[0] = part;
    double peak = std::fabs(terms[0]);
    for (int64_t k = 0; k < m; ++k) {
      terms[k + 1] = static_cast<double>(fp8[a[k0 + k]]) * fp8[b[k0 + k]];  // exact
      peak = std::max(peak, std::fabs(terms[k + 1]));
    }
    if (peak == 0.0) continue;
    int e = 0;
    std::frexp(peak, &e);  // peak in [2^(e-1), 2^e)
    const double ulp = std::ldexp(1.0, e - acc.kept_bits);
    double sum = 0.0;  // exact: at most 65 multiples of ulp below 2^(e + 7)
    for (int64_t k = 0; k <= m; ++k) sum += std::trunc(terms[k] / ulp) * ulp;
    part = static_cast<float>(sum);
  }
  return part;
}

}  // namespace

std::vector<float> PromotedExperts(std::span<const HostExpert> experts, int64_t H, int64_t I,
                                   const QuantizedActivations& x, const ExpertRoutes& routes,
                                   const MmaAccumulation& acc, int64_t* flips, int64_t* codes) {
  const float* fp8 = Fp8E4M3Table();
  const int64_t nb_h = NumBlocks(H, 128), nb_i = NumBlocks(I, 128);
  std::vector<float> out(x.n_rows * H, 0.0f), h(I), h_full(I);
  const bool count = flips != nullptr && acc.kept_bits != 0;
  if (flips != nullptr) *flips = 0;
  if (codes != nullptr) *codes = 0;
  for (int64_t r = 0; r < routes.n_rows(); ++r) {
    for (int32_t p = routes.offsets[r]; p < routes.offsets[r + 1]; ++p) {
      const HostExpert& e = experts[routes.experts[p]];
      for (int64_t i = 0; i < I; ++i) {
        float g = 0.0f, u = 0.0f, gf = 0.0f, uf = 0.0f;
        for (int64_t kb = 0; kb < nb_h; ++kb) {
          const int64_t k0 = kb * 128, n = std::min<int64_t>(128, H - k0);
          const uint8_t* xa = x.fp8.data() + r * H + k0;
          const float sa = x.scales[r * nb_h + kb];
          const float sg = sa * e.gate_scale[(i / 128) * nb_h + kb];
          const float su = sa * e.up_scale[(i / 128) * nb_h + kb];
          g += BlockPartial(fp8, xa, e.gate.data() + i * H + k0, n, acc) * sg;
          u += BlockPartial(fp8, xa, e.up.data() + i * H + k0, n, acc) * su;
          if (count) {
            gf += BlockPartial(fp8, xa, e.gate.data() + i * H + k0, n, kFullFp32Accumulation) * sg;
            uf += BlockPartial(fp8, xa, e.up.data() + i * H + k0, n, kFullFp32Accumulation) * su;
          }
        }
        h[i] = g / (1.0f + std::exp(-g)) * u;
        if (count) h_full[i] = gf / (1.0f + std::exp(-gf)) * uf;
      }
      const QuantizedActivations hq = QuantizeActivations(h, 1, I);
      if (codes != nullptr) *codes += I;
      if (count) {
        const QuantizedActivations hf = QuantizeActivations(h_full, 1, I);
        for (int64_t i = 0; i < I; ++i) *flips += hq.fp8[i] != hf.fp8[i] ? 1 : 0;
      }
      for (int64_t c = 0; c < H; ++c) {
        float sum = 0.0f;
        for (int64_t kb = 0; kb < nb_i; ++kb) {
          const int64_t k0 = kb * 128, n = std::min<int64_t>(128, I - k0);
          sum += BlockPartial(fp8, hq.fp8.data() + k0, e.down.data() + c * I + k0, n, acc) *
                 (hq.scales[kb] * e.down_scale[(c / 128) * nb_i + kb]);
        }
        out[r * H + c] += sum * routes.weights[p];
      }
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
