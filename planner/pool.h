// A pool description for `expertmesh plan`: which cards (by kind) sit in which node, each
// node's link to the attention node (Gbit/s, one-way latency), the attention node(s), the
// batch sizes to predict, and the built-in table of known card kinds (memory, memory
// bandwidth, whether the card runs FP8 natively). Parsed from JSON; every bad field is an
// error naming it.
//
// Pool JSON (every size in GiB, bandwidth in GB/s = 1e9 bytes/s, links in Gbit/s):
//   {
//     "kinds": {"my-cpu": {"memory_gib": 64, "bandwidth_gbs": 20, "gflops": 200}},   optional
//     "nodes": [
//       {"name": "box-a", "link_gbps": 10, "latency_us": 50,
//        "cards": [{"kind": "rtx3090", "count": 4}]},
//       ...
//     ],
//     "attention": {"kind": "rtx5090", "count": 1, "link_gbps": 25, "latency_us": 10},
//     "batch": [1, 32],          optional (default [1, 32])
//     "context": 1024,           optional: tokens of KV cache per sequence (default 1024)
//     "dispatch_overhead_us": 170, "dispatch_overhead_per_row_us": 17,   optional (README)
//     "step_overhead_us": 260, "step_overhead_per_row_us": 420            optional (README)
//     "micro_batches": 2, "micro_batch_min_rows": 4     optional: a CPU attention node's split
//   }
// A card entry or a "kinds" entry may override any table figure: memory_gib, bandwidth_gbs,
// fp8 (bool), gflops, efficiency, overhead_gib, rows_per_pass. The kind "cpu" has no table
// figures: memory_gib and bandwidth_gbs must be given.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh::planner {

struct CardKind {
  std::string name;          // "rtx3090", "cpu", ...
  bool gpu = true;           // false: a CPU shard process (memory = its share of host RAM)
  double memory_gib = 0;     // memory the card has
  double bandwidth_gbs = 0;  // peak memory read bandwidth, GB/s (1e9 bytes / s)
  bool fp8 = false;          // FP8 tensor cores: FP8 weights multiply without widening
  // GFLOP/s each row beyond the first of a pass adds (t(M) = passes x t(1) + (M - passes) x
  // FLOPs / gflops, passes = ceil(M / rows_per_pass), or 1); 0 = rows are free.
  double gflops = 0;
  double efficiency = 0;    // fraction of bandwidth_gbs the expert kernel streams at M = 1
  double overhead_gib = 0;  // fixed per-card memory: CUDA context, workspace, buffers
  // Rows the kernel takes per pass over a matrix's weights: each pass costs what M = 1 costs
  // (its first row rides on the weight stream), each further row of a pass adds its FLOPs at
  // `gflops`. The CPU FP8 kernel widens a tile once per 6 rows held in registers on AVX-512
  // (core/kernels/cpu): 6. 0 = one pass for any row count (the GPU grouped GEMM).
  int rows_per_pass = 0;
};

// The built-in kinds (rtx3090, rtx3090ti, rtx4090, rtx5090, cpu), with their sources in
// pool.cc. Returns NOT_FOUND naming the known kinds for anything else.
absl::StatusOr<CardKind> KnownKind(std::string_view name);
std::vector<std::string> KnownKindNames();

struct Card {
  CardKind kind;
  int node = 0;  // index into Pool::nodes
};

struct Node {
  std::string name;
  double link_gbps = 0;   // the node's link to the attention node, Gbit/s
  double latency_us = 0;  // one way
};

struct AttentionNodes {
  CardKind kind;
  int count = 1;  // replicas: each decodes batch / count of the sequences
  double link_gbps = 0;
  double latency_us = 0;
};

struct Pool {
  std::vector<Node> nodes;
  std::vector<Card> cards;  // the expert cards, node by node: card i = shard group i
  AttentionNodes attention;
  std::vector<int> batches{1, 32};
  int64_t context = 1024;
  // Per MoE layer and step, on top of the link and compute terms: the dispatcher, gRPC and
  // the expert service's request handling (calibrated on loopback: planner/README.md).
  double dispatch_overhead_us = 170;
  double dispatch_overhead_per_row_us = 17;
  // Per decode step: the attention service's scheduler, sampling and token streaming, and the
  // process hand-offs of a step (calibrated on loopback: planner/README.md).
  double step_overhead_us = 260;
  double step_overhead_per_row_us = 420;
  // A CPU attention node splits each step into up to this many micro-batches of at least
  // micro_batch_min_rows rows (attention-service --micro-batches, --micro-batch-min-rows, the
  // same defaults; a GPU attention node runs steps unsplit): each micro-batch reads the
  // attention weights and dispatches every MoE layer on its own.
  int micro_batches = 2;
  int64_t micro_batch_min_rows = 4;
};

absl::StatusOr<Pool> ParsePool(std::string_view json_text);
absl::StatusOr<Pool> LoadPool(const std::string& path);  // names the file on error

}  // namespace expertmesh::planner
