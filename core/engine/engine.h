// The reference engine: DeepSeek-V3's forward pass on the CPU, plain and readable (no
// threads; the linear layers' inner loops run SIMD kernels unless EngineOptions::kernel asks
// for the reference loops), the implementation every optimized path and the cluster are
// tested against.
// A forward takes a batch of sequences, each appending 1..n tokens (prefill or decode) at its
// KV cache's current length, and returns per sequence the logits (last position, or every new
// position for speculative verification) and the last layer's hidden states (before the final
// norm; the MTP module's input). The multi-token-prediction module has its own entry point
// and its own KV cache. Routed experts are reached only through the RoutedExperts given to
// Create(), so the same engine runs with local experts or with remote shards.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine/kv_cache.h"
#include "core/engine/layers.h"
#include "core/model/experts.h"
#include "core/model/model.h"

namespace expertmesh {

struct EngineOptions {
  // FP8 weights see per-token-per-128 quantized inputs (as DeepSeek serves); off: plain float
  // inputs (what transformers does). Routed experts are called with Run() when on and with
  // RunUnquantized() when off.
  bool quantize_activations = true;
  AttentionForm attention = AttentionForm::kAbsorbed;
  // Linear layers' kernels: SIMD (default) or the plain reference loops (core/model/model.cc).
  LinearKernel kernel = LinearKernel::kSimd;
};

struct SequenceInput {
  std::span<const int32_t> tokens;  // [n] new tokens, n >= 1, placed at cache->length()
  MlaKvCache* cache = nullptr;      // num_hidden_layers layers
  bool all_logits = false;          // logits for every new position, not only the last
};

struct SequenceOutput {
  std::vector<float> logits;  // [n or 1, vocab_size]
  // [n, hidden_size]: the hidden state after the final norm (Forward: model.norm; ForwardMtp:
  // the module's shared_head.norm), the rows the head reads. Forward's is the MTP module's
  // input, as vLLM, SGLang and TensorRT-LLM feed the released DeepSeek-V3/R1 weights.
  // ForwardMtp without all_logits: [1, hidden_size], the last position (the module computes no
  // other output).
  std::vector<float> hidden;
};

// MTP input at position i: the token t[i+1] and the main model's hidden state h[i] after the
// final norm (SequenceOutput::hidden); the module computes eh_proj(concat(enorm(embed(t[i+1])),
// hnorm(h[i]))).
struct MtpInput {
  std::span<const int32_t> next_tokens;  // [n]
  std::span<const float> hidden;         // [n, hidden_size]
  MlaKvCache* cache = nullptr;           // the MTP module's cache: 1 layer
  bool all_logits = false;
};

class Engine {
 public:
  // `model` and `experts` must outlive the engine; experts may be null for a model without
  // MoE layers.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const Model& model, RoutedExperts* experts,
                                                        EngineOptions options = {});

  absl::StatusOr<std::vector<SequenceOutput>> Forward(std::span<const SequenceInput> batch);
  // MTP module `depth` (model.layers.{num_hidden_layers + depth}).
  absl::StatusOr<std::vector<SequenceOutput>> ForwardMtp(std::span<const MtpInput> batch,
                                                         int depth = 0);

  // Contiguous caches shaped for this model (main layers / one MTP module).
  std::unique_ptr<ContiguousKvCache> NewCache() const;
  std::unique_ptr<ContiguousKvCache> NewMtpCache() const;

  const Model& model() const { return model_; }
  const EngineOptions& options() const { return options_; }

 private:
  Engine(const Model& model, RoutedExperts* experts, EngineOptions options)
      : model_(model), experts_(experts), options_(options), rope_(model.config()) {}

  // Final norm + head on the rows each sequence wants; h: [T, hidden_size]; the normalized rows
  // are the outputs' hidden states.
  std::vector<SequenceOutput> Outputs(const float* h, std::span<const SequenceSlice> slices,
                                      const std::vector<uint8_t>& all_logits,
                                      const std::vector<float>& norm, const Linear& head,
                                      bool last_hidden_only = false) const;
  // Extends every cache; on failure restores the lengths.
  absl::StatusOr<std::vector<SequenceSlice>> Place(std::span<MlaKvCache* const> caches,
                                                   std::span<const int64_t> lengths);

  const Model& model_;
  RoutedExperts* experts_;
  EngineOptions options_;
  Rope rope_;
};

// Embedding rows: out: [n, hidden_size] = embed[tokens].
void EmbedTokens(const Linear& embed, std::span<const int32_t> tokens, float* out);

}  // namespace expertmesh
