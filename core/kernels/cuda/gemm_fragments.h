// Where each thread of the grouped GEMM (grouped_gemm.cuh) finds its tensor-core fragments in
// shared memory and where its accumulators land in the output tile. Host and device code: the
// CPU unit test (tests/cuda/gemm_fragments_test.cc) runs these functions through an emulation of
// the PTX mma.sync fragment layouts and checks that the tile product comes out right.
//
// Shared tiles hold K-contiguous rows of kPitch bytes: A [block_m][kPitch], B [256][kPitch].
// lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, ks = 32-deep k step inside the 128 stage.
#pragma once

#include <cstdint>

#include "core/kernels/cuda/fp8_f16.h"
#include "core/kernels/cuda/host_device.h"

namespace expertmesh::cuda::frag {

inline constexpr int kPitch = 144;  // 128 bytes + 16 of padding: conflict-free 32-bit loads

// A fragment word `reg` (0..3) of m16 tile `m`: rows g / g + 8 (reg & 1), k bytes
// 4t..4t+3 (+16 for reg >= 2) of the 32-byte step.
EM_HOST_DEVICE int AOffset(int m, int ks, int lane, int reg) {
  return (m * 16 + (lane >> 2) + 8 * (reg & 1)) * kPitch + ks * 32 + 16 * (reg >> 1) +
         4 * (lane & 3);
}

// B fragment word `reg` (0..1) of the n8 tile whose first shared row is `b_row`.
EM_HOST_DEVICE int BOffset(int b_row, int ks, int lane, int reg) {
  return (b_row + (lane >> 2)) * kPitch + ks * 32 + 16 * reg + 4 * (lane & 3);
}

// First shared B row of n8 tile j (0..3) of warp w. Gate/up: tiles 0, 1 are gate rows
// 16w..16w+15 and tiles 2, 3 the same rows of up (shared rows 128 + ...), so one thread holds
// gate and up of the same output column. Down: rows 32w..32w+31.
EM_HOST_DEVICE int BRow(bool gate_up, int warp, int j) {
  return gate_up ? (j >> 1) * 128 + 16 * warp + 8 * (j & 1) : 32 * warp + 8 * j;
}

// Accumulator element c (0..3) of m16 tile m and of the n8 tile starting at b_row:
// tile row and shared B row (= output column inside the CTA's 256 / 128 columns).
EM_HOST_DEVICE int AccRow(int m, int lane, int c) { return m * 16 + (lane >> 2) + 8 * (c >> 1); }
EM_HOST_DEVICE int AccBRow(int b_row, int lane, int c) { return b_row + 2 * (lane & 3) + (c & 1); }

// The sm_86 path: a 16x8x32 FP8 fragment pair as two 16x8x16 FP16 fragment pairs.
// NOTES: the k order inside an MMA does not matter for a dot product as long as A and B agree.
// FP8 word a[0] / b[0] hold physical k = {4t..4t+3} of the 32-wide step and a[2] / b[1] hold
// {16+4t..16+4t+3}; the first FP16 MMA takes the k pairs of a[0], a[1] and b[0] (low half to
// the FP16 fragment's first k pair, high half to its second), the second MMA those of a[2],
// a[3] and b[1]. A and B send the same physical k to the same MMA k, so the sum has the same
// products. Values carry a factor 2^-8 each (fp8_f16.h).
EM_HOST_DEVICE void F16Fragments(const uint32_t (&a)[4], const uint32_t (&b)[2],
                                 uint32_t (&a16)[2][4], uint32_t (&b16)[2][2]) {
  uint32_t lo[4], hi[4], blo[2], bhi[2];
  for (int r = 0; r < 4; ++r) Fp8x4ToF16x4Scaled(a[r], &lo[r], &hi[r]);
  for (int r = 0; r < 2; ++r) Fp8x4ToF16x4Scaled(b[r], &blo[r], &bhi[r]);
  for (int s = 0; s < 2; ++s) {
    a16[s][0] = lo[2 * s];      // row g,     k pair 0
    a16[s][1] = lo[2 * s + 1];  // row g + 8, k pair 0
    a16[s][2] = hi[2 * s];      // row g,     k pair 1
    a16[s][3] = hi[2 * s + 1];  // row g + 8, k pair 1
    b16[s][0] = blo[s];
    b16[s][1] = bhi[s];
  }
}

}  // namespace expertmesh::cuda::frag
