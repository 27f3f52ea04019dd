// CudaExperts: the routed experts of this process on one or more GPUs, behind the same
// RoutedExperts interface as the CPU reference (core/model/local_experts.h), so that an expert
// shard selects it with `--device cuda:N[,M...]` (parsed by ParseDeviceSpec,
// core/kernels/plan/kernel_plan.h) and nothing else changes.
//
// Placement: for each layer, the held experts are split over the listed devices in ascending
// expert order, in contiguous balanced ranges (device 0 gets the lowest ids). A Run() groups the
// batch per device (core/kernels/plan/expert_layout.h) and runs the grouped FP8 GEMM on every
// device concurrently. Results keep the contract's summation order exactly: with one device the
// device combine sums a row's experts in ascending order; with several, each device returns its
// per-(row, expert) outputs and the host sums them in ascending expert order. Activations and
// results travel through pinned host buffers.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/kernels/cuda/device_buffer.h"
#include "core/model/experts.h"
#include "core/model/local_experts.h"

namespace expertmesh::cuda {

class CudaExperts : public RoutedExperts {
 public:
  struct Options {
    std::vector<int> devices = {0};  // CUDA device indices; a device may be listed twice
  };
  // Copies the FP8 weights of `experts` (gate/up/down_proj + weight_scale_inv) to the devices.
  // Fails for non-FP8 weights, weight blocks other than 128 x 128, or unsupported devices.
  static absl::StatusOr<std::unique_ptr<CudaExperts>> Create(const Checkpoint& ckpt,
                                                             const ModelConfig& config,
                                                             std::span<const LayerExpert> experts,
                                                             Options options);
  ~CudaExperts() override;

  // x: [n_rows, hidden_size] FP8 with 1 x 128 scales; out: [n_rows, hidden_size] overwritten.
  // Not reentrant (buffers are reused between calls): one caller at a time. RunUnquantized
  // keeps the interface's default (Unimplemented): the GPU path takes FP8 activations only.
  absl::Status Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                   std::span<float> out) override;

  bool Holds(int layer, int expert) const;
  int num_devices() const { return static_cast<int>(devices_.size()); }
  uint64_t device_bytes() const;  // weight bytes resident on all devices

  struct DeviceState;  // defined in the .cc

 private:
  CudaExperts(int64_t hidden_size, int64_t moe_intermediate_size);  // in the .cc: DeviceState

  struct Placement {
    int device = 0;     // index into devices_
    int32_t local = 0;  // expert index among this layer's experts on that device
  };
  int64_t hidden_size_;
  int64_t moe_intermediate_size_;
  std::vector<std::unique_ptr<DeviceState>> devices_;
  std::map<LayerExpert, Placement> placement_;
  PinnedBuffer<uint8_t> host_x_;       // staging of the batch's FP8 activations
  PinnedBuffer<float> host_x_scales_;  // and of their scales
};

}  // namespace expertmesh::cuda
