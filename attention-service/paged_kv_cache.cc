#include "attention-service/paged_kv_cache.h"

#include <cassert>

#include "absl/strings/str_cat.h"
#include "core/base/check.h"

namespace expertmesh::attention {

absl::Status BlockTable::Reserve(int64_t n_tokens) {
  const int64_t need = pool_->BlocksFor(n_tokens) - static_cast<int64_t>(blocks_.size());
  if (need <= 0) return absl::OkStatus();
  std::optional<std::vector<int32_t>> more = pool_->Allocate(need);
  if (!more.has_value()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache: ", need, " more blocks needed, ", pool_->free_blocks(), " free"));
  }
  blocks_.insert(blocks_.end(), more->begin(), more->end());
  return absl::OkStatus();
}

void BlockTable::AdoptShared(std::vector<int32_t> blocks) {
  EM_CHECK(blocks_.empty(), "BlockTable: shared blocks adopted by a table in use");
  blocks_ = std::move(blocks);
}

void BlockTable::Release() {
  if (!blocks_.empty()) pool_->Free(blocks_);
  blocks_.clear();
}

absl::StatusOr<std::unique_ptr<PagedKvCache>> PagedKvCache::Create(KvBlockPool* pool,
                                                                   int64_t capacity_tokens) {
  if (capacity_tokens <= 0) {
    return absl::InvalidArgumentError("KV cache capacity must be positive");
  }
  auto table = std::make_unique<BlockTable>(pool);
  if (absl::Status s = table->Reserve(capacity_tokens); !s.ok()) return s;
  auto cache = std::make_unique<PagedKvCache>(table.get(), View::kMain);
  cache->owned_ = std::move(table);
  return cache;
}

absl::Status PagedKvCache::Extend(int64_t n) {
  if (n < 0 || length_ + n > capacity()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache: ", length_, " + ", n, " tokens exceed the reserved ", capacity()));
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
  KvBlockPool* pool = table_->pool();
  const int64_t bs = pool->block_size();
  const int32_t block = table_->blocks()[static_cast<size_t>(pos / bs)];
  return view_ == View::kMain ? pool->Slot(block, layer, pos % bs) : pool->MtpSlot(block, pos % bs);
}

const float* PagedKvCache::Slot(int layer, int64_t pos) const {
  return const_cast<PagedKvCache*>(this)->Slot(layer, pos);
}

}  // namespace expertmesh::attention
