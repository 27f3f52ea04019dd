#include "core/kernels/cuda/cuda_experts.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/base/status.h"
#include "core/kernels/cuda/device_buffer.h"
#include "core/kernels/cuda/dispatch.h"
#include "core/kernels/plan/expert_layout.h"
#include "core/model/model.h"

namespace expertmesh::cuda {

// What one device holds: its weights, its per-layer pointer tables and reusable buffers.
struct CudaExperts::DeviceState {
  int device = 0;
  DeviceArch arch;
  cudaStream_t stream = nullptr;
  DeviceBuffer<uint8_t> weights;                              // all its experts, back to back
  std::map<int, DeviceBuffer<ExpertWeightPtrs>> layer_table;  // layer -> [local experts]
  std::map<int, int32_t> layer_count;                         // layer -> local experts
  // Per-call buffers, grown on demand.
  DeviceBuffer<uint8_t> x, workspace;
  DeviceBuffer<float> x_scales, out;
  DeviceBuffer<int32_t> ints;  // slot_row | tiles | row_offsets | row_slots
  DeviceBuffer<float> slot_weight;
  PinnedBuffer<float> host_out;
  // The layout of the current call.
  ExpertLayout layout;
  std::vector<int32_t> pair_of_global;  // global pair index -> pair index in this device's routes

