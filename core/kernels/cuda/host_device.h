// EM_HOST_DEVICE: marks small inline functions that both nvcc device code and plain C++ (the
// host-side unit tests, g++-compiled dispatch code) use.
#pragma once

#if defined(__CUDACC__)
#define EM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EM_HOST_DEVICE inline
#endif
