#include "core/backend/backend.h"

#include <charconv>

#include "absl/strings/str_cat.h"
#include "core/base/status.h"
#if EXPERTMESH_HAVE_CUDA
#include "core/kernels/cuda/cuda_engine.h"
#include "core/kernels/cuda/cuda_experts.h"
#endif

namespace expertmesh {
namespace {

absl::Status NotBuilt(const DeviceSpec& device) {
  return absl::FailedPreconditionError(
      absl::StrCat("--device ", device.text,
                   ": this binary was built without CUDA (EXPERTMESH_CUDA=OFF or "
                   "no nvcc at build time); use --device cpu"));
}

}  // namespace

absl::StatusOr<DeviceSpec> ParseDeviceSpec(std::string_view spec) {
  const std::string whole(spec);
  DeviceSpec out;
  out.text = whole;
  if (spec == "cpu") return out;
  const std::string_view kPrefix = "cuda:";
  if (!spec.starts_with(kPrefix)) {
    return absl::InvalidArgumentError("device '" + whole + "': expected cpu or cuda:N[,M...]");
  }
  out.cuda = true;
  spec.remove_prefix(kPrefix.size());
  while (true) {
    const size_t comma = spec.find(',');
    std::string_view part = spec.substr(0, comma);
    if (part.starts_with(kPrefix)) part.remove_prefix(kPrefix.size());
    int d = 0;
    const auto [end, ec] = std::from_chars(part.data(), part.data() + part.size(), d);
    if (part.empty() || ec != std::errc() || end != part.data() + part.size() || d < 0) {
      return absl::InvalidArgumentError("device '" + whole + "': '" + std::string(part) +
                                        "' is not a CUDA device index");
    }
    out.devices.push_back(d);
    if (comma == std::string_view::npos) break;
    spec.remove_prefix(comma + 1);
  }
  return out;
}

absl::StatusOr<ForwardBackend> CreateForwardBackend(const Model& model, RoutedExperts* experts,
                                                    const DeviceSpec& device,
                                                    const ForwardBackendOptions& options) {
  ForwardBackend out;
  if (!device.cuda) {
    EM_ASSIGN_OR_RETURN(out.engine, Engine::Create(model, experts, options.engine));
    out.forward = std::make_unique<ReferenceForwardEngine>(out.engine.get());
    out.description = "reference engine on the CPU";
    return out;
  }
#if EXPERTMESH_HAVE_CUDA
  cuda::CudaEngineOptions co;
  co.devices = device.devices;
  co.kv_pages = options.kv_pages;
  co.page_size = options.page_size;
  co.mtp_kv_pages = options.mtp_kv_pages;
  co.engine = options.engine;
  absl::StatusOr<std::unique_ptr<cuda::CudaEngine>> gpu =
      cuda::CudaEngine::Create(model, experts, co);
  if (!gpu.ok()) {
    return absl::Status(gpu.status().code(),
                        absl::StrCat("--device ", device.text, ": ", gpu.status().message()));
  }
  out.description =
      absl::StrCat("GPU engine on ", device.text, ": tensor parallel over ", (*gpu)->tp_size(),
                   " device(s), ", (*gpu)->device_bytes() >> 20, " MiB on the devices");
  out.forward = *std::move(gpu);
  return out;
#else
  return NotBuilt(device);
#endif
}

uint64_t ExpertBytesInCheckpoint(const Checkpoint& checkpoint,
                                 std::span<const LayerExpert> experts) {
  uint64_t bytes = 0;
  for (const LayerExpert& le : experts) {
    for (const char* proj : {"gate_proj", "up_proj", "down_proj"}) {
      for (const char* suffix : {".weight", ".weight_scale_inv"}) {
        const std::string name =
            absl::StrCat("model.layers.", le.layer, ".mlp.experts.", le.expert, ".", proj, suffix);
        if (const TensorInfo* t = checkpoint.Info(name)) bytes += t->end - t->begin;
      }
    }
  }
  return bytes;
}

absl::StatusOr<ExpertsBackend> CreateExpertsBackend(const Checkpoint& checkpoint,
                                                    const ModelConfig& config,
                                                    std::span<const LayerExpert> experts,
                                                    const DeviceSpec& device,
                                                    const LocalExperts::Options& cpu_options) {
  ExpertsBackend out;
  if (!device.cuda) {
    EM_ASSIGN_OR_RETURN(std::unique_ptr<LocalExperts> local,
                        LocalExperts::Create(checkpoint, config, experts, cpu_options));
    out.bytes = local->bytes_mapped();
    out.experts = std::move(local);
    return out;
  }
#if EXPERTMESH_HAVE_CUDA
  EM_ASSIGN_OR_RETURN(out.experts, cuda::CudaExperts::Create(checkpoint, config, experts,
                                                             {.devices = device.devices}));
  out.bytes = ExpertBytesInCheckpoint(checkpoint, experts);
  out.serialize = true;
  return out;
#else
  return NotBuilt(device);
#endif
}

}  // namespace expertmesh
