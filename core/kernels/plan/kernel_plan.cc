#include "core/kernels/plan/kernel_plan.h"

#include "absl/strings/str_format.h"

namespace expertmesh {

const char* MmaPathName(MmaPath path) {
  switch (path) {
    case MmaPath::kF16FromFp8:
      return "f16_from_fp8";
    case MmaPath::kFp8E4M3:
      return "fp8_e4m3";
  }
  return "?";
}

absl::StatusOr<MmaPath> SelectMmaPath(const DeviceArch& arch) {
  const int cc = arch.compute_capability();
  // NOTES: the library holds SASS for sm_86, sm_89, sm_90 and sm_120 and PTX for compute_120.
  // sm_86 SASS also runs on 8.7; sm_120 SASS and the PTX cover 12.x. Nothing covers 8.0
  // (A100), 10.x (B200) or older parts, so those are refused here rather than failing at launch.
  if (cc == 86 || cc == 87) return MmaPath::kF16FromFp8;
  if (cc == 89 || cc == 90 || arch.major == 12) return MmaPath::kFp8E4M3;
  return absl::UnimplementedError(absl::StrFormat(
      "CUDA backend: compute capability %d.%d is not supported (built for sm_86, sm_89, sm_90, "
      "sm_120)",
      arch.major, arch.minor));
}

absl::StatusOr<int> DeviceCountFromQuery(const DeviceCountQuery& q) {
  if (q.error == kCudaSuccess) return q.count;
  if (q.error == kCudaErrorNoDevice) return 0;
  if (q.error == kCudaErrorInsufficientDriver && q.driver_version == 0) return 0;  // no driver
  if (q.error == kCudaErrorInsufficientDriver) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "cudaGetDeviceCount: %s: the NVIDIA driver supports CUDA %d.%d, this build's runtime "
        "is CUDA %d.%d; install a newer driver (CUDA 13 needs r580 or newer)",
        q.error_name, q.driver_version / 1000, q.driver_version % 1000 / 10,
        q.runtime_version / 1000, q.runtime_version % 1000 / 10));
  }
  return absl::FailedPreconditionError(absl::StrFormat(
      "cudaGetDeviceCount: %s (error %d): the CUDA devices cannot be used", q.error_name, q.error));
}

int64_t GroupedGemmSmemBytes(int block_m) {
  return static_cast<int64_t>(kGemmStages) * (block_m + kGemmBlockN) * kGemmSmemPitch;
}

int64_t GroupedGemmTotalSmemBytes(const DeviceArch& arch, int block_m) {
  return GroupedGemmSmemBytes(block_m) + arch.static_smem.grouped_gemm(block_m);
}

std::string GroupedGemmPlan::name() const {
  return absl::StrFormat("%s/m%d", MmaPathName(path), block_m);
}

absl::StatusOr<GroupedGemmPlan> PlanGroupedGemm(const DeviceArch& arch,
                                                int32_t max_rows_per_expert) {
  absl::StatusOr<MmaPath> path = SelectMmaPath(arch);
  if (!path.ok()) return path.status();
  if (max_rows_per_expert < 0) {
    return absl::InvalidArgumentError("max_rows_per_expert < 0");
  }
  GroupedGemmPlan plan;
  plan.path = *path;
  plan.block_m = max_rows_per_expert <= 16 ? 16 : 64;
  plan.smem_bytes = GroupedGemmSmemBytes(plan.block_m);
  plan.static_smem_bytes = arch.static_smem.grouped_gemm(plan.block_m);
  if (plan.total_smem_bytes() > arch.max_smem_per_block) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "grouped GEMM %s needs %d + %d (static) bytes of shared memory per block, the device "
        "allows %d",
        plan.name(), plan.smem_bytes, plan.static_smem_bytes, arch.max_smem_per_block));
  }
  return plan;
}

absl::Status ValidateGroupedGemmShape(int64_t hidden_size, int64_t moe_intermediate_size) {
  if (hidden_size <= 0 || hidden_size % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "grouped GEMM: hidden_size %d must be a positive multiple of 16", hidden_size));
  }
  if (moe_intermediate_size <= 0 || moe_intermediate_size % 16 != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("grouped GEMM: moe_intermediate_size %d must be a positive multiple of 16",
                        moe_intermediate_size));
  }
  return absl::OkStatus();
}

absl::StatusOr<MlaDecodePlan> PlanMlaDecode(const DeviceArch& arch, int num_heads, int kv_lora_rank,
                                            int qk_rope_head_dim) {
  if (num_heads <= 0 || kv_lora_rank <= 0 || qk_rope_head_dim <= 0 || kv_lora_rank % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MLA decode: bad shape num_heads=%d kv_lora_rank=%d qk_rope_head_dim=%d",
                        num_heads, kv_lora_rank, qk_rope_head_dim));
  }
  const int dim = kv_lora_rank + qk_rope_head_dim;
  // Per CTA: q [heads, dim] f32, a chunk of cache [tokens, dim] bf16, scores [heads, tokens] f32.
  for (int heads : {16, 8, 4, 2, 1}) {
    if (num_heads % heads != 0) continue;
    for (int tokens : {32, 16}) {
      MlaDecodePlan plan;
      plan.heads_per_cta = heads;
      plan.tokens_per_chunk = tokens;
      plan.smem_bytes =
          int64_t{heads} * dim * 4 + int64_t{tokens} * dim * 2 + int64_t{heads} * tokens * 4;
      plan.static_smem_bytes = arch.static_smem.mla_decode;
      if (plan.total_smem_bytes() <= arch.max_smem_per_block) return plan;
    }
  }
  return absl::ResourceExhaustedError(absl::StrFormat(
      "MLA decode: kv_lora_rank %d + qk_rope_head_dim %d does not fit in %d bytes of shared "
      "memory (%d of them static)",
      kv_lora_rank, qk_rope_head_dim, arch.max_smem_per_block, arch.static_smem.mla_decode));
}

}  // namespace expertmesh
