// Highway compiles this file once per SIMD target (foreach_target.h) and dispatches at run time.
#include "core/kernels/cpu/cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/kernels/cpu/thread_pool.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "core/kernels/cpu/cpu_kernels.cc"
#include "hwy/aligned_allocator.h"
#include "hwy/cache_control.h"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

#ifndef EXPERTMESH_CPU_KERNELS_ONCE
#define EXPERTMESH_CPU_KERNELS_ONCE
namespace expertmesh::simd {
inline constexpr int kPartials = 64;  // partial sums of a dot product, on every target

// The last steps of the fixed reduction: 16 partial sums to one.
inline float SumPartials16(const float* p) {
  float s8[8], s4[4];
  for (int j = 0; j < 8; ++j) s8[j] = p[j] + p[j + 8];
  for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// One FP8 E4M3 code as float, scaled: bit-exact with the reference table (numerics.h).
inline float Fp8Scaled(uint8_t b, float scale) {
  if ((b & 0x7F) == 0x7F) return std::nanf("");
  uint32_t bits = (uint32_t{b & 0x80u} << 24) | (uint32_t{b & 0x7Fu} << 20);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f * 0x1p120f * scale;
}
// The same for one fp16 value.
inline float Fp16Widen(uint16_t h) {
  const uint32_t mag = h & 0x7FFFu, sign = uint32_t{h & 0x8000u} << 16;
  uint32_t bits;
  if (mag >= 0x7C00u) {
    bits = (mag << 13) | 0x7F800000u;
  } else {
    float f;
    const uint32_t shifted = mag << 13;
    std::memcpy(&f, &shifted, sizeof f);
    f *= 0x1p112f;
    std::memcpy(&bits, &f, sizeof f);
  }
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
}  // namespace expertmesh::simd
#endif

HWY_BEFORE_NAMESPACE();
namespace expertmesh::simd {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Exact widening, shared by the row dequantization and the tiles.
// FP8 E4M3 as FP16 times 2^-8, exactly, subnormal codes included: the sign to bit 15 and the
// 7 low bits to bits 7..13 (exponent bias 7 -> 15), then the FP16 -> float conversion
// (F16C where the target has it). No float subnormal is ever formed, so no microcode assist:
// reading the 7 bits as float bits times 2^120 (this file's earlier way) formed one for every
// FP8 subnormal code (~1/16 of random codes), and a multiply by a subnormal costs ~100 cycles on
// x86 (13x slower tiles). NaN codes are not special-cased here.
template <class D>
HWY_INLINE hn::Vec<D> Fp8AsHalf(D d, const uint8_t* p) {
  const hn::Rebind<uint8_t, D> d8;
  const hn::Rebind<uint16_t, D> d16;
  const hn::Rebind<int16_t, D> di16;
  const hn::Rebind<hwy::float16_t, D> dh;
  // code << 8 as int16, shifted right arithmetically: the sign lands in bits 15 and 14.
  const auto v =
      hn::ShiftRight<1>(hn::BitCast(di16, hn::ShiftLeft<8>(hn::PromoteTo(d16, hn::LoadU(d8, p)))));
  return hn::PromoteTo(d, hn::BitCast(dh, hn::And(hn::BitCast(d16, v), hn::Set(d16, 0xBF80u))));
}
// FP16 (Highway's emulated widening, on targets without F16C, loses inf and NaN): the 15 low
// bits at float bits 13..27 times 2^112 (bias 15 -> 127), exact for normals and subnormals;
// exponent 31 becomes 255 (inf, NaN).
template <class D, class VU>
HWY_INLINE hn::Vec<D> F16Widen(D d, VU v) {
  const hn::RebindToUnsigned<D> du;
  const auto low15 = hn::Set(du, 0x7FFFu), inf_exp = hn::Set(du, 0x7C00u);
  const auto mag = hn::And(v, low15);
  const auto shifted = hn::ShiftLeft<13>(mag);
  const auto finite = hn::BitCast(du, hn::Mul(hn::BitCast(d, shifted), hn::Set(d, 0x1p112f)));
  const auto special = hn::Or(shifted, hn::Set(du, 0x7F800000u));
  const auto bits = hn::IfThenElse(hn::Eq(hn::And(mag, inf_exp), inf_exp), special, finite);
  return hn::BitCast(d, hn::Or(bits, hn::ShiftLeft<16>(hn::AndNot(low15, v))));
}

// Times the block scale: one rounding, as the reference table's value * scale.
void DequantFp8RowImpl(const uint8_t* w, const float* block_scales, int64_t n, int64_t block_cols,
                       float* out) {
  const hn::ScalableTag<float> df;
  const hn::RebindToUnsigned<decltype(df)> du;
  const hn::Rebind<uint8_t, decltype(df)> d8;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const auto low7 = hn::Set(du, 0x7Fu);
  const auto two8 = hn::Set(df, 256.0f);
  const auto nan = hn::Set(df, std::nanf(""));
  for (int64_t c0 = 0, b = 0; c0 < n; c0 += block_cols, ++b) {
    const int64_t c1 = std::min(n, c0 + block_cols);
    const float s = block_scales[b];
    const auto scale = hn::Set(df, s);
    int64_t c = c0;
    for (; c + N <= c1; c += N) {
      const auto v = hn::PromoteTo(du, hn::LoadU(d8, w + c));
      const auto f = hn::Mul(hn::Mul(Fp8AsHalf(df, w + c), two8), scale);
      const auto is_nan = hn::RebindMask(df, hn::Eq(hn::And(v, low7), low7));
      hn::StoreU(hn::IfThenElse(is_nan, nan, f), df, out + c);
    }
    for (; c < c1; ++c) out[c] = Fp8Scaled(w[c], s);
  }
}

void DequantBf16RowImpl(const uint16_t* w, int64_t n, float* out) {
  const hn::ScalableTag<float> df;
  const hn::RebindToUnsigned<decltype(df)> du;
  const hn::Rebind<uint16_t, decltype(df)> d16;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t c = 0;
  for (; c + N <= n; c += N) {
    const auto v = hn::ShiftLeft<16>(hn::PromoteTo(du, hn::LoadU(d16, w + c)));
    hn::StoreU(hn::BitCast(df, v), df, out + c);
  }
  for (; c < n; ++c) {
    const uint32_t bits = uint32_t{w[c]} << 16;
    std::memcpy(out + c, &bits, sizeof(float));
  }
}

void DequantF16RowImpl(const uint16_t* w, int64_t n, float* out) {
  const hn::ScalableTag<float> df;
  const hn::RebindToUnsigned<decltype(df)> du;
  const hn::Rebind<uint16_t, decltype(df)> d16;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t c = 0;
  for (; c + N <= n; c += N) {
    hn::StoreU(F16Widen(df, hn::PromoteTo(du, hn::LoadU(d16, w + c))), df, out + c);
  }
  for (; c < n; ++c) out[c] = Fp16Widen(w[c]);
}

// p[j] + p[j + n/2] down to one lane: adding the vector's halves is that order on any width.
template <class D>
HWY_INLINE float HalvingSum(D d, hn::Vec<D> v) {
#if HWY_TARGET == HWY_SCALAR
  (void)d;
  return hn::GetLane(v);
#else
  if constexpr (hn::MaxLanes(d) == 1) {
    return hn::GetLane(v);
  } else {
    const hn::Half<D> dh;
    return HalvingSum(dh, hn::Add(hn::LowerHalf(dh, v), hn::UpperHalf(dh, v)));
  }
#endif
}

// 64 partial sums (4 independent FMA chains even on AVX-512) in kPartials / lanes vectors,
// two rows of x at a time (each weight load feeds two FMAs).
void DotRowsImpl(const float* w, const float* x, int64_t rows, int64_t k, int64_t x_stride,
                 float* y, int64_t y_stride) {
  const hn::CappedTag<float, 16> d;
  const hn::CappedTag<float, 1> d1;
  using V = hn::Vec<decltype(d)>;
  // Fixed-width targets only (x86, NEON): compile-time counts keep the sums in registers.
  constexpr size_t N = hn::MaxLanes(d);
  constexpr size_t nvec = kPartials / N;  // 4 (AVX-512), 8 (AVX2), 16 (SSE4, NEON), 64 (scalar)
  const int64_t k_main = k / kPartials * kPartials;
  // Whole vectors past the last full block of 64 still land in their own partials: the
  // vector at k_main + j * N holds partials j * N ...
  const int64_t k_vec = k_main + (k - k_main) / static_cast<int64_t>(N) * static_cast<int64_t>(N);
  HWY_ALIGN float partial[kPartials];
  // The 16 lanes' fixed tree; acc[0 .. nvec/4) hold p[0..16) after the two vector steps.
  auto finish = [&](V* acc, const float* xt) -> float {
    if (k_vec == k) {
      for (size_t j = 0; j < nvec / 2; ++j) acc[j] = hn::Add(acc[j], acc[j + nvec / 2]);
      for (size_t j = 0; j < nvec / 4; ++j) acc[j] = hn::Add(acc[j], acc[j + nvec / 4]);
      for (size_t n = nvec / 4; n > 1; n /= 2) {  // narrower than 16 lanes: p[j] + p[j + 8]
        for (size_t j = 0; j < n / 2; ++j) acc[j] = hn::Add(acc[j], acc[j + n / 2]);
      }
      static_assert(N * nvec == kPartials);
      return HalvingSum(d, acc[0]);
    }
    for (size_t j = 0; j < nvec; ++j) hn::Store(acc[j], d, partial + j * N);
    for (int64_t i = k_vec; i < k; ++i) {  // the tail, with the vector loop's MulAdd
      float& p = partial[i % kPartials];
      p = hn::GetLane(hn::MulAdd(hn::Set(d1, xt[i]), hn::Set(d1, w[i]), hn::Set(d1, p)));
    }
    for (int j = 0; j < 32; ++j) partial[j] += partial[j + 32];
    for (int j = 0; j < 16; ++j) partial[j] += partial[j + 16];
    return SumPartials16(partial);
  };
  int64_t t = 0;
  for (; t + 2 <= rows; t += 2) {
    const float* xa = x + t * x_stride;
    const float* xb = xa + x_stride;
    V a[nvec], b[nvec];
    for (size_t j = 0; j < nvec; ++j) a[j] = b[j] = hn::Zero(d);
    for (int64_t i = 0; i < k_main; i += kPartials) {
      for (size_t j = 0; j < nvec; ++j) {
        const V wv = hn::LoadU(d, w + i + j * N);
        a[j] = hn::MulAdd(hn::LoadU(d, xa + i + j * N), wv, a[j]);
        b[j] = hn::MulAdd(hn::LoadU(d, xb + i + j * N), wv, b[j]);
      }
    }
    for (size_t j = 0; j < nvec; ++j) {
      if (k_main + static_cast<int64_t>((j + 1) * N) > k) break;
      const V wv = hn::LoadU(d, w + k_main + j * N);
      a[j] = hn::MulAdd(hn::LoadU(d, xa + k_main + j * N), wv, a[j]);
      b[j] = hn::MulAdd(hn::LoadU(d, xb + k_main + j * N), wv, b[j]);
    }
    y[t * y_stride] = finish(a, xa);
    y[(t + 1) * y_stride] = finish(b, xb);
  }
  for (; t < rows; ++t) {
    const float* xt = x + t * x_stride;
    V a[nvec];
    for (size_t j = 0; j < nvec; ++j) a[j] = hn::Zero(d);
    for (int64_t i = 0; i < k_main; i += kPartials) {
      for (size_t j = 0; j < nvec; ++j) {
        a[j] = hn::MulAdd(hn::LoadU(d, xt + i + j * N), hn::LoadU(d, w + i + j * N), a[j]);
      }
    }
    for (size_t j = 0; j < nvec; ++j) {
      if (k_main + static_cast<int64_t>((j + 1) * N) > k) break;
      a[j] = hn::MulAdd(hn::LoadU(d, xt + k_main + j * N), hn::LoadU(d, w + k_main + j * N), a[j]);
    }
    y[t * y_stride] = finish(a, xt);
  }
}

// One tile column (16 outputs at one k) widened to float: 16 / N vectors.
template <TileType kType, class D>
HWY_INLINE void WidenTileColumn(D d, const uint8_t* col, hn::Vec<D> scale, hn::Vec<D>* w) {
  constexpr size_t N = hn::MaxLanes(d);
  const hn::RebindToUnsigned<D> du;
  for (size_t j = 0; j < kTileRows / N; ++j) {
    if constexpr (kType == TileType::kF8E4M3) {
      // Pack() admits no NaN codes, and `scale` carries the 2^8 (exact: |s| < 2^7).
      w[j] = hn::Mul(Fp8AsHalf(d, col + j * N), scale);
    } else {
      const hn::Rebind<uint16_t, D> d16;
      const auto v =
          hn::PromoteTo(du, hn::LoadU(d16, reinterpret_cast<const uint16_t*>(col) + j * N));
      if constexpr (kType == TileType::kBF16) {
        w[j] = hn::BitCast(d, hn::ShiftLeft<16>(v));
      } else {
        w[j] = F16Widen(d, v);
      }
    }
  }
}

// Four FP8 tile columns (64 bytes, one cache line) times the scale, as WidenTileColumn: the
// same values, with fewer instructions per byte. 2N codes at a time sign-extended to int16 and
// shifted left by 7 put the sign at bits 15 and 14 and the 7 low bits at 13..7; clearing bit 14
// leaves Fp8AsHalf's FP16 bits, whose two halves widen to float. w[c][j]: column c, vector j.
template <class D>
HWY_INLINE void WidenFp8Columns4(D d, const uint8_t* cols, hn::Vec<D> scale,
                                 hn::Vec<D> (*w)[kTileRows / hn::MaxLanes(D())]) {
  constexpr size_t N = hn::MaxLanes(d);
  constexpr size_t nv = kTileRows / N;
#if HWY_TARGET == HWY_SCALAR
  for (size_t q = 0; q < 4 * nv; ++q) w[q / nv][q % nv] = hn::Mul(Fp8AsHalf(d, cols + q), scale);
#else
  const hn::Repartition<int16_t, D> d16;  // 2N lanes
  const hn::Rebind<int8_t, decltype(d16)> d8;
  const hn::Half<decltype(d16)> dh16;
  const hn::Rebind<hwy::float16_t, decltype(dh16)> dhf;
  const auto mask = hn::Set(d16, static_cast<int16_t>(0xBF80));
  for (size_t i = 0; i < 64 / (2 * N); ++i) {
    const auto v =
        hn::And(hn::ShiftLeft<7>(hn::PromoteTo(
                    d16, hn::LoadU(d8, reinterpret_cast<const int8_t*>(cols) + i * 2 * N))),
                mask);
    const size_t q = 2 * i;  // float vectors q and q + 1 (N codes each)
    w[q / nv][q % nv] = hn::Mul(hn::PromoteTo(d, hn::BitCast(dhf, hn::LowerHalf(dh16, v))), scale);
    w[(q + 1) / nv][(q + 1) % nv] =
        hn::Mul(hn::PromoteTo(d, hn::BitCast(dhf, hn::UpperHalf(dh16, v))), scale);
  }
#endif
}

// Bytes ahead of the kernel's reads that the row kernels prefetch: the hardware prefetchers stop
// at 4 KiB pages, and one thread's weight stream needs more requests in flight than they keep.
inline constexpr int64_t kPrefetchBytes = 4096;

// kRows (1 or 2) rows of x against one tile: acc[row][chain][vector].
template <TileType kType, int kRows>
HWY_INLINE void TileRows(const uint8_t* tile, const float* scales, int64_t block_cols, int64_t in,
                         const float* x, float* y_tile, int64_t y_stride, int64_t valid) {
  const hn::CappedTag<float, kTileRows> d;
  using V = hn::Vec<decltype(d)>;
  constexpr size_t N = hn::MaxLanes(d);
  constexpr size_t nv = kTileRows / N;
  constexpr int64_t kBytes = kType == TileType::kF8E4M3 ? 1 : 2;
  V acc[kRows][4][nv];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < 4; ++c) {
      for (size_t j = 0; j < nv; ++j) acc[r][c][j] = hn::Zero(d);
    }
  }
  V w[nv];
  auto step = [&](int64_t k, int c, V scale) HWY_ATTR {
    WidenTileColumn<kType>(d, tile + k * kTileRows * kBytes, scale, w);
    for (int r = 0; r < kRows; ++r) {
      const V xk = hn::Set(d, x[r * in + k]);
      for (size_t j = 0; j < nv; ++j) acc[r][c][j] = hn::MulAdd(xk, w[j], acc[r][c][j]);
    }
  };
  const int64_t bc = kType == TileType::kF8E4M3 ? block_cols : in;
  for (int64_t k0 = 0, b = 0; k0 < in; k0 += bc, ++b) {
    const V scale = hn::Set(d, kType == TileType::kF8E4M3 ? scales[b] * 256.0f : 1.0f);
    const int64_t k1 = std::min(in, k0 + bc);
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      const uint8_t* cols = tile + k * kTileRows * kBytes;
      for (int64_t l = 0; l < kBytes; ++l) hwy::Prefetch(cols + kPrefetchBytes + 64 * l);
      if constexpr (kType == TileType::kF8E4M3) {
        V w4[4][nv];
        WidenFp8Columns4(d, cols, scale, w4);
        for (int c = 0; c < 4; ++c) {
          for (int r = 0; r < kRows; ++r) {
            const V xk = hn::Set(d, x[r * in + k + c]);
            for (size_t j = 0; j < nv; ++j) acc[r][c][j] = hn::MulAdd(xk, w4[c][j], acc[r][c][j]);
          }
        }
      } else {
        step(k, 0, scale);
        step(k + 1, 1, scale);
        step(k + 2, 2, scale);
        step(k + 3, 3, scale);
      }
    }
    for (; k < k1; ++k) {  // only at the end of `in` (block_cols % 4 == 0)
      switch (k & 3) {
        case 0:
          step(k, 0, scale);
          break;
        case 1:
          step(k, 1, scale);
          break;
        default:
          step(k, 2, scale);
          break;
      }
    }
  }
  HWY_ALIGN float tmp[kTileRows];
  for (int r = 0; r < kRows; ++r) {
    for (size_t j = 0; j < nv; ++j) {
      const V sum =
          hn::Add(hn::Add(acc[r][0][j], acc[r][1][j]), hn::Add(acc[r][2][j], acc[r][3][j]));
      if (valid == kTileRows) {
        hn::StoreU(sum, d, y_tile + r * y_stride + j * N);
      } else {
        hn::Store(sum, d, tmp + j * N);
      }
    }
    if (valid < kTileRows) std::memcpy(y_tile + r * y_stride, tmp, valid * sizeof(float));
  }
}

