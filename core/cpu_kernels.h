// The CPU's optimized kernels for Linear (core/model.h): weight-row dequantization and
// multi-row dot products in SIMD, through Highway with run-time dispatch to the best target
// of the machine (AVX-512, AVX2, SSE4, ...). The reference kernels in core/model.cc stay the
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
  kReference,  // plain loops (core/model.cc): 8 partial sums, no FMA
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

// dot(a, b) over k elements: DotRows for one row.
float Dot(const float* a, const float* b, int64_t k);

// The name of the target the dispatch chose on this machine (e.g. "AVX3"), for logs.
const char* TargetName();

}  // namespace simd
}  // namespace expertmesh
