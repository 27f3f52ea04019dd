// Shared by the expert-shard, router and dispatcher tests: a small random DeepSeek-V3
// checkpoint (hidden_size 320, so the 128-channel groups have a ragged edge; 3 MoE layers
// counting the MTP layer; 8 routed experts, 4 per token), random quantized batches and gate
// routes, and the expected output of a sharded run computed with LocalExperts alone.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/model/experts.h"
#include "core/model/local_experts.h"
#include "core/numerics/quant.h"
#include "dispatcher/dispatcher.h"
#include "placement/placement.h"

namespace expertmesh::testing {

// The model directory (written once per process under /tmp, seeded: always the same).
absl::StatusOr<std::string> ShardTestModel();

struct Batch {
  QuantizedActivations x;  // [n_rows, hidden_size]
  ExpertRoutes routes;     // num_experts_per_tok pairs per row, experts ascending
};
// Random hidden states (normal, std 1) quantized per 128 channels, random routes with
// weights that sum to routed_scaling_factor per row (as the gate's are).
Batch RandomBatch(const ModelConfig& config, int64_t n_rows, uint64_t seed);

// What a dispatcher must return. `all` holds every expert.
//   exact combine (the default): all.Run itself, whatever the placement;
//   partial: sum over shards s in ascending order of bf16(experts restricted to shard s (x)),
//     in float.
absl::StatusOr<std::vector<float>> ExpectedShardedOutput(LocalExperts& all,
                                                         const Placement& placement, int layer,
                                                         const Batch& batch, int64_t hidden_size,
                                                         CombineMode combine = CombineMode::kExact);

}  // namespace expertmesh::testing