// One row of x against two adjacent FP8 tiles at once, for two weight streams in flight: per
// tile the same FMAs in the same order as TileRows<kF8E4M3, 1> (bit for bit the same results).
// y: the first tile's 16 outputs, then the second's `valid1`. Each tile has its own scales.
HWY_INLINE void Fp8TilePairRow(const uint8_t* tile0, const uint8_t* tile1, const float* scales0,
                               const float* scales1, int64_t block_cols, int64_t in, const float* x,
                               float* y, int64_t valid1) {
  const hn::CappedTag<float, kTileRows> d;
  using V = hn::Vec<decltype(d)>;
  constexpr size_t N = hn::MaxLanes(d);
  constexpr size_t nv = kTileRows / N;
  const uint8_t* tile[2] = {tile0, tile1};
  V acc[2][4][nv];
  for (int u = 0; u < 2; ++u) {
    for (int c = 0; c < 4; ++c) {
      for (size_t j = 0; j < nv; ++j) acc[u][c][j] = hn::Zero(d);
    }
  }
  for (int64_t k0 = 0, b = 0; k0 < in; k0 += block_cols, ++b) {
    const V scale[2] = {hn::Set(d, scales0[b] * 256.0f), hn::Set(d, scales1[b] * 256.0f)};
    const int64_t k1 = std::min(in, k0 + block_cols);
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      for (int u = 0; u < 2; ++u) {
        const uint8_t* cols = tile[u] + k * kTileRows;
        hwy::Prefetch(cols + kPrefetchBytes);
        V w4[4][nv];
        WidenFp8Columns4(d, cols, scale[u], w4);
        for (int c = 0; c < 4; ++c) {
          const V xk = hn::Set(d, x[k + c]);
          for (size_t j = 0; j < nv; ++j) acc[u][c][j] = hn::MulAdd(xk, w4[c][j], acc[u][c][j]);
        }
      }
    }
    for (; k < k1; ++k) {  // only at the end of `in` (block_cols % 4 == 0): chains 0, 1, 2
      const int c = static_cast<int>(k & 3);
      const V xk = hn::Set(d, x[k]);
      for (int u = 0; u < 2; ++u) {
        V w[nv];
        WidenTileColumn<TileType::kF8E4M3>(d, tile[u] + k * kTileRows, scale[u], w);
        for (size_t j = 0; j < nv; ++j) acc[u][c][j] = hn::MulAdd(xk, w[j], acc[u][c][j]);
      }
    }
  }
  HWY_ALIGN float tmp[kTileRows];
  for (int u = 0; u < 2; ++u) {
    for (size_t j = 0; j < nv; ++j) {
      const V sum =
          hn::Add(hn::Add(acc[u][0][j], acc[u][1][j]), hn::Add(acc[u][2][j], acc[u][3][j]));
      hn::Store(sum, d, tmp + j * N);
    }
    std::memcpy(y + u * kTileRows, tmp, (u == 0 ? kTileRows : valid1) * sizeof(float));
  }
}

