// Helpers of the CUDA kernel tests: the skip when no GPU is present, plus the host-side
// reference helpers of expert_reference.h.
#pragma once

#include "core/kernels/cuda/dispatch.h"
#include "gtest/gtest.h"
#include "tests/cuda/expert_reference.h"

// Skips the current test (with the reason) when no CUDA device is present, and FAILS it when
// the devices cannot be counted (e.g. a driver older than the CUDA 13 runtime): such a machine
// has GPUs that the tests would otherwise silently not run on.
#define EM_REQUIRE_GPU()                                                         \
  do {                                                                           \
    const ::absl::StatusOr<int> em_devices = ::expertmesh::cuda::DeviceCount();  \
    if (!em_devices.ok()) {                                                      \
      FAIL() << "CUDA devices cannot be counted (an error, not a missing GPU): " \
             << em_devices.status();                                             \
    }                                                                            \
    if (*em_devices == 0) {                                                      \
      GTEST_SKIP() << "no CUDA device present: GPU kernel tests need one (run "  \
                      "tools/gpu-check.sh on a GPU machine)";                    \
    }                                                                            \
  } while (0)

namespace expertmesh::cuda::testing {

// The visible device count, after EM_REQUIRE_GPU() has established that it can be read.
inline int VisibleDevices() { return DeviceCount().value_or(0); }

}  // namespace expertmesh::cuda::testing
