// Device helpers shared by the CUDA kernels of core/cuda: asynchronous copies to shared memory,
// tensor-core MMA wrappers, warp reductions. Device code only (included by .cu files).
#pragma once

#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda/fp8_f16.h"

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

// The same 16x8x32 product on FP16 tensor cores (sm_86): each fp8 word of 4 k values is widened
// into two f16x2 words and the 32-deep product runs as two 16-deep MMAs.
// NOTES: the k order inside an MMA does not matter for a dot product as long as A and B agree.
// Fragment word a[0] / b[0] hold k = {4t..4t+3} of the 32-wide chunk and a[2] / b[1] hold
// {16+4t..16+4t+3} (t = lane % 4); the first f16 MMA takes the k pairs of a[0]/a[1] and b[0]
// (low half to the f16 fragment's first k pair, high half to its second), the second MMA those
// of a[2]/a[3] and b[1]. A and B map the same physical k to the same MMA k, so the sum is the
// same set of products. The partial sum carries a factor 2^-16 (see fp8_f16.h).
__device__ __forceinline__ void MmaF16FromFp8(float (&d)[4], const uint32_t (&a)[4],
                                              const uint32_t (&b)[2]) {
  uint32_t a0l, a0h, a1l, a1h, a2l, a2h, a3l, a3h, b0l, b0h, b1l, b1h;
  Fp8x4ToF16x4Scaled(a[0], &a0l, &a0h);
  Fp8x4ToF16x4Scaled(a[1], &a1l, &a1h);
  Fp8x4ToF16x4Scaled(a[2], &a2l, &a2h);
  Fp8x4ToF16x4Scaled(a[3], &a3l, &a3h);
  Fp8x4ToF16x4Scaled(b[0], &b0l, &b0h);
  Fp8x4ToF16x4Scaled(b[1], &b1l, &b1h);
  MmaF16(d, a0l, a1l, a0h, a1h, b0l, b0h);
  MmaF16(d, a2l, a3l, a2h, a3h, b1l, b1h);
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
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
