// Grouped expert GEMM on FP8 tensor cores (sm_89, sm_90, sm_120): mma.sync m16n8k32 e4m3.
#include "core/kernels/cuda/grouped_gemm.cuh"

namespace expertmesh::cuda {

cudaError_t LaunchGroupedExpertsFp8(const GroupedExpertsParams& p, int block_m,
                                    cudaStream_t stream) {
  return grouped_gemm::Launch<grouped_gemm::Mma::kFp8>(p, block_m, stream);
}

cudaError_t LaunchFp8LinearFp8(const Fp8LinearParams& p, int block_m, cudaStream_t stream) {
  return grouped_gemm::LaunchLinear<grouped_gemm::Mma::kFp8>(p, block_m, stream);
}

cudaError_t GroupedGemmStaticSmemBytesFp8(int block_m, int64_t* bytes) {
  return grouped_gemm::StaticSmem<grouped_gemm::Mma::kFp8>(block_m, bytes);
}

}  // namespace expertmesh::cuda
