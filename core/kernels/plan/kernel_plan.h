// Host-side choice of CUDA kernel variants and launch shapes, one place per op.
//
// The CUDA backend (core/kernels/cuda/) asks this file which variant of an op to run on a device of
// a given compute capability and how to launch it; the answer is plain data, so the rules are
// unit-tested on every machine, with or without a GPU or nvcc. Unsupported devices get a
// Status naming the device and the op, never a silent fallback.
//
// Grouped expert GEMM variants (see core/kernels/cuda/grouped_gemm.cuh for the design note):
//   sm_86, sm_87          FP8 weights and activations widened to FP16 in registers, mma.sync
//                         m16n8k16 f16 -> f32 (Ampere has no FP8 tensor cores).
//   sm_89, sm_90, sm_12x  mma.sync m16n8k32 e4m3 -> f32 (FP8 tensor cores).
//   anything else         kUnimplemented: the library carries SASS for sm_86/89/90/120 and PTX
//                         for compute_120 only.
// Both paths apply the 128x128 weight scales and 1x128 activation scales per 128-deep K block
// in FP32 outside the MMA (DeepSeek's "promotion"), so they compute the same numbers.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh {

// What cudaGetDeviceCount answered, with the versions that tell "no driver" from "driver too
// old" (both report cudaErrorInsufficientDriver). Plain ints: this file builds without CUDA.
struct DeviceCountQuery {
  int error = 0;                // cudaError_t of cudaGetDeviceCount
  std::string_view error_name;  // cudaGetErrorName(error)
  int count = 0;                // the device count it returned (meaningful on success)
  int driver_version = 0;       // cudaDriverGetVersion: 0 when no NVIDIA driver is installed
  int runtime_version = 0;      // cudaRuntimeGetVersion, e.g. 13000
};
// The stable cudaError_t values the mapping tells apart (dispatch.cc static_asserts them
// against cuda_runtime.h).
inline constexpr int kCudaSuccess = 0;
inline constexpr int kCudaErrorInsufficientDriver = 35;
inline constexpr int kCudaErrorNoDevice = 100;

// The number of usable devices, or why the devices cannot be counted. 0 only where the hardware
// (or any NVIDIA driver) is absent: cudaErrorNoDevice, or cudaErrorInsufficientDriver with no
// driver installed. Every other error -- a driver older than the runtime, a driver that fails
// to initialize, ... -- is a FailedPrecondition naming the error, so that a machine whose GPUs
// cannot be used never looks like a machine without GPUs (and GPU tests fail instead of skip).
absl::StatusOr<int> DeviceCountFromQuery(const DeviceCountQuery& query);

// Static shared memory (__shared__ arrays) of the kernels, as cudaFuncGetAttributes reports it
// for the device at run time (QueryDeviceArch fills it in). It counts against the same
// per-block opt-in limit as the dynamic bytes that the plans choose.
struct KernelStaticSmem {
  int64_t grouped_gemm_m16 = 0;  // larger of the gate/up and down kernels, both MMA paths
  int64_t grouped_gemm_m64 = 0;
  int64_t mla_decode = 0;
  int64_t grouped_gemm(int block_m) const {
    return block_m <= 16 ? grouped_gemm_m16 : grouped_gemm_m64;
  }
};

struct DeviceArch {
  int major = 0;
  int minor = 0;
  int64_t max_smem_per_block = 48 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int sm_count = 1;
  KernelStaticSmem static_smem;
  int compute_capability() const { return major * 10 + minor; }
};

enum class MmaPath {
  kF16FromFp8,  // sm_86 class
  kFp8E4M3,     // sm_89 and newer
};
const char* MmaPathName(MmaPath path);

// The tensor-core path of a device, or kUnimplemented.
absl::StatusOr<MmaPath> SelectMmaPath(const DeviceArch& arch);

// Fixed tile geometry of the grouped GEMM kernels (compile-time constants in the kernels too).
inline constexpr int kGemmBlockN = 256;   // B rows per CTA: 128 gate + 128 up, or 256 down rows
inline constexpr int kGemmBlockK = 128;   // one scale block of K per pipeline stage
inline constexpr int kGemmThreads = 256;  // 8 warps
inline constexpr int kGemmStages = 2;
inline constexpr int kGemmSmemPitch = kGemmBlockK + 16;  // bytes per smem row: no bank conflicts

// Dynamic shared memory of one CTA: stages x (block_m + block_n) rows x pitch.
int64_t GroupedGemmSmemBytes(int block_m);
// Dynamic plus the kernels' static shared memory on `arch`: what must fit max_smem_per_block.
int64_t GroupedGemmTotalSmemBytes(const DeviceArch& arch, int block_m);

struct GroupedGemmPlan {
  MmaPath path = MmaPath::kFp8E4M3;
  int block_m = 16;               // 16 (decode: few rows per expert) or 64 (prefill)
  int64_t smem_bytes = 0;         // dynamic (the launch's argument)
  int64_t static_smem_bytes = 0;  // the kernels' own __shared__ arrays
  int64_t total_smem_bytes() const { return smem_bytes + static_smem_bytes; }
  std::string name() const;  // e.g. "fp8_e4m3/m64"
};

// Rows per expert decide the regime: with <= 16 rows for every expert the GEMM is bound by
// reading the weights, and a 16-row tile wastes no loads; beyond that a 64-row tile reuses each
// weight tile four times more from shared memory.
absl::StatusOr<GroupedGemmPlan> PlanGroupedGemm(const DeviceArch& arch,
                                                int32_t max_rows_per_expert);

// hidden_size and moe_intermediate_size must be multiples of 16 (16-byte cp.async rows).
absl::Status ValidateGroupedGemmShape(int64_t hidden_size, int64_t moe_intermediate_size);

// Launch shape of the MLA decode kernel: heads per CTA so that one CTA reads each cache token
// once for several heads; must divide num_heads.
struct MlaDecodePlan {
  int heads_per_cta = 1;
  int tokens_per_chunk = 32;
  int64_t smem_bytes = 0;         // dynamic (the launch's argument)
  int64_t static_smem_bytes = 0;  // the kernel's own __shared__ arrays
  int64_t total_smem_bytes() const { return smem_bytes + static_smem_bytes; }
};
absl::StatusOr<MlaDecodePlan> PlanMlaDecode(const DeviceArch& arch, int num_heads, int kv_lora_rank,
                                            int qk_rope_head_dim);

}  // namespace expertmesh
