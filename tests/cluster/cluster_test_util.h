// Shared by the attention-service and cluster tests: a small random DeepSeek-V3 checkpoint
// written at test time (4 layers, 3 of them MoE with 8 routed experts: enough MoE layers and
// experts for 4 shard groups; plus an MTP module, so the services draft speculatively),
// deterministic test prompts, and the in-process reference engine's greedy continuations -- what
// every distributed run must reproduce token for token.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "expertmesh/v1/attention.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace expertmesh::testing {

// Writes the test model into a fresh directory under /tmp (seeded, so always the same
// weights) and returns the directory. gate_skew > 0: the same model with a larger gate
// correction bias on the first quarter of each MoE layer's experts (WriteRandomCheckpoint's
// gate_skew): a skewed expert load that the even placement puts on shard group 0.
absl::StatusOr<std::string> MakeClusterTestModel(double gate_skew = 0.0);

// n prompts of lengths spread over [2, max_len], token ids in [2, vocab) (0 = bos, 1 = eos).
std::vector<std::vector<int32_t>> MakePrompts(int n, int max_len, int vocab, uint64_t seed);

// Greedy continuations (max_tokens each, EOS ignored) by the reference engine with every
// expert local: each prompt run alone, prefilled at once, then decoded token by token.
// partial_shards = 0: LocalExperts as they are -- what a cluster in the exact combine mode
// (the default) must reproduce token for token, for every placement, shard count and replica
// count. partial_shards = N > 0: the same experts with the numerics of the partial combine
// mode for the even placement over N shard groups (each shard's partial sum travels as BF16;
// partial sums are added in shard-id order) -- what a `--combine partial` cluster of N shard
// groups must reproduce.
absl::StatusOr<std::vector<std::vector<int32_t>>> ReferenceGreedy(
    const std::string& model_dir, const std::vector<std::vector<int32_t>>& prompts, int max_tokens,
    int partial_shards = 0);

struct SubmitResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
  v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
  uint32_t completion_tokens = 0;
};
// A greedy Submit (EOS ignored) that reads the whole stream.
v1::SubmitRequest GreedyRequest(const std::string& id, const std::vector<int32_t>& prompt,
                                int max_tokens);
SubmitResult SubmitAndCollect(v1::AttentionService::Stub& stub, const v1::SubmitRequest& request,
                              int timeout_ms = 120000);

}  // namespace expertmesh::testing
