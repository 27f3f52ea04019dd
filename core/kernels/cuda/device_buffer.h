// Owning handles for device memory and pinned (page-locked) host memory, with Status errors.
// Pinned buffers are what the expert service's gRPC path copies activations through, so that
// host <-> device copies run at full PCIe speed and asynchronously on a stream.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <span>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"

namespace expertmesh::cuda {

// Status of a CUDA runtime call; `what` names the operation.
inline absl::Status CudaStatus(cudaError_t err, std::string_view what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrFormat("CUDA %s: %s (%s)", what, cudaGetErrorString(err), cudaGetErrorName(err)));
}

// cudaSetDevice, checked.
inline absl::Status SetDevice(int device) {
  return CudaStatus(cudaSetDevice(device), absl::StrFormat("cudaSetDevice(%d)", device));
}

// Keeps the calling thread's current device across multi-GPU work: saved at construction,
// restored at destruction (so a caller's cuBLAS handle or stream stays on its device).
class DeviceGuard {
 public:
  DeviceGuard() { saved_ok_ = cudaGetDevice(&saved_) == cudaSuccess; }
  ~DeviceGuard() {
    if (saved_ok_) cudaSetDevice(saved_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int saved_ = 0;
  bool saved_ok_ = false;
};

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  static absl::StatusOr<DeviceBuffer> Create(size_t count) {
    DeviceBuffer b;
    if (count > 0) {
      absl::Status s = CudaStatus(cudaMalloc(&b.ptr_, count * sizeof(T)),
                                  absl::StrFormat("cudaMalloc(%d bytes)", count * sizeof(T)));
      if (!s.ok()) return s;
    }
    b.count_ = count;
    return b;
  }
  static absl::StatusOr<DeviceBuffer> FromHost(std::span<const T> host) {
    absl::StatusOr<DeviceBuffer> b = Create(host.size());
    if (!b.ok()) return b.status();
    absl::Status s = b->CopyFromHost(host);
    if (!s.ok()) return s;
    return b;
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(count_, o.count_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }

  T* get() const { return ptr_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }

  absl::Status CopyFromHost(std::span<const T> host, cudaStream_t stream = nullptr) {
    if (host.size() > count_) return absl::InvalidArgumentError("CopyFromHost: source too large");
    return CudaStatus(
        cudaMemcpyAsync(ptr_, host.data(), host.size_bytes(), cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync(H2D)");
  }
  absl::Status CopyToHost(std::span<T> host, cudaStream_t stream = nullptr) const {
    if (host.size() > count_) return absl::InvalidArgumentError("CopyToHost: target too large");
    absl::Status s = CudaStatus(
        cudaMemcpyAsync(host.data(), ptr_, host.size_bytes(), cudaMemcpyDeviceToHost, stream),
        "cudaMemcpyAsync(D2H)");
    if (!s.ok()) return s;
    return CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

template <typename T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  static absl::StatusOr<PinnedBuffer> Create(size_t count) {
    PinnedBuffer b;
    if (count > 0) {
      // Portable: pinned for every device's context, so all GPUs of a process DMA from it.
      absl::Status s = CudaStatus(cudaHostAlloc(reinterpret_cast<void**>(&b.ptr_),
                                                count * sizeof(T), cudaHostAllocPortable),
                                  "cudaHostAlloc");
      if (!s.ok()) return s;
    }
    b.count_ = count;
    return b;
  }
  PinnedBuffer(PinnedBuffer&& o) noexcept { *this = std::move(o); }
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(count_, o.count_);
    return *this;
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
  }
  T* data() const { return ptr_; }
  size_t size() const { return count_; }
  std::span<T> span() const { return {ptr_, count_}; }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// Grows a DeviceBuffer or PinnedBuffer to hold at least n elements (to 2x its size at least,
// so repeated growth stays amortized); the contents are not kept.
template <typename Buffer>
absl::Status Reserve(Buffer& b, size_t n) {
  if (b.size() >= n) return absl::OkStatus();
  absl::StatusOr<Buffer> nb = Buffer::Create(std::max<size_t>(n, 2 * b.size()));
  if (!nb.ok()) return nb.status();
  b = std::move(*nb);
  return absl::OkStatus();
}

}  // namespace expertmesh::cuda