  ~DeviceState() {
    if (stream != nullptr) {
      cudaSetDevice(device);
      cudaStreamDestroy(stream);
    }
  }
};

CudaExperts::CudaExperts(int64_t hidden_size, int64_t moe_intermediate_size)
    : hidden_size_(hidden_size), moe_intermediate_size_(moe_intermediate_size) {}
CudaExperts::~CudaExperts() = default;

absl::StatusOr<std::unique_ptr<CudaExperts>> CudaExperts::Create(
    const Checkpoint& ckpt, const ModelConfig& config, std::span<const LayerExpert> experts,
    Options options) {
  const DeviceGuard guard;  // the caller's current device is back on return
  const BlockShape block = WeightBlockShape(config);
  if (block.rows != 128 || block.cols != 128) {
    return absl::UnimplementedError(absl::StrFormat(
        "CUDA experts need 128 x 128 weight blocks, config has %d x %d", block.rows, block.cols));
  }
  const int64_t H = config.hidden_size, I = config.moe_intermediate_size;
  absl::Status shape = ValidateGroupedGemmShape(H, I);
  if (!shape.ok()) return shape;
  if (options.devices.empty()) return absl::InvalidArgumentError("CUDA experts: no devices");
  const absl::StatusOr<int> visible = DeviceCount();
  if (!visible.ok()) return visible.status();
  const int n_visible = *visible;
  std::unique_ptr<CudaExperts> ce(new CudaExperts(H, I));
  for (int d : options.devices) {
    if (d >= n_visible) {
      return absl::FailedPreconditionError(
          absl::StrFormat("cuda:%d requested, %d CUDA device(s) visible", d, n_visible));
    }
    auto state = std::make_unique<DeviceState>();
    state->device = d;
    absl::StatusOr<DeviceArch> arch = QueryDeviceArch(d);
    if (!arch.ok()) return arch.status();
    absl::StatusOr<MmaPath> path = SelectMmaPath(*arch);
    if (!path.ok()) return path.status();
    state->arch = *arch;
    absl::Status s = CudaStatus(cudaSetDevice(d), "cudaSetDevice");
    if (s.ok())
      s = CudaStatus(cudaStreamCreateWithFlags(&state->stream, cudaStreamNonBlocking),
                     "cudaStreamCreate");
    if (!s.ok()) return s;
    ce->devices_.push_back(std::move(state));
  }

  // Placement: per layer, contiguous ascending ranges over the devices.
  std::map<int, std::vector<int32_t>> by_layer;
  for (const LayerExpert& le : experts) by_layer[le.layer].push_back(le.expert);
  const int n_dev = ce->num_devices();
  std::vector<std::vector<std::pair<LayerExpert, int32_t>>> per_device(n_dev);
  for (auto& [layer, ids] : by_layer) {
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    const int64_t n = std::ssize(ids);
    for (int64_t i = 0; i < n; ++i) {
      const int dev = static_cast<int>(i * n_dev / n);
      const int32_t local = ce->devices_[dev]->layer_count[layer]++;
      ce->placement_[{layer, ids[i]}] = {dev, local};
      per_device[dev].push_back({{layer, ids[i]}, local});
    }
  }

  const int64_t sb = NumBlocks(I, 128) * NumBlocks(H, 128);  // scale blocks per projection
  // Each weight and each scale table starts 256-byte aligned (cp.async reads 16-byte chunks).
  auto align = [](int64_t n) { return (n + 255) / 256 * 256; };
  const int64_t per_expert = 3 * (align(H * I) + align(sb * 4));
  for (int dev = 0; dev < n_dev; ++dev) {
    DeviceState& st = *ce->devices_[dev];
    EM_RETURN_IF_ERROR(SetDevice(st.device));
    absl::StatusOr<DeviceBuffer<uint8_t>> buf =
        DeviceBuffer<uint8_t>::Create(per_device[dev].size() * per_expert);
    if (!buf.ok()) return buf.status();
    st.weights = std::move(*buf);
    std::map<int, std::vector<ExpertWeightPtrs>> tables;
    for (auto& [layer, count] : st.layer_count) tables[layer].resize(count);
    int64_t offset = 0;
    for (const auto& [le, local] : per_device[dev]) {
      const std::string prefix =
          absl::StrCat("model.layers.", le.layer, ".mlp.experts.", le.expert, ".");
      ExpertWeightPtrs& ptrs = tables[le.layer][local];
      struct Proj {
        const char* name;
        int64_t out, in;
        const uint8_t** w;
        const float** s;
      };
      for (const Proj& pr : {Proj{"gate_proj", I, H, &ptrs.gate, &ptrs.gate_scale},
                             Proj{"up_proj", I, H, &ptrs.up, &ptrs.up_scale},
                             Proj{"down_proj", H, I, &ptrs.down, &ptrs.down_scale}}) {
        absl::StatusOr<Linear> lin =
            LoadLinear(ckpt, prefix + pr.name + ".weight", pr.out, pr.in, block);
        if (!lin.ok()) return lin.status();
        if (!lin->is_fp8()) {
          return absl::UnimplementedError(
              absl::StrCat(lin->name, ": CUDA experts need FP8 weights with weight_scale_inv"));
        }
        uint8_t* dst = st.weights.get() + offset;
        absl::Status s = CudaStatus(
            cudaMemcpy(dst, lin->weight.data, pr.out * pr.in, cudaMemcpyHostToDevice), "weights");
        if (s.ok()) {
          s = CudaStatus(cudaMemcpy(dst + align(pr.out * pr.in), lin->scale_inv.data, sb * 4,
                                    cudaMemcpyHostToDevice),
                         "weight scales");
        }
        if (!s.ok()) return s;
        *pr.w = dst;
        *pr.s = reinterpret_cast<const float*>(dst + align(pr.out * pr.in));
        offset += align(pr.out * pr.in) + align(sb * 4);
      }
    }
    for (auto& [layer, table] : tables) {
      absl::StatusOr<DeviceBuffer<ExpertWeightPtrs>> t =
          DeviceBuffer<ExpertWeightPtrs>::FromHost(table);
      if (!t.ok()) return t.status();
      st.layer_table[layer] = std::move(*t);
    }
    absl::Status s = CudaStatus(cudaDeviceSynchronize(), "weight upload");
    if (!s.ok()) return s;
  }
  return ce;
}

bool CudaExperts::Holds(int layer, int expert) const {
  return placement_.contains(LayerExpert{layer, expert});
}

uint64_t CudaExperts::device_bytes() const {
  uint64_t n = 0;
  for (const auto& d : devices_) n += d->weights.bytes();
  return n;
}

absl::Status CudaExperts::Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                              std::span<float> out) {
  const DeviceGuard guard;  // the caller's current device (its cuBLAS handle's) is back on return
  const int64_t H = hidden_size_, I = moe_intermediate_size_;
  const int64_t R = routes.n_rows();
  if (x.dim != H || x.n_rows != R || static_cast<int64_t>(out.size()) != R * H ||
      static_cast<int64_t>(x.fp8.size()) != R * H ||
      static_cast<int64_t>(x.scales.size()) != R * x.groups()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CUDA experts: %d routed rows, activations [%d, %d], %d output values (hidden_size %d)", R,
        x.n_rows, x.dim, out.size(), H));
  }
  // Split the routes per device, with device-local expert ids (ascending order is kept because
  // each device holds a contiguous ascending range of a layer's experts).
  const int n_dev = num_devices();
  std::vector<ExpertRoutes> sub(n_dev);
  for (auto& st : devices_) st->pair_of_global.assign(routes.experts.size(), -1);
  std::vector<int> pair_device(routes.experts.size(), -1);
  for (int64_t r = 0; r < R; ++r) {
    for (int32_t p = routes.offsets[r]; p < routes.offsets[r + 1]; ++p) {
      auto it = placement_.find(LayerExpert{layer, routes.experts[p]});
      if (it == placement_.end()) {
        // The same code as LocalExperts: a service maps it the same way whatever the backend.
        return absl::InvalidArgumentError(absl::StrFormat(
            "CUDA experts: expert %d of layer %d is not held here", routes.experts[p], layer));
      }
      ExpertRoutes& s = sub[it->second.device];
      devices_[it->second.device]->pair_of_global[p] = static_cast<int32_t>(s.experts.size());
      pair_device[p] = it->second.device;
      s.experts.push_back(it->second.local);
      s.weights.push_back(routes.weights[p]);
    }
    for (ExpertRoutes& s : sub) s.offsets.push_back(static_cast<int32_t>(s.experts.size()));
  }

  // Stage the activations once in pinned memory: every device copies from there asynchronously.
  absl::Status staged = Reserve(host_x_, x.fp8.size());
  if (staged.ok()) staged = Reserve(host_x_scales_, x.scales.size());
  if (!staged.ok()) return staged;
  std::memcpy(host_x_.data(), x.fp8.data(), x.fp8.size());
  std::memcpy(host_x_scales_.data(), x.scales.data(), x.scales.size() * sizeof(float));
  const std::span<const uint8_t> x_fp8(host_x_.data(), x.fp8.size());
  const std::span<const float> x_scales(host_x_scales_.data(), x.scales.size());

  // Launch every device that has work, then collect.
  std::vector<int> active;
  for (int d = 0; d < n_dev; ++d) {
    if (!sub[d].experts.empty()) active.push_back(d);
  }
  const bool single = active.size() <= 1;
  for (int d : active) {
    DeviceState& st = *devices_[d];
    absl::StatusOr<ExpertLayout> layout = BuildExpertLayout(sub[d], st.layer_count[layer]);
    if (!layout.ok()) return layout.status();
    st.layout = std::move(*layout);
    absl::StatusOr<GroupedGemmPlan> plan =
        PlanGroupedGemm(st.arch, st.layout.max_rows_per_expert());
    if (!plan.ok()) return plan.status();
    std::vector<int32_t> ints = st.layout.slot_row;
    const int64_t tiles_at = std::ssize(ints);
    for (const GemmTile& t : BuildTileSchedule(st.layout, plan->block_m)) {
      ints.insert(ints.end(), {t.expert, t.slot_begin, t.slot_end});
    }
    const int64_t n_tiles = (std::ssize(ints) - tiles_at) / 3;
    const int64_t offsets_at = std::ssize(ints);
    ints.insert(ints.end(), st.layout.row_offsets.begin(), st.layout.row_offsets.end());
    const int64_t slots_at = std::ssize(ints);
    ints.insert(ints.end(), st.layout.row_slots.begin(), st.layout.row_slots.end());
    const int64_t P = st.layout.n_slots();

    absl::Status s = CudaStatus(cudaSetDevice(st.device), "cudaSetDevice");
    if (s.ok()) s = Reserve(st.x, R * H);
    if (s.ok()) s = Reserve(st.x_scales, x.scales.size());
    if (s.ok()) s = Reserve(st.ints, ints.size());
    if (s.ok()) s = Reserve(st.slot_weight, P);
    if (s.ok()) s = Reserve(st.workspace, GroupedExpertsWorkspaceBytes(P, H, I));
    if (s.ok()) s = Reserve(st.out, R * H);
    if (s.ok()) s = Reserve(st.host_out, (single ? R : P) * H);
    if (s.ok()) s = st.x.CopyFromHost(x_fp8, st.stream);
    if (s.ok()) s = st.x_scales.CopyFromHost(x_scales, st.stream);
    if (s.ok()) s = st.ints.CopyFromHost(ints, st.stream);
    if (s.ok()) s = st.slot_weight.CopyFromHost(st.layout.slot_weight, st.stream);
    if (!s.ok()) return s;

    GroupedExpertsParams p;
    p.hidden_size = static_cast<int32_t>(H);
    p.moe_intermediate_size = static_cast<int32_t>(I);
    p.n_rows = static_cast<int32_t>(R);
    p.n_slots = static_cast<int32_t>(P);
    p.n_tiles = static_cast<int32_t>(n_tiles);
    p.experts = st.layer_table[layer].get();
    p.x = st.x.get();
    p.x_scales = st.x_scales.get();
    p.slot_row = st.ints.get();
    p.tiles = st.ints.get() + tiles_at;
    p.row_offsets = st.ints.get() + offsets_at;
    p.row_slots = st.ints.get() + slots_at;
    p.slot_weight = st.slot_weight.get();
    p.out = st.out.get();
    CarveGroupedExpertsWorkspace(st.workspace.get(), p);
    s = GroupedExperts(st.arch, *plan, p, st.stream);
    if (!s.ok()) return s;
    // One device: the combined rows; several: the per-slot outputs, combined below.
    const float* src = single ? p.out : p.slot_out;
    s = CudaStatus(cudaMemcpyAsync(st.host_out.data(), src, (single ? R : P) * H * sizeof(float),
                                   cudaMemcpyDeviceToHost, st.stream),
                   "result copy");
    if (!s.ok()) return s;
  }
  for (int d : active) {
    DeviceState& st = *devices_[d];
    EM_RETURN_IF_ERROR(SetDevice(st.device));
    absl::Status s = CudaStatus(cudaStreamSynchronize(st.stream), "grouped experts");
    if (!s.ok()) return s;
  }
  if (active.empty()) {
    std::fill(out.begin(), out.end(), 0.0f);
    return absl::OkStatus();
  }
  if (single) {
    std::memcpy(out.data(), devices_[active[0]]->host_out.data(), R * H * sizeof(float));
    return absl::OkStatus();
  }
  // Host combine in ascending expert order (the routes' pair order) across devices.
  for (int64_t r = 0; r < R; ++r) {
    float* o = out.data() + r * H;
    std::fill(o, o + H, 0.0f);
    for (int32_t p = routes.offsets[r]; p < routes.offsets[r + 1]; ++p) {
      const DeviceState& st = *devices_[pair_device[p]];
      const int32_t slot = st.layout.row_slots[st.pair_of_global[p]];
      const float* y = st.host_out.data() + static_cast<int64_t>(slot) * H;
      for (int64_t c = 0; c < H; ++c) o[c] += y[c];
    }
  }
  return absl::OkStatus();
}

}  // namespace expertmesh::cuda