// Many rows: each K block of the tile (kKBlock columns) is widened once into a float buffer
// (L1), then groups of kRows rows run over it with their 4 chains' accumulators in registers,
// kept in `acc` ([n][4][16] floats) between blocks. The same FMAs in the same order as
// TileRows: bit for bit the same results.
inline constexpr int64_t kKBlock = 256;

template <int kRows>
HWY_INLINE void BlockRows(const float* wbuf, int64_t len, const float* x, int64_t in, float* acc) {
  const hn::CappedTag<float, kTileRows> d;
  using V = hn::Vec<decltype(d)>;
  constexpr size_t N = hn::MaxLanes(d);
  constexpr size_t nv = kTileRows / N;
  V a[kRows][4][nv];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < 4; ++c) {
      for (size_t j = 0; j < nv; ++j)
        a[r][c][j] = hn::Load(d, acc + (r * 4 + c) * kTileRows + j * N);
    }
  }
  auto step = [&](int64_t k, int c) HWY_ATTR {
    for (size_t j = 0; j < nv; ++j) {
      const V w = hn::Load(d, wbuf + k * kTileRows + j * N);
      for (int r = 0; r < kRows; ++r)
        a[r][c][j] = hn::MulAdd(hn::Set(d, x[r * in + k]), w, a[r][c][j]);
    }
  };
  int64_t k = 0;
  for (; k + 4 <= len; k += 4) {
    step(k, 0);
    step(k + 1, 1);
    step(k + 2, 2);
    step(k + 3, 3);
  }
  for (; k < len; ++k) step(k, static_cast<int>(k & 3));  // the block starts at k = 0 (mod 4)
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < 4; ++c) {
      for (size_t j = 0; j < nv; ++j)
        hn::Store(a[r][c][j], d, acc + (r * 4 + c) * kTileRows + j * N);
    }
  }
}

