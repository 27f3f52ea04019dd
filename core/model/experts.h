// The seam between the dense model and the routed experts. The engine calls a
// RoutedExperts implementation at every MoE layer with the batch's hidden states already
// quantized to FP8 (1 x 128 groups, as DeepSeek does before its FP8 GEMMs) and per row the
// (expert, weight) pairs chosen by the gate. Implementations: the in-process reference
// (all experts local), an expert shard (its experts only), the router's remote dispatcher,
// and the CUDA backend.
//
// Contract: out[r] = sum over row r's pairs, in ascending expert id order, of
// weight * expert(x[r]) where expert(x) = down_proj(silu(gate_proj(x)) * up_proj(x)),
// the intermediate quantized per 128 channels before down_proj when activation
// quantization is on. Each row is computed independently of the others (batch invariance).
//
// The precision of one expert's output: with FP8 activations (Run) the reference engine
// (LocalExperts, by default) rounds each expert's output y to BF16 and adds weight * y in
// FP32 with AddWeightedBf16 below, pair by pair in ascending expert order. The expert data
// plane's exact combine mode receives those BF16 y per (row, expert) pair (RunPerExpert) and
// adds them on the attention side with the same function in the same order, so the result
// does not depend on which shard computed which expert.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "core/numerics/quant.h"

namespace expertmesh {

// Per-row (expert, weight) lists in CSR form: row r owns [offsets[r], offsets[r+1]).
struct ExpertRoutes {
  std::vector<int32_t> offsets{0};  // [n_rows + 1]
  std::vector<int32_t> experts;     // [n_pairs], ascending within a row
  std::vector<float> weights;       // [n_pairs]
  int64_t n_rows() const { return static_cast<int64_t>(offsets.size()) - 1; }
  void AddRow(std::span<const int32_t> e, std::span<const float> w);
};

// out_row[d] += weight * float(y_bf16[d]) for d < H, in FP32: the one combine step of an
// expert output. LocalExperts::Run and the dispatcher's exact combine both call this (one
// compiled function, so no copy can differ by FMA contraction or vectorization).
void AddWeightedBf16(std::span<float> out_row, float weight, const uint16_t* y_bf16, int64_t H);

// out[r] = sum over row r's pairs p (in routes' order: ascending expert id) of
// weights[p] * float(pair_out[p]), starting from 0. pair_out: [n_pairs, H] BF16 (unweighted
// expert outputs in routes' pair order); out: [n_rows, H], overwritten.
absl::Status CombinePerExpert(const ExpertRoutes& routes, std::span<const uint16_t> pair_out,
                              int64_t H, std::span<float> out);

class RoutedExperts {
 public:
  virtual ~RoutedExperts() = default;
  // x: [n_rows, hidden_size] quantized; routes.n_rows() == x.n_rows;
  // out: [n_rows, hidden_size], overwritten.
  virtual absl::Status Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                           std::span<float> out) = 0;
  // The same with plain float inputs x: [n_rows, hidden_size] -- activation quantization off,
  // for comparisons against float oracles. Implementations that only take FP8 inputs keep
  // this default, which returns Unimplemented.
  virtual absl::Status RunUnquantized(int layer, std::span<const float> x,
                                      const ExpertRoutes& routes, std::span<float> out);
  // Per-pair outputs: pair_out: [n_pairs, hidden_size] BF16 (overwritten), row p = the
  // UNWEIGHTED expert output y = expert(x[row of p]) of pair p, in routes' pair order, rounded
  // to BF16. The default works for any backend: it calls Run once per pair rank k (each row's
  // k-th pair alone, weight 1), i.e. up to num_experts_per_tok Run calls of n_rows rows each
  // instead of one: the same expert FLOPs, but k times the per-call overhead (for a GPU
  // backend, k rounds of launches and host<->device copies). LocalExperts overrides it with
  // one pass.
  virtual absl::Status RunPerExpert(int layer, const QuantizedActivations& x,
                                    const ExpertRoutes& routes, std::span<uint16_t> pair_out);
};

// MoE layers below `first_local_layer` go to `remote`, the rest (the MTP module's layers) to
// `local`. The attention service keeps the MTP layer's experts in process this way, so that
// drafting, which is on every step's critical path, costs no network round trip.
class LayerSplitExperts final : public RoutedExperts {
 public:
  LayerSplitExperts(RoutedExperts* remote, RoutedExperts* local, int first_local_layer)
      : remote_(remote), local_(local), first_local_layer_(first_local_layer) {}
  absl::Status Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                   std::span<float> out) override {
    return For(layer).Run(layer, x, routes, out);
  }
  absl::Status RunUnquantized(int layer, std::span<const float> x, const ExpertRoutes& routes,
                              std::span<float> out) override {
    return For(layer).RunUnquantized(layer, x, routes, out);
  }
  absl::Status RunPerExpert(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                            std::span<uint16_t> pair_out) override {
    return For(layer).RunPerExpert(layer, x, routes, pair_out);
  }

 private:
  RoutedExperts& For(int layer) const { return layer < first_local_layer_ ? *remote_ : *local_; }
  RoutedExperts* remote_;
  RoutedExperts* local_;
  int first_local_layer_;
};

}  // namespace expertmesh
