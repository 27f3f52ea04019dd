#include "attention-service/paged_kv_cache.h"

#include <cassert>

#include "absl/strings/str_cat.h"

namespace expertmesh::attention {

absl::StatusOr<std::unique_ptr<PagedKvCache>> PagedKvCache::Create(KvBlockPool* pool,
                                                                   int64_t capacity_tokens) {
  if (capacity_tokens <= 0) {
    return absl::InvalidArgumentError("KV cache capacity must be positive");
  }
  const int64_t n = pool->BlocksFor(capacity_tokens);
  std::optional<std::vector<int32_t>> blocks = pool->Allocate(n);
  if (!blocks.has_value()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache: ", n, " blocks needed, ", pool->free_blocks(), " free"));
  }
  return std::unique_ptr<PagedKvCache>(
      new PagedKvCache(pool, std::move(*blocks), n * pool->block_size()));
}

absl::Status PagedKvCache::Extend(int64_t n) {
  if (n < 0 || length_ + n > capacity_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache: ", length_, " + ", n, " tokens exceed the reserved ", capacity_));
  }
  length_ += n;
  return absl::OkStatus();
}

void PagedKvCache::Truncate(int64_t new_length) {
  assert(new_length >= 0 && new_length <= length_);
  length_ = new_length;
}

float* PagedKvCache::Slot(int layer, int64_t pos) {
  assert(pos >= 0 && pos < length_);
  const int64_t bs = pool_->block_size();
  return pool_->Slot(blocks_[static_cast<size_t>(pos / bs)], layer, pos % bs);
}

const float* PagedKvCache::Slot(int layer, int64_t pos) const {
  return const_cast<PagedKvCache*>(this)->Slot(layer, pos);
}

void PagedKvCache::Release() {
  if (!blocks_.empty()) pool_->Free(blocks_);
  blocks_.clear();
  capacity_ = 0;
  length_ = 0;
}

}  // namespace expertmesh::attention