template <TileType kType>
void TileBlocked(const uint8_t* tile, const float* scales, int64_t block_cols, int64_t in,
                 const float* x, int64_t n, float* y_tile, int64_t y_stride, int64_t valid) {
  const hn::CappedTag<float, kTileRows> d;
  using V = hn::Vec<decltype(d)>;
  constexpr size_t N = hn::MaxLanes(d);
  constexpr size_t nv = kTileRows / N;
  constexpr int kRows = nv >= 4 ? 1 : static_cast<int>(6 / nv);  // 24 accumulators
  constexpr int64_t kBytes = kType == TileType::kF8E4M3 ? 1 : 2;
  // Per-thread buffers, grown as needed and kept: the widened K block and the accumulators.
  thread_local hwy::AlignedFreeUniquePtr<float[]> wbuf_store, acc_store;
  thread_local int64_t acc_capacity = 0;
  if (!wbuf_store) wbuf_store = hwy::AllocateAligned<float>(kKBlock * kTileRows);
  if (acc_capacity < n) {
    acc_store = hwy::AllocateAligned<float>(static_cast<size_t>(n) * 4 * kTileRows);
    acc_capacity = n;
  }
  float* wbuf = wbuf_store.get();
  float* acc = acc_store.get();
  std::fill(acc, acc + n * 4 * kTileRows, 0.0f);
  V w[nv];
  for (int64_t k0 = 0; k0 < in; k0 += kKBlock) {
    const int64_t len = std::min(kKBlock, in - k0);
    for (int64_t k = 0; k < len; ++k) {
      const int64_t kk = k0 + k;
      const V scale =
          hn::Set(d, kType == TileType::kF8E4M3 ? scales[kk / block_cols] * 256.0f : 1.0f);
      WidenTileColumn<kType>(d, tile + kk * kTileRows * kBytes, scale, w);
      for (size_t j = 0; j < nv; ++j) hn::Store(w[j], d, wbuf + k * kTileRows + j * N);
    }
    int64_t t = 0;
    for (; t + kRows <= n; t += kRows) {
      BlockRows<kRows>(wbuf, len, x + t * in + k0, in, acc + t * 4 * kTileRows);
    }
    for (; t < n; ++t) BlockRows<1>(wbuf, len, x + t * in + k0, in, acc + t * 4 * kTileRows);
  }
  HWY_ALIGN float tmp[kTileRows];
  for (int64_t t = 0; t < n; ++t) {
    const float* a = acc + t * 4 * kTileRows;
    for (size_t j = 0; j < nv; ++j) {
      const auto at = [&](int c) HWY_ATTR { return hn::Load(d, a + c * kTileRows + j * N); };
      hn::Store(hn::Add(hn::Add(at(0), at(1)), hn::Add(at(2), at(3))), d, tmp + j * N);
    }
    std::memcpy(y_tile + t * y_stride, tmp, valid * sizeof(float));
  }
}

