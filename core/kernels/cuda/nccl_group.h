// Collectives across the GPUs of one pod through NCCL, for the attention service's tensor
// parallelism (heads split over GPUs: all-reduce after o_proj and the row-parallel FFN halves,
// all-gather of column-parallel outputs). One process drives all its GPUs: one communicator per
// device (ncclCommInitAll), each with its own non-blocking stream; every call enqueues the
// per-rank operations inside one NCCL group and returns without waiting (Synchronize() waits).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace expertmesh::cuda {

class NcclGroup {
 public:
  // Rank i runs on devices[i]; devices must be distinct and visible.
  static absl::StatusOr<std::unique_ptr<NcclGroup>> Create(const std::vector<int>& devices);
  ~NcclGroup();
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

  int size() const { return static_cast<int>(devices_.size()); }
  int device(int rank) const { return devices_[rank]; }
  cudaStream_t stream(int rank) const { return streams_[rank]; }

  // buffers[rank]: `count` floats on that rank's device, replaced by the sum over ranks.
  absl::Status AllReduceSum(std::span<float* const> buffers, size_t count);
  // send[rank]: `count` floats; recv[rank]: size() * count floats, rank r's part at r * count.
  absl::Status AllGather(std::span<const float* const> send, std::span<float* const> recv,
                         size_t count);
  // Waits for every rank's stream.
  absl::Status Synchronize();

 private:
  NcclGroup() = default;
  std::vector<int> devices_;
  std::vector<ncclComm_t> comms_;
  std::vector<cudaStream_t> streams_;
};

}  // namespace expertmesh::cuda
