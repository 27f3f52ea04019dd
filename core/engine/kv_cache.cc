#include "core/engine/kv_cache.h"

#include <cassert>

#include "absl/strings/str_format.h"

namespace expertmesh {

absl::StatusOr<std::unique_ptr<ContiguousKvCache>> ContiguousKvCache::Create(
    int num_layers, int64_t kv_lora_rank, int64_t qk_rope_head_dim, int64_t max_length) {
  if (num_layers <= 0 || kv_lora_rank <= 0 || qk_rope_head_dim < 0 || max_length < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("kv cache: bad shape num_layers=%d kv_lora_rank=%d qk_rope_head_dim=%d",
                        num_layers, kv_lora_rank, qk_rope_head_dim));
  }
  return std::unique_ptr<ContiguousKvCache>(
      new ContiguousKvCache(num_layers, kv_lora_rank + qk_rope_head_dim, max_length));
}

absl::Status ContiguousKvCache::Extend(int64_t n) {
  if (n < 0) return absl::InvalidArgumentError("kv cache: negative extension");
  if (max_length_ > 0 && length_ + n > max_length_) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("kv cache: %d + %d tokens exceed max_length %d", length_, n, max_length_));
  }
  length_ += n;
  for (auto& layer : layers_) layer.resize(length_ * row_size_, 0.0f);
  return absl::OkStatus();
}

void ContiguousKvCache::Truncate(int64_t new_length) {
  assert(new_length >= 0 && new_length <= length_);
  length_ = new_length;
  for (auto& layer : layers_) layer.resize(length_ * row_size_);
}

float* ContiguousKvCache::Slot(int layer, int64_t pos) {
  assert(layer >= 0 && layer < num_layers() && pos >= 0 && pos < length_);
  return layers_[layer].data() + pos * row_size_;
}

const float* ContiguousKvCache::Slot(int layer, int64_t pos) const {
  assert(layer >= 0 && layer < num_layers() && pos >= 0 && pos < length_);
  return layers_[layer].data() + pos * row_size_;
}

}  // namespace expertmesh