// Rows of x that TileRows keeps in registers per widening of a tile: 4 chains x 16 / N vectors
// of accumulators per row beside the 4 widened columns. 16-lane targets (AVX-512: 32 vector
// registers) hold 6 rows (24 accumulators); narrower ones 2, as their registers allow.
template <class D>
constexpr int RegisterRows(D d) {
  return hn::MaxLanes(d) == kTileRows ? 6 : 2;
}

// n rows of x against one tile in groups of kRows, then the rest in one smaller group: each
// group widens the tile once (n = 7 at 6 registered rows: two passes, the second from L2, as the
// tile's 16 x in weights stay in L2 between them).
template <TileType kType, int kRows>
HWY_INLINE void TileRowGroups(const uint8_t* tile, const float* scales, int64_t block_cols,
                              int64_t in, const float* x, int64_t n, float* y_tile,
                              int64_t y_stride, int64_t valid) {
  int64_t t = 0;
  for (; t + kRows <= n; t += kRows) {
    TileRows<kType, kRows>(tile, scales, block_cols, in, x + t * in, y_tile + t * y_stride,
                           y_stride, valid);
  }
  if constexpr (kRows > 1) {
    if (t < n) {
      TileRowGroups<kType, kRows - 1>(tile, scales, block_cols, in, x + t * in, n - t,
                                      y_tile + t * y_stride, y_stride, valid);
    }
  }
}

