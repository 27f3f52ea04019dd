// Helpers of the CUDA kernel tests: the skip when no GPU is present, plus the host-side
// reference helpers of expert_reference.h.
#pragma once

#include "core/kernels/cuda/dispatch.h"
#include "gtest/gtest.h"
#include "tests/cuda/expert_reference.h"

// Skips the current test (with the reason) unless a CUDA device is present.
#define EM_REQUIRE_GPU()                                                        \
  do {                                                                          \
    if (::expertmesh::cuda::DeviceCount() == 0) {                               \
      GTEST_SKIP() << "no CUDA device present: GPU kernel tests need one (run " \
                      "tools/gpu-check.sh on a GPU machine)";                   \
    }                                                                           \
  } while (0)
