// The forward-pass contract shared by the reference engine (core/engine/engine.h, CPU) and the GPU
// engine (core/kernels/cuda/cuda_engine.h): Forward / ForwardMtp over a batch of sequences with
// their KV caches, logits and final-normed hidden states out, routed experts through the engine's
// RoutedExperts. The attention service's scheduler and the MTP drafter hold this interface, so
// `--device` picks the implementation and nothing else changes.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine/engine.h"
#include "core/model/model.h"

namespace expertmesh {

class ForwardEngine {
 public:
  virtual ~ForwardEngine() = default;
  virtual absl::StatusOr<std::vector<SequenceOutput>> Forward(
      std::span<const SequenceInput> batch) = 0;
  // MTP module `depth` (model.layers.{num_hidden_layers + depth}).
  virtual absl::StatusOr<std::vector<SequenceOutput>> ForwardMtp(std::span<const MtpInput> batch,
                                                                 int depth) = 0;
  virtual const Model& model() const = 0;
};

// The reference engine behind the interface (not owning: `engine` must outlive it).
class ReferenceForwardEngine : public ForwardEngine {
 public:
  explicit ReferenceForwardEngine(Engine* engine) : engine_(engine) {}
  absl::StatusOr<std::vector<SequenceOutput>> Forward(
      std::span<const SequenceInput> batch) override {
    return engine_->Forward(batch);
  }
  absl::StatusOr<std::vector<SequenceOutput>> ForwardMtp(std::span<const MtpInput> batch,
                                                         int depth) override {
    return engine_->ForwardMtp(batch, depth);
  }
  const Model& model() const override { return engine_->model(); }

 private:
  Engine* engine_;
};

}  // namespace expertmesh