// Rows of x at or above which TileBlocked runs: widened once per K block into L1 and read back
// per group of rows. Below, TileRowGroups widens once per register group. Measured with
// `expertmesh-bench-kernels --m 2 4 8 16 32 64 256 [--target AVX2]` on AMD Zen 4: 16-lane
// groups of 6 beat the blocked kernel up to M = 32 (M = 8: 3.2 against 4.6 ms per 2048 x 7168
// matrix) and tie from 64; 8-lane groups of 2 win below 8 rows and lose from 16.
template <class D>
constexpr int64_t BlockedRows(D d) {
  return hn::MaxLanes(d) == kTileRows ? 64 : 8;
}

// Output tiles [tile_begin, tile_end).
template <TileType kType>
void TiledLinearT(const uint8_t* tiles, const float* scale_inv, int64_t block_rows,
                  int64_t block_cols, int64_t out, int64_t in, const float* x, int64_t n, float* y,
                  int64_t tile_begin, int64_t tile_end) {
  constexpr int64_t kBytes = kType == TileType::kF8E4M3 ? 1 : 2;
  const int64_t scale_cols = kType == TileType::kF8E4M3 ? (in + block_cols - 1) / block_cols : 0;
  for (int64_t o = tile_begin * kTileRows; o < std::min(out, tile_end * kTileRows);
       o += kTileRows) {
    const uint8_t* tile = tiles + (o / kTileRows) * in * kTileRows * kBytes;
    const float* scales =
        kType == TileType::kF8E4M3 ? scale_inv + (o / block_rows) * scale_cols : nullptr;
    const int64_t valid = std::min<int64_t>(kTileRows, out - o);
    // One row, FP8, 16-lane vectors (AVX-512: 8 accumulators), and a second tile in the range.
    if constexpr (kType == TileType::kF8E4M3 &&
                  hn::MaxLanes(hn::CappedTag<float, kTileRows>()) == kTileRows) {
      if (n == 1 && valid == kTileRows && o + kTileRows < std::min(out, tile_end * kTileRows)) {
        const int64_t o1 = o + kTileRows;
        Fp8TilePairRow(tile, tile + in * kTileRows, scales,
                       scale_inv + (o1 / block_rows) * scale_cols, block_cols, in, x, y + o,
                       std::min<int64_t>(kTileRows, out - o1));
        o = o1;  // the loop's step moves past the second tile
        continue;
      }
    }
    constexpr hn::CappedTag<float, kTileRows> d;
    if (n >= BlockedRows(d)) {
      TileBlocked<kType>(tile, scales, block_cols, in, x, n, y + o, out, valid);
      continue;
    }
    TileRowGroups<kType, RegisterRows(d)>(tile, scales, block_cols, in, x, n, y + o, out, valid);
  }
}

