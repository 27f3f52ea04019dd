// Routed experts computed in this process: the reference implementation of RoutedExperts.
// An expert shard creates it with its own (layer, expert) list and maps only those experts'
// tensors; the in-process engine creates it with AllExperts(config).
// Per the contract in core/model/experts.h: out[r] = sum over row r's (expert, weight) pairs in
// ascending expert order of weight * down_proj(silu(gate_proj(x)) * up_proj(x)), each row alone.
// With FP8 activations (Run) each expert output is rounded to BF16 before it is weighted and
// added (Options::round_expert_outputs_bf16, on by default: the precision the expert data
// plane's exact combine reproduces); RunUnquantized keeps FP32 expert outputs.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <shared_mutex>
#include <span>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/model/experts.h"
#include "core/model/model.h"

namespace expertmesh {

struct LayerExpert {
  int32_t layer = 0;   // model.layers.{layer} (MTP layers included)
  int32_t expert = 0;  // mlp.experts.{expert}
  auto operator<=>(const LayerExpert&) const = default;
};

// Every routed expert of every MoE layer, MTP layers included, in (layer, expert) order.
std::vector<LayerExpert> AllExperts(const ModelConfig& config);

class LocalExperts : public RoutedExperts {
 public:
  struct Options {
    // Quantize the intermediate silu(gate) * up per 128 channels before down_proj (and, in
    // RunUnquantized, nothing else). Off matches float oracles.
    bool quantize_activations = true;
    std::function<void(int64_t done, int64_t total)> progress;  // per expert loaded
    LinearKernel kernel = LinearKernel::kSimd;                  // the experts' linear layers
    // Run: round each expert's output y to BF16, then out[r] += weight * y in FP32
    // (AddWeightedBf16). This defines the precision of one expert's output for every user
    // (the engine, shards, the attention service's MTP experts) and is what the dispatcher's
    // exact combine reproduces for any placement. Off: FP32 y (only for comparisons with
    // float oracles that have no BF16 expert outputs).
    bool round_expert_outputs_bf16 = true;
  };

  static absl::StatusOr<std::unique_ptr<LocalExperts>> Create(const Checkpoint& ckpt,
                                                              const ModelConfig& config,
                                                              std::span<const LayerExpert> experts,
                                                              Options options);
  static absl::StatusOr<std::unique_ptr<LocalExperts>> Create(
      const Checkpoint& ckpt, const ModelConfig& config, std::span<const LayerExpert> experts) {
    return Create(ckpt, config, experts, Options{});
  }

  bool Holds(int layer, int expert) const;
  // Maps and packs the experts of `experts` not held yet (outside the lock: running calls go
  // on), then inserts them under the writer lock. An invalid id or a tensor that fails to load
  // is an error and nothing of this call is inserted. `ckpt` must outlive this object (the
  // experts' views point into it until packed). options.progress reports per expert.
  absl::Status Add(const Checkpoint& ckpt, const ModelConfig& config,
                   std::span<const LayerExpert> experts);
  // Drops these experts (ones not held are ignored) once no call is running; their packed
  // weights are freed and the freed heap is returned to the system.
  void Release(std::span<const LayerExpert> experts);
  // The experts held, in (layer, expert) order.
  std::vector<LayerExpert> Held() const;
  // Bytes of checkpoint data this object's experts occupy (their mapped tensors).
  uint64_t bytes_mapped() const { return bytes_mapped_.load(); }

  absl::Status Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                   std::span<float> out) override;
  absl::Status RunUnquantized(int layer, std::span<const float> x, const ExpertRoutes& routes,
                              std::span<float> out) override;
  // One pass (the code of Run): pair_out [n_pairs, hidden_size] BF16 of the unweighted y.
  absl::Status RunPerExpert(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                            std::span<uint16_t> pair_out) override;

 private:
  // How RunRows hands over each expert output y of pair p (row r, weight w).
  enum class Sink {
    kFloat,     // out[r] += w * y in FP32
    kBf16,      // out[r] += w * bf16(y) (AddWeightedBf16)
    kPairBf16,  // pair_out[p] = bf16(y)
  };
  LocalExperts(int64_t hidden_size, Options options)
      : hidden_size_(hidden_size), options_(std::move(options)) {}
  // x: [n_rows, hidden_size] float (dequantized or plain).
  // Exactly one of out ([n_rows, hidden_size]) / pair_out ([n_pairs, hidden_size]) is used,
  // per sink.
  // Holds mu_ shared for the whole call.
  absl::Status RunRows(int layer, std::span<const float> x, const ExpertRoutes& routes, Sink sink,
                       std::span<float> out, std::span<uint16_t> pair_out);
  static uint64_t BytesOf(const MlpWeights& w);

  int64_t hidden_size_;
  Options options_;
  mutable std::shared_mutex mu_;  // guards experts_: shared for Run*, exclusive to change it
  std::map<LayerExpert, MlpWeights> experts_;
  std::atomic<uint64_t> bytes_mapped_{0};
};

}  // namespace expertmesh
