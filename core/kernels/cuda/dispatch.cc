#include "core/kernels/cuda/dispatch.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "core/kernels/cuda/device_buffer.h"

namespace expertmesh::cuda {

static_assert(kCudaSuccess == cudaSuccess);
static_assert(kCudaErrorInsufficientDriver == cudaErrorInsufficientDriver);
static_assert(kCudaErrorNoDevice == cudaErrorNoDevice);

absl::StatusOr<int> DeviceCount() {
  DeviceCountQuery q;
  const cudaError_t err = cudaGetDeviceCount(&q.count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the error so that later calls do not report it
    q.error = static_cast<int>(err);
    q.error_name = cudaGetErrorName(err);
    if (cudaDriverGetVersion(&q.driver_version) != cudaSuccess) q.driver_version = 0;
    if (cudaRuntimeGetVersion(&q.runtime_version) != cudaSuccess) q.runtime_version = 0;
  }
  return DeviceCountFromQuery(q);
}

namespace {

// The kernels' static shared memory on `device` (cudaFuncGetAttributes answers for the current
// device). Only asked where the library holds code for the device (SelectMmaPath succeeds).
absl::Status QueryStaticSmem(int device, KernelStaticSmem& out) {
  DeviceGuard keep;
  absl::Status s = SetDevice(device);
  for (int block_m : {16, 64}) {
    int64_t fp8 = 0, f16 = 0;
    if (s.ok())
      s = CudaStatus(GroupedGemmStaticSmemBytesFp8(block_m, &fp8), "grouped GEMM attributes");
    if (s.ok())
      s = CudaStatus(GroupedGemmStaticSmemBytesF16(block_m, &f16), "grouped GEMM attributes");
    (block_m == 16 ? out.grouped_gemm_m16 : out.grouped_gemm_m64) = std::max(fp8, f16);
  }
  if (s.ok()) s = CudaStatus(MlaDecodeStaticSmemBytes(&out.mla_decode), "MLA decode attributes");
  return s;
}

}  // namespace

absl::StatusOr<DeviceArch> QueryDeviceArch(int device) {
  DeviceArch arch;
  int smem = 0;
  absl::Status s =
      CudaStatus(cudaDeviceGetAttribute(&arch.major, cudaDevAttrComputeCapabilityMajor, device),
                 "compute capability");
  if (s.ok()) {
    s = CudaStatus(cudaDeviceGetAttribute(&arch.minor, cudaDevAttrComputeCapabilityMinor, device),
                   "compute capability");
  }
  if (s.ok()) {
    s = CudaStatus(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                   "shared memory per block");
  }
  if (s.ok()) {
    s = CudaStatus(cudaDeviceGetAttribute(&arch.sm_count, cudaDevAttrMultiProcessorCount, device),
                   "multiprocessor count");
  }
  if (!s.ok()) return s;
  arch.max_smem_per_block = smem;
  if (SelectMmaPath(arch).ok()) {
    s = QueryStaticSmem(device, arch.static_smem);
    if (!s.ok()) return s;
  }
  return arch;
}

absl::Status GroupedExperts(const DeviceArch& arch, const GroupedGemmPlan& plan,
                            const GroupedExpertsParams& p, cudaStream_t stream) {
  absl::StatusOr<MmaPath> native = SelectMmaPath(arch);
  if (!native.ok()) return native.status();
  if (plan.path == MmaPath::kFp8E4M3 && *native != MmaPath::kFp8E4M3) {
    return absl::FailedPreconditionError(
        absl::StrFormat("grouped GEMM %s needs FP8 tensor cores (sm_89+); device is sm_%d%d",
                        plan.name(), arch.major, arch.minor));
  }
  if (GroupedGemmTotalSmemBytes(arch, plan.block_m) > arch.max_smem_per_block) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("grouped GEMM %s: %d bytes of shared memory (%d static), device allows %d",
                        plan.name(), GroupedGemmTotalSmemBytes(arch, plan.block_m),
                        arch.static_smem.grouped_gemm(plan.block_m), arch.max_smem_per_block));
  }
  absl::Status shape = ValidateGroupedGemmShape(p.hidden_size, p.moe_intermediate_size);
  if (!shape.ok()) return shape;
  const cudaError_t err = plan.path == MmaPath::kFp8E4M3
                              ? LaunchGroupedExpertsFp8(p, plan.block_m, stream)
                              : LaunchGroupedExpertsF16(p, plan.block_m, stream);
  return CudaStatus(err, absl::StrFormat("grouped GEMM %s launch", plan.name()));
}

