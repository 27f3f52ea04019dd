// The MLA key-value cache: per token per layer, the compressed latent c_kv (after
// kv_a_layernorm) [kv_lora_rank] followed by the shared rotary key k_pe (after RoPE)
// [qk_rope_head_dim] -- kv_lora_rank + qk_rope_head_dim floats, everything the absorbed
// attention needs. MlaKvCache is the interface the layers read and write through, so the
// attention service can supply paged storage; ContiguousKvCache is the reference engine's
// one-vector-per-layer implementation. Truncate() rolls a sequence back (speculative decoding).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace expertmesh {

class MlaKvCache {
 public:
  virtual ~MlaKvCache() = default;
  // Tokens held (the position the next appended token gets).
  virtual int64_t length() const = 0;
  // Makes room for n more tokens: positions [length(), length() + n) become writable and
  // length() grows by n. Fails (cache unchanged) when storage is exhausted.
  virtual absl::Status Extend(int64_t n) = 0;
  // Drops every token at position >= new_length (new_length <= length()).
  virtual void Truncate(int64_t new_length) = 0;
  // The row of (layer, pos): [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)], pos < length().
  // Valid until the next Extend().
  virtual float* Slot(int layer, int64_t pos) = 0;
  virtual const float* Slot(int layer, int64_t pos) const = 0;
  virtual int num_layers() const = 0;
  virtual int64_t row_size() const = 0;  // kv_lora_rank + qk_rope_head_dim
  // Paged caches: the ids of the pages (blocks) holding positions [0, page_size() * n), in
  // order, so a device-side cache (core/kernels/cuda/cuda_engine.h) can mirror the same layout.
  // Empty (and page_size() 0) for caches that are not paged.
  virtual std::span<const int32_t> page_ids() const { return {}; }
  virtual int64_t page_size() const { return 0; }
};

class ContiguousKvCache : public MlaKvCache {
 public:
  // max_length bounds Extend(); 0 = unbounded.
  static absl::StatusOr<std::unique_ptr<ContiguousKvCache>> Create(int num_layers,
                                                                   int64_t kv_lora_rank,
                                                                   int64_t qk_rope_head_dim,
                                                                   int64_t max_length = 0);
  int64_t length() const override { return length_; }
  absl::Status Extend(int64_t n) override;
  void Truncate(int64_t new_length) override;
  float* Slot(int layer, int64_t pos) override;
  const float* Slot(int layer, int64_t pos) const override;
  int num_layers() const override { return static_cast<int>(layers_.size()); }
  int64_t row_size() const override { return row_size_; }

 private:
  ContiguousKvCache(int num_layers, int64_t row_size, int64_t max_length)
      : layers_(num_layers), row_size_(row_size), max_length_(max_length) {}
  std::vector<std::vector<float>> layers_;  // each [length, row_size]
  int64_t row_size_;
  int64_t max_length_;
  int64_t length_ = 0;
};

}  // namespace expertmesh
