// Routed experts computed in this process: the reference implementation of RoutedExperts.
// An expert shard creates it with its own (layer, expert) list and maps only those experts'
// tensors; the in-process engine creates it with AllExperts(config).
// Per the contract in core/model/experts.h: out[r] = sum over row r's (expert, weight) pairs in
// ascending expert order of weight * down_proj(silu(gate_proj(x)) * up_proj(x)), each row alone.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
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
  // Bytes of checkpoint data this object's experts occupy (their mapped tensors).
  uint64_t bytes_mapped() const { return bytes_mapped_; }

  absl::Status Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                   std::span<float> out) override;
  absl::Status RunUnquantized(int layer, std::span<const float> x, const ExpertRoutes& routes,
                              std::span<float> out) override;

 private:
  LocalExperts(int64_t hidden_size, Options options)
      : hidden_size_(hidden_size), options_(std::move(options)) {}
  // x: [n_rows, hidden_size] float (dequantized or plain).
  absl::Status RunRows(int layer, std::span<const float> x, const ExpertRoutes& routes,
                       std::span<float> out);

  int64_t hidden_size_;
  Options options_;
  std::map<LayerExpert, MlpWeights> experts_;
  uint64_t bytes_mapped_ = 0;
};

}  // namespace expertmesh
