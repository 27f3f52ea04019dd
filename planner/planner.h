// The capacity planner behind `expertmesh plan`: given a model config and a pool (pool.h),
// place every routed expert on an expert card (one card = one shard group), add redundant
// copies of the hottest experts where memory allows and the prediction improves, and predict
// decode tokens/s per batch size with the bottleneck named. The cost model is in
// planner/README.md; in short, per MoE layer and step:
//   card time   = bytes of the distinct experts the batch touches there / (bandwidth x eff)
//                 (or the matmul FLOPs / gflops when that is larger)
//   link time   = rows x (hidden FP8 + scales) out, rows x hidden BF16 back, over the node's
//                 link and the attention node's link, + 2 x one-way latency
//   overhead    = dispatch_overhead_us + rows x dispatch_overhead_per_row_us
//   layer time  = max over cards (send + latency + card time + answer) + overhead
// step time = attention node time + sum over MoE layers of layer time + step overhead
//             (step_overhead_us + B x step_overhead_per_row_us).
//
// Dimension legend: L = MoE layers (MTP included), E = n_routed_experts, C = expert cards,
// B = batch (sequences decoding together).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/format/config.h"
#include "planner/pool.h"

namespace expertmesh::planner {

// Byte and FLOP sizes of a model, from its config.
struct ModelSizes {
  int64_t expert_bytes = 0;          // one routed expert: gate, up, down weights + block scales
  int64_t expert_flops_per_row = 0;  // 2 x its parameters
  std::vector<int> moe_layers;       // every MoE layer index, MTP layers included
  int decode_moe_layers = 0;         // MoE layers a decode step runs (MTP layers not)
  // The attention node's weights (attention, dense FFNs, shared experts, gates, norms, lm_head;
  // the embedding table is not read per step), bytes and per-token FLOPs (lm_head included).
  int64_t attention_bytes = 0;
  int64_t attention_flops_per_token = 0;
  int64_t kv_bytes_per_token = 0;  // MLA cache per token, all decode layers
  // The absorbed attention core per (query, cached token) pair, all decode layers: scores over
  // kv_lora_rank + qk_rope_head_dim and values over kv_lora_rank, per head, 2 FLOPs a MAC.
  int64_t attention_flops_per_cached_token = 0;
  int64_t wire_out_bytes_per_row = 0;   // FP8 hidden + float scales (core/format/wire.h)
  int64_t wire_back_bytes_per_row = 0;  // BF16 hidden
};
ModelSizes SizesOf(const ModelConfig& config);

// Tokens routed to each (layer, expert), e.g. a router's GetStatus expert_load. Missing
// layers count as uniform.
struct LoadProfile {
  std::vector<std::vector<double>> share;  // [L][E]: fraction of the layer's (token, expert) pairs
};
// Reads the JSON form of a router StatusResponse ({"expert_load": [{"layer", "expert",
// "tokens"}]}, protobuf's "expertLoad" spelling too; tokens a number or a decimal string).
absl::StatusOr<LoadProfile> ParseLoadProfile(std::string_view json_text, const ModelConfig& config);

struct CardPlan {
  int card = 0;
  std::vector<std::pair<int, int>> experts;  // (layer, expert) copies it holds
  double expert_gib = 0;
  double used_gib = 0;  // experts + the kind's overhead
};

struct Plan {
  ModelConfig config;
  ModelSizes sizes;
  Pool pool;
  // copies[l * E + e] = the cards holding (l, e) (MoE layers only; others empty).
  std::vector<std::vector<int>> copies;
  std::vector<CardPlan> cards;
  std::vector<std::vector<double>> share;  // [layer][E] routing share (uniform when no profile)
  int redundant_copies = 0;
  std::string balancer;           // what placed the single copies: placement/eplb.h or the greedy
  double attention_used_gib = 0;  // per attention node, at the largest batch
};

enum class Bottleneck {
  kExpertBandwidth,
  kExpertCompute,
  kLink,
  kLatency,
  kDispatch,
  kAttention,
  kStepOverhead
};
const char* BottleneckName(Bottleneck b);

struct Prediction {
  int batch = 0;
  double step_ms = 0;
  double tokens_per_s = 0;  // batch / step, summed over attention nodes
  // Time along the critical path per step, by cause (sums to step_ms).
  double expert_ms = 0;     // card memory streaming (or matmul) on the slowest card of each layer
  double link_ms = 0;       // serialization on the links
  double latency_ms = 0;    // round trips
  double dispatch_ms = 0;   // software overhead per layer
  double attention_ms = 0;  // the attention node's own work
  double overhead_ms = 0;   // per step: scheduler, sampling, streaming
  Bottleneck bottleneck = Bottleneck::kExpertBandwidth;
  std::string bottleneck_detail;  // e.g. "rtx3090 memory bandwidth (card 3)"
};

struct PlanOptions {
  bool redundant_copies = true;
  const LoadProfile* load = nullptr;  // optional
};

// Places the experts. FAILED_PRECONDITION naming the shortfall (GiB, and how many more cards
// of the pool's largest kind) when the expert cards, or the attention node, cannot hold it.
absl::StatusOr<Plan> MakePlan(const ModelConfig& config, const Pool& pool,
                              const PlanOptions& options = {});

// The predicted decode speed of a plan at batch B.
Prediction Predict(const Plan& plan, int batch);

// Human table and JSON of a plan with its predictions.
std::string PlanTable(const Plan& plan, const std::vector<Prediction>& predictions);
std::string PlanJson(const Plan& plan, const std::vector<Prediction>& predictions);

}  // namespace expertmesh::planner
