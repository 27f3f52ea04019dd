#include "core/kernels/cuda/nccl_group.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_format.h"
#include "core/kernels/cuda/device_buffer.h"
#include "core/kernels/cuda/dispatch.h"

namespace expertmesh::cuda {
namespace {

absl::Status NcclStatus(ncclResult_t r, const char* what) {
  if (r == ncclSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrFormat("NCCL %s: %s", what, ncclGetErrorString(r)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<NcclGroup>> NcclGroup::Create(const std::vector<int>& devices) {
  if (devices.empty()) return absl::InvalidArgumentError("NCCL group: no devices");
  std::vector<int> sorted = devices;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    return absl::InvalidArgumentError("NCCL group: a device is listed twice");
  }
  const absl::StatusOr<int> n_visible = DeviceCount();
  if (!n_visible.ok()) return n_visible.status();
  const int visible = *n_visible;
  if (sorted.front() < 0 || sorted.back() >= visible) {
    return absl::FailedPreconditionError(
        absl::StrFormat("NCCL group: device %d requested, %d visible", sorted.back(), visible));
  }
  DeviceGuard keep;  // ncclCommInitAll and the stream set-up below change the current device
  std::unique_ptr<NcclGroup> g(new NcclGroup());
  g->devices_ = devices;
  g->comms_.resize(devices.size(), nullptr);
  absl::Status s = NcclStatus(
      ncclCommInitAll(g->comms_.data(), static_cast<int>(devices.size()), devices.data()),
      "ncclCommInitAll");
  if (!s.ok()) {
    g->comms_.clear();
    return s;
  }
  for (int d : devices) {
    cudaStream_t st = nullptr;
    s = SetDevice(d);
    if (s.ok()) s = CudaStatus(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "stream");
    if (!s.ok()) return s;
    g->streams_.push_back(st);
  }
  return g;
}

NcclGroup::~NcclGroup() {
  for (size_t i = 0; i < streams_.size(); ++i) {
    cudaSetDevice(devices_[i]);
    cudaStreamSynchronize(streams_[i]);
    cudaStreamDestroy(streams_[i]);
  }
  for (ncclComm_t c : comms_) {
    if (c != nullptr) ncclCommDestroy(c);
  }
}

absl::Status NcclGroup::AllReduceSum(std::span<float* const> buffers, size_t count) {
  if (static_cast<int>(buffers.size()) != size()) {
    return absl::InvalidArgumentError("AllReduceSum: one buffer per rank");
  }
  absl::Status s = NcclStatus(ncclGroupStart(), "ncclGroupStart");
  for (int r = 0; r < size() && s.ok(); ++r) {
    s = NcclStatus(
        ncclAllReduce(buffers[r], buffers[r], count, ncclFloat32, ncclSum, comms_[r], streams_[r]),
        "ncclAllReduce");
  }
  const absl::Status end = NcclStatus(ncclGroupEnd(), "ncclGroupEnd");
  return s.ok() ? end : s;
}

absl::Status NcclGroup::AllGather(std::span<const float* const> send, std::span<float* const> recv,
                                  size_t count) {
  if (static_cast<int>(send.size()) != size() || static_cast<int>(recv.size()) != size()) {
    return absl::InvalidArgumentError("AllGather: one send and one recv buffer per rank");
  }
  absl::Status s = NcclStatus(ncclGroupStart(), "ncclGroupStart");
  for (int r = 0; r < size() && s.ok(); ++r) {
    s = NcclStatus(ncclAllGather(send[r], recv[r], count, ncclFloat32, comms_[r], streams_[r]),
                   "ncclAllGather");
  }
  const absl::Status end = NcclStatus(ncclGroupEnd(), "ncclGroupEnd");
  return s.ok() ? end : s;
}

absl::Status NcclGroup::Synchronize() {
  DeviceGuard keep;
  for (int r = 0; r < size(); ++r) {
    absl::Status s = CudaStatus(cudaSetDevice(devices_[r]), "cudaSetDevice");
    if (s.ok()) s = CudaStatus(cudaStreamSynchronize(streams_[r]), "NCCL stream");
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace expertmesh::cuda