void TiledLinearImpl(TileType type, const uint8_t* tiles, const float* scale_inv,
                     int64_t block_rows, int64_t block_cols, int64_t out, int64_t in,
                     const float* x, int64_t n, float* y, int64_t tile_begin, int64_t tile_end) {
  switch (type) {
    case TileType::kF8E4M3:
      return TiledLinearT<TileType::kF8E4M3>(tiles, scale_inv, block_rows, block_cols, out, in, x,
                                             n, y, tile_begin, tile_end);
    case TileType::kBF16:
      return TiledLinearT<TileType::kBF16>(tiles, scale_inv, block_rows, block_cols, out, in, x, n,
                                           y, tile_begin, tile_end);
    case TileType::kF16:
      return TiledLinearT<TileType::kF16>(tiles, scale_inv, block_rows, block_cols, out, in, x, n,
                                          y, tile_begin, tile_end);
  }
}

const char* TargetNameImpl() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace expertmesh::simd
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace expertmesh::simd {

HWY_EXPORT(DequantFp8RowImpl);
HWY_EXPORT(DequantBf16RowImpl);
HWY_EXPORT(DequantF16RowImpl);
HWY_EXPORT(DotRowsImpl);
HWY_EXPORT(TargetNameImpl);
HWY_EXPORT(TiledLinearImpl);

void TiledLinear(TileType type, const uint8_t* tiles, const float* scale_inv, int64_t block_rows,
                 int64_t block_cols, int64_t out, int64_t in, const float* x, int64_t n, float* y) {
  const int64_t n_tiles = (out + kTileRows - 1) / kTileRows;
  // Split by output tiles when each piece has at least ~256 K multiply-adds of work.
  const int64_t per_tile = std::max<int64_t>(1, in * kTileRows * std::max<int64_t>(n, 1));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / per_tile);
  cpu::ParallelFor(n_tiles, grain, [&](int64_t begin, int64_t end) {
    HWY_DYNAMIC_DISPATCH(TiledLinearImpl)
    (type, tiles, scale_inv, block_rows, block_cols, out, in, x, n, y, begin, end);
  });
}

void DequantFp8Row(const uint8_t* w, const float* block_scales, int64_t n, int64_t block_cols,
                   float* out) {
  HWY_DYNAMIC_DISPATCH(DequantFp8RowImpl)(w, block_scales, n, block_cols, out);
}
void DequantBf16Row(const uint16_t* w, int64_t n, float* out) {
  HWY_DYNAMIC_DISPATCH(DequantBf16RowImpl)(w, n, out);
}
void DequantF16Row(const uint16_t* w, int64_t n, float* out) {
  HWY_DYNAMIC_DISPATCH(DequantF16RowImpl)(w, n, out);
}
void DotRows(const float* w, const float* x, int64_t rows, int64_t k, int64_t x_stride, float* y,
             int64_t y_stride) {
  HWY_DYNAMIC_DISPATCH(DotRowsImpl)(w, x, rows, k, x_stride, y, y_stride);
}
float Dot(const float* a, const float* b, int64_t k) {
  float y;
  HWY_DYNAMIC_DISPATCH(DotRowsImpl)(b, a, 1, k, k, &y, 1);
  return y;
}
const char* TargetName() { return HWY_DYNAMIC_DISPATCH(TargetNameImpl)(); }

}  // namespace expertmesh::simd
#endif
