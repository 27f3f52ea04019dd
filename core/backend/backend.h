// The one place that chooses between the CPU and the CUDA implementations (and the only code
// outside core/kernels/cuda/ that holds `#if EXPERTMESH_HAVE_CUDA`): a service's --device flag
// parsed once, then a factory for each side of the cluster.
//   attention side: a ForwardEngine (the reference Engine on "cpu", the GPU engine, tensor
//                   parallel over the listed GPUs, on "cuda:N[,M...]");
//   expert side:    RoutedExperts for a shard's (layer, expert) list (LocalExperts or
//                   CudaExperts).
// A CUDA device asked of a binary built without CUDA is FAILED_PRECONDITION, said at start-up.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine/engine.h"
#include "core/engine/forward_engine.h"
#include "core/format/safetensors.h"
#include "core/model/local_experts.h"

namespace expertmesh {

// A service's --device flag: "cpu", or "cuda:N[,M...]" (also "cuda:0,cuda:1"): the GPUs that
// share the work. A device may be listed twice (tests use that to exercise multi-GPU paths).
struct DeviceSpec {
  bool cuda = false;
  std::vector<int> devices;  // CUDA device indices when cuda
  std::string text;          // as given, for messages
};
absl::StatusOr<DeviceSpec> ParseDeviceSpec(std::string_view spec);

// ---- Attention side --------------------------------------------------------------------------

struct ForwardBackendOptions {
  EngineOptions engine;
  // The GPU engine's paged device caches (the CPU engine's caches belong to the caller).
  int64_t kv_pages = 0;
  int64_t page_size = 16;
  int64_t mtp_kv_pages = 0;  // 0: no MTP cache
};

// What steps run. `engine` is set on the CPU (the reference engine the ForwardEngine wraps);
// `forward` always. Both borrow `model` and `experts`, which must outlive them.
struct ForwardBackend {
  std::unique_ptr<Engine> engine;
  std::unique_ptr<ForwardEngine> forward;
  std::string description;  // for the start-up log
};
absl::StatusOr<ForwardBackend> CreateForwardBackend(const Model& model, RoutedExperts* experts,
                                                    const DeviceSpec& device,
                                                    const ForwardBackendOptions& options);

// ---- Expert side -----------------------------------------------------------------------------

// Bytes of the (layer, expert) tensors (weights and scales) in the checkpoint.
uint64_t ExpertBytesInCheckpoint(const Checkpoint& checkpoint,
                                 std::span<const LayerExpert> experts);

struct ExpertsBackend {
  std::unique_ptr<RoutedExperts> experts;
  uint64_t bytes = 0;      // bytes of expert tensors held
  bool serialize = false;  // calls must not overlap (the GPU backend is not reentrant)
};
absl::StatusOr<ExpertsBackend> CreateExpertsBackend(const Checkpoint& checkpoint,
                                                    const ModelConfig& config,
                                                    std::span<const LayerExpert> experts,
                                                    const DeviceSpec& device,
                                                    const LocalExperts::Options& cpu_options);

}  // namespace expertmesh
