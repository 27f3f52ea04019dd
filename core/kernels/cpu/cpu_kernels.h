// The CPU's optimized kernels for Linear (core/model/model.h): weight-row dequantization and
// multi-row dot products in SIMD, through Highway with run-time dispatch to the best target
// of the machine (AVX-512, AVX2, SSE4, ...). The reference kernels in core/model/model.cc stay the
// oracle; tests/core/cpu_kernels_test.cc compares the two.
//
// Numerics:
//  - Dequantization is exact and bitwise equal to the reference (fp8 value * block scale,
//    one rounding; BF16/F16 widen exactly).
//  - A dot product sums 64 fixed partial sums (partial i % 64 takes element i) with fused
//    multiply-adds, then adds them in a fixed pairwise tree (p[j] + p[j + 32], then
//    + p[j + 16], + p[j + 8], ...). The order depends only on the
//    length, never on how many rows are computed together or which rows: batch invariant,
//    so every row's result is the same whatever it is batched with (the cluster and the
//    in-process engine agree bit for bit). Targets with FMA (AVX2, AVX-512, NEON) agree with
//    each other bit for bit; targets without FMA (SSE4, scalar) round the products separately.
#pragma once

#include <cstdint>

namespace expertmesh {

// Which kernels Linear::Forward runs.
enum class LinearKernel {
  kReference,  // plain loops (core/model/model.cc): 8 partial sums, no FMA
  kSimd,       // this file
};

namespace simd {

// out: [n] = e4m3(w[c]) * block_scales[c / block_cols]; w: [n] bytes (NaN codes give NaN).
void DequantFp8Row(const uint8_t* w, const float* block_scales, int64_t n, int64_t block_cols,
                   float* out);
// out: [n] = bf16 / fp16 bits w widened to float (exact).
void DequantBf16Row(const uint16_t* w, int64_t n, float* out);
void DequantF16Row(const uint16_t* w, int64_t n, float* out);

// y[t * y_stride] = dot(x + t * x_stride, w) over k elements, for t in [0, rows).
void DotRows(const float* w, const float* x, int64_t rows, int64_t k, int64_t x_stride, float* y,
             int64_t y_stride);

// ---- Tiled linear layers (Linear::Pack) ----
// W [out, in] stored as 16-row tiles: tile i holds rows [16 i, 16 i + 16), column-major
// ([in][16], the weight's own 1- or 2-byte codes; rows past `out` are zero). A step of the
// kernel widens one tile column (16 outputs' weights at one k) and multiply-adds it into
// every row of x: the weight is widened once per call whatever the number of rows, and no
// horizontal sums are needed. Order, per output: 4 FMA chains over k = c (mod 4) in increasing
// k, then (c0 + c1) + (c2 + c3); batch invariant, the same on every FMA target.
// Below 8 rows (decode) the kernel streams the tiles: FP8 codes are widened a cache line (four
// tile columns) at a time, the weight stream is prefetched 4 KiB ahead (the hardware prefetchers
// stop at pages), and a single row runs two adjacent tiles per pass (two streams in flight). From
// 8 rows on, each K block of a tile is widened once into L1 and groups of rows run over it.
inline constexpr int kTileRows = 16;
enum class TileType { kF8E4M3, kBF16, kF16 };
// y: [n, out] = x: [n, in] . W^T. FP8: scale_inv [ceil(out / block_rows), ceil(in /
// block_cols)], block_rows a multiple of 16 and block_cols of 4, no NaN code (0x7F, 0xFF) and
// every |scale| < 2^7 (Pack checks all of these; the row-wise kernels take the rest).
void TiledLinear(TileType type, const uint8_t* tiles, const float* scale_inv, int64_t block_rows,
                 int64_t block_cols, int64_t out, int64_t in, const float* x, int64_t n, float* y);

// dot(a, b) over k elements: DotRows for one row.
float Dot(const float* a, const float* b, int64_t k);

// The name of the target the dispatch chose on this machine (e.g. "AVX3"), for logs.
const char* TargetName();

}  // namespace simd
}  // namespace expertmesh