absl::Status Fp8Linear(const DeviceArch& arch, const Fp8LinearParams& p, cudaStream_t stream,
                       std::optional<MmaPath> path) {
  if (p.n_rows < 0 || p.in_features <= 0 || p.in_features % 128 != 0 || p.out_features <= 0 ||
      p.out_features % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "FP8 linear: in_features %d must be a positive multiple of 128 and out_features %d of 16",
        p.in_features, p.out_features));
  }
  absl::StatusOr<GroupedGemmPlan> plan = PlanGroupedGemm(arch, p.n_rows);
  if (!plan.ok()) return plan.status();
  if (path) {
    if (*path == MmaPath::kFp8E4M3 && plan->path != MmaPath::kFp8E4M3) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "FP8 linear: FP8 tensor cores need sm_89+; device is sm_%d%d", arch.major, arch.minor));
    }
    plan->path = *path;
  }
  const cudaError_t err = plan->path == MmaPath::kFp8E4M3
                              ? LaunchFp8LinearFp8(p, plan->block_m, stream)
                              : LaunchFp8LinearF16(p, plan->block_m, stream);
  return CudaStatus(err, absl::StrFormat("FP8 linear %s launch", plan->name()));
}

absl::Status ActQuant(const ActQuantParams& p, cudaStream_t stream) {
  if (p.n_rows < 0 || p.dim <= 0) return absl::InvalidArgumentError("ActQuant: bad shape");
  return CudaStatus(LaunchActQuant(p, stream), "act quant launch");
}

absl::Status RmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.n_rows < 0 || p.dim <= 0) return absl::InvalidArgumentError("RmsNorm: bad shape");
  return CudaStatus(LaunchRmsNorm(p, stream), "RMSNorm launch");
}

absl::Status Rope(const RopeParams& p, cudaStream_t stream) {
  if (p.rope_dim <= 0 || p.rope_dim % 2 != 0 || p.n_heads <= 0) {
    return absl::InvalidArgumentError("RoPE: rope_dim must be positive and even");
  }
  return CudaStatus(LaunchRope(p, stream), "RoPE launch");
}

absl::Status GateTopk(const GateTopkParams& p, cudaStream_t stream) {
  if (p.n_routed_experts <= 0 || p.n_routed_experts > kGateMaxExperts || p.n_group <= 0 ||
      p.n_routed_experts % p.n_group != 0 || p.topk_group <= 0 || p.topk_group > p.n_group ||
      p.num_experts_per_tok <= 0 ||
      p.num_experts_per_tok > p.n_routed_experts / p.n_group * p.topk_group) {
    return absl::InvalidArgumentError(
        absl::StrFormat("gate top-k: unsupported n_routed_experts=%d n_group=%d topk_group=%d k=%d",
                        p.n_routed_experts, p.n_group, p.topk_group, p.num_experts_per_tok));
  }
  return CudaStatus(LaunchGateTopk(p, stream), "gate top-k launch");
}

absl::Status MlaDecode(const DeviceArch& arch, const MlaDecodeParams& p, cudaStream_t stream) {
  if (p.kv_lora_rank > kMlaMaxLoraRank || p.qk_rope_head_dim % 2 != 0 || p.page_size <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MLA decode: kv_lora_rank %d (max %d), qk_rope_head_dim %d (even), page_size %d",
        p.kv_lora_rank, kMlaMaxLoraRank, p.qk_rope_head_dim, p.page_size));
  }
  absl::StatusOr<MlaDecodePlan> plan =
      PlanMlaDecode(arch, p.num_heads, p.kv_lora_rank, p.qk_rope_head_dim);
  if (!plan.ok()) return plan.status();
  return CudaStatus(LaunchMlaDecode(p, plan->heads_per_cta, plan->tokens_per_chunk,
                                    static_cast<int>(plan->smem_bytes), stream),
                    "MLA decode launch");
}

}  // namespace expertmesh::cuda
