// The CUDA backend's entry points. This is the one place that asks core/kernels/plan/kernel_plan.h
// which variant of each op suits the device, refuses (with a Status) what the device cannot run,
// and turns CUDA errors into Status. Services and CudaExperts call these, never the launchers.
#pragma once

#include <cuda_runtime.h>

#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/kernels/cuda/elementwise.h"
#include "core/kernels/cuda/gating.h"
#include "core/kernels/cuda/grouped_gemm.h"
#include "core/kernels/cuda/mla_decode.h"
#include "core/kernels/plan/kernel_plan.h"

namespace expertmesh::cuda {

// Number of usable CUDA devices: 0 when there is no device or no NVIDIA driver at all; an error
// naming the cause for anything else (e.g. cudaErrorInsufficientDriver from a driver older than
// the CUDA 13 runtime). The mapping is DeviceCountFromQuery (kernel_plan.h, tested on the CPU).
absl::StatusOr<int> DeviceCount();
// Compute capability, shared-memory limit, SM count and the kernels' static shared memory of
// `device` (the caller's current device is kept).
absl::StatusOr<DeviceArch> QueryDeviceArch(int device);

// Grouped expert FFN. `plan` comes from PlanGroupedGemm(arch, layout.max_rows_per_expert());
// a test may force plan.path to kF16FromFp8 on newer devices, never kFp8E4M3 on sm_86.
absl::Status GroupedExperts(const DeviceArch& arch, const GroupedGemmPlan& plan,
                            const GroupedExpertsParams& p, cudaStream_t stream);

// FP8 linear layer; the tile height follows n_rows as for the grouped GEMM. `path` overrides
// the device's MMA path (tests), within what the device supports.
absl::Status Fp8Linear(const DeviceArch& arch, const Fp8LinearParams& p, cudaStream_t stream,
                       std::optional<MmaPath> path = std::nullopt);

absl::Status ActQuant(const ActQuantParams& p, cudaStream_t stream);
absl::Status RmsNorm(const RmsNormParams& p, cudaStream_t stream);
absl::Status Rope(const RopeParams& p, cudaStream_t stream);
absl::Status GateTopk(const GateTopkParams& p, cudaStream_t stream);
absl::Status MlaDecode(const DeviceArch& arch, const MlaDecodeParams& p, cudaStream_t stream);

}  // namespace expertmesh::cuda
