#include "core/kernels/cuda/bench/bench_fill.h"

namespace expertmesh::cuda::bench {
namespace {

__device__ __forceinline__ uint32_t Hash(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

__global__ void FillFp8Kernel(uint8_t* data, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    // sign | exponent 0..7 (<= 2^0 * 1.875) | mantissa: never the NaN pattern.
    const uint32_t h =
        Hash(static_cast<uint32_t>(i) * 0x9E3779B9U ^ seed ^ static_cast<uint32_t>(i >> 32));
    data[i] = static_cast<uint8_t>((h & 0x80u) | (h & 0x3Fu));
  }
}

__global__ void FillFloatKernel(float* data, size_t n, float value) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    data[i] = value;
  }
}

}  // namespace

cudaError_t FillFp8(uint8_t* data, size_t n, uint32_t seed, cudaStream_t stream) {
  FillFp8Kernel<<<4096, 256, 0, stream>>>(data, n, seed);
  return cudaGetLastError();
}

cudaError_t FillFloat(float* data, size_t n, float value, cudaStream_t stream) {
  FillFloatKernel<<<1024, 256, 0, stream>>>(data, n, value);
  return cudaGetLastError();
}

}  // namespace expertmesh::cuda::bench
