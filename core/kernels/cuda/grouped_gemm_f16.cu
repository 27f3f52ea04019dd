// Grouped expert GEMM for sm_86 (no FP8 tensor cores): FP8 widened to FP16 in registers,
// mma.sync m16n8k16 with FP32 accumulation. Built for every arch so that newer GPUs can test it.
#include "core/kernels/cuda/grouped_gemm.cuh"

namespace expertmesh::cuda {

cudaError_t LaunchGroupedExpertsF16(const GroupedExpertsParams& p, int block_m,
                                    cudaStream_t stream) {
  return grouped_gemm::Launch<grouped_gemm::Mma::kF16FromFp8>(p, block_m, stream);
}

cudaError_t LaunchFp8LinearF16(const Fp8LinearParams& p, int block_m, cudaStream_t stream) {
  return grouped_gemm::LaunchLinear<grouped_gemm::Mma::kF16FromFp8>(p, block_m, stream);
}

cudaError_t GroupedGemmStaticSmemBytesF16(int block_m, int64_t* bytes) {
  return grouped_gemm::StaticSmem<grouped_gemm::Mma::kF16FromFp8>(block_m, bytes);
}

}  // namespace expertmesh::cuda
