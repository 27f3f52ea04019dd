// One sequence's MLA KV cache in the attention service: an MlaKvCache (core/engine/kv_cache.h)
// whose token slots live in blocks of the shared KvBlockPool, so the engine's layers read and write
// the paged storage exactly as they do the reference engine's contiguous cache.
//
// Blocks are taken from the pool up front for the sequence's whole budget (prompt plus
// max_tokens, capped at the context): a running sequence never runs out of KV memory
// mid-generation, so no preemption is needed, and admission control is one comparison.
// The destructor (or Release()) gives the blocks back at once.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "attention-service/kv_block_pool.h"
#include "core/engine/kv_cache.h"

namespace expertmesh::attention {

class PagedKvCache : public MlaKvCache {
 public:
  // Reserves blocks for `capacity_tokens` tokens; ResourceExhausted when the pool has too
  // few free blocks (nothing taken).
  static absl::StatusOr<std::unique_ptr<PagedKvCache>> Create(KvBlockPool* pool,
                                                              int64_t capacity_tokens);
  ~PagedKvCache() override { Release(); }

  int64_t length() const override { return length_; }
  absl::Status Extend(int64_t n) override;
  void Truncate(int64_t new_length) override;
  float* Slot(int layer, int64_t pos) override;
  const float* Slot(int layer, int64_t pos) const override;
  int num_layers() const override { return static_cast<int>(pool_->n_layers()); }
  int64_t row_size() const override { return pool_->slot_dim(); }
  // The GPU engine mirrors the pool's blocks in its device cache by these ids.
  std::span<const int32_t> page_ids() const override { return blocks_; }
  int64_t page_size() const override { return pool_->block_size(); }

  int64_t capacity() const { return capacity_; }
  const std::vector<int32_t>& block_table() const { return blocks_; }
  // Returns the blocks to the pool; the cache is unusable afterwards (capacity 0).
  void Release();

 private:
  PagedKvCache(KvBlockPool* pool, std::vector<int32_t> blocks, int64_t capacity)
      : pool_(pool), blocks_(std::move(blocks)), capacity_(capacity) {}
  KvBlockPool* pool_;
  std::vector<int32_t> blocks_;
  int64_t capacity_;
  int64_t length_ = 0;
};

}  // namespace expertmesh::attention
