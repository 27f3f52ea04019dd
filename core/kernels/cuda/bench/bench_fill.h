// Device-side filling of benchmark buffers (gigabytes of weights would take minutes from the
// host): a counter-based hash, so contents are reproducible without a generator state.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace expertmesh::cuda::bench {

// FP8 e4m3 codes with |value| <= 2 and never NaN, from hash(seed, index).
cudaError_t FillFp8(uint8_t* data, size_t n, uint32_t seed, cudaStream_t stream);
// Every element = value.
cudaError_t FillFloat(float* data, size_t n, float value, cudaStream_t stream);

}  // namespace expertmesh::cuda::bench
