// Device helpers shared by the CUDA kernels of core/kernels/cuda: asynchronous copies to shared
// memory, tensor-core MMA wrappers, warp reductions. Device code only (included by .cu files).
#pragma once

#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/kernels/cuda/fp8_f16.h"
#include "core/kernels/cuda/gemm_fragments.h"

namespace expertmesh::cuda {

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; zero-fills the destination when !valid
// (src-size 0: nothing is read, `gmem` only has to be a valid address).
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint32_t LoadSmemU32(const uint8_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// d[16x8] += a[16x16] * b[16x8], f16 inputs, f32 accumulation (sm_80+).
__device__ __forceinline__ void MmaF16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                       uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d[16x8] += a[16x32] * b[32x8], e4m3 inputs, f32 accumulation (sm_89+). Only compiled into
// kernels whose body is guarded by __CUDA_ARCH__ >= 890.
__device__ __forceinline__ void MmaFp8(float (&d)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// The same 16x8x32 product on FP16 tensor cores (sm_86): fragments from frag::F16Fragments.
__device__ __forceinline__ void MmaF16FromFp8(float (&d)[4], const uint32_t (&a)[4],
                                              const uint32_t (&b)[2]) {
  uint32_t a16[2][4], b16[2][2];
  frag::F16Fragments(a, b, a16, b16);
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    MmaF16(d, a16[s][0], a16[s][1], a16[s][2], a16[s][3], b16[s][0], b16[s][1]);
  }
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 1 / sqrt(mean(row[0..n)^2) + eps) over a CTA of 256 threads (8 warps), for every thread: the
// RMSNorm factor of RmsNorm and of the MLA cache write (kv_a_layernorm).
__device__ __forceinline__ float BlockInvRms256(const float* row, int n, float eps) {
  __shared__ float s_warp[8];
  float ss = 0.0f;
  for (int c = threadIdx.x; c < n; c += blockDim.x) ss += row[c] * row[c];
  ss = WarpSum(ss);
  if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < 8; ++w) total += s_warp[w];
  return rsqrtf(total / static_cast<float>(n) + eps);
}
__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// float -> e4m3 with round-to-nearest-even and saturation to +-448 (as FloatToFp8E4M3).
__device__ __forceinline__ uint8_t ToFp8(float x) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float Bf16Bits(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

}  // namespace expertmesh::cuda
