// One sequence's MLA KV caches in the attention service. A BlockTable holds the sequence's
// blocks of the shared KvBlockPool (one reference each) and grows on demand as the sequence
// does (Reserve), so a request asking for 4,096 tokens holds only what it has used; the
// scheduler preempts a sequence when the pool runs dry. Its first blocks may be shared with
// other sequences through the prefix cache (AdoptShared). A PagedKvCache is an MlaKvCache
// (core/engine/kv_cache.h) view of a table: the main model's (every layer) or the MTP
// module's (1 layer), both over the same block ids, each with its own length. The engine's
// layers read and write the paged storage exactly as they do the reference engine's
// contiguous cache.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "attention-service/kv_block_pool.h"
#include "core/engine/kv_cache.h"

namespace expertmesh::attention {

class BlockTable {
 public:
  explicit BlockTable(KvBlockPool* pool) : pool_(pool) {}
  ~BlockTable() { Release(); }
  BlockTable(const BlockTable&) = delete;
  BlockTable& operator=(const BlockTable&) = delete;

  // Makes room for n_tokens positions; RESOURCE_EXHAUSTED (nothing taken) when the pool has
  // too few allocatable blocks.
  absl::Status Reserve(int64_t n_tokens);
  // Takes over blocks already acquired from the prefix cache, as the table's first blocks
  // (only on an empty table).
  void AdoptShared(std::vector<int32_t> blocks);
  // Returns every block (one reference each) to the pool.
  void Release();

  KvBlockPool* pool() const { return pool_; }
  int64_t capacity() const { return static_cast<int64_t>(blocks_.size()) * pool_->block_size(); }
  const std::vector<int32_t>& blocks() const { return blocks_; }

 private:
  KvBlockPool* pool_;
  std::vector<int32_t> blocks_;
};

class PagedKvCache : public MlaKvCache {
 public:
  enum class View { kMain, kMtp };
  // A view of `table` (not owned; it must outlive the cache), starting at `length` tokens
  // (a prefix already in the table's blocks).
  PagedKvCache(BlockTable* table, View view, int64_t length = 0)
      : table_(table), view_(view), length_(length) {}
  // A main-model cache owning a table with room for `capacity_tokens` (tests, tools);
  // RESOURCE_EXHAUSTED when the pool has too few free blocks (nothing taken).
  static absl::StatusOr<std::unique_ptr<PagedKvCache>> Create(KvBlockPool* pool,
                                                              int64_t capacity_tokens);

  int64_t length() const override { return length_; }
  // Beyond the table's capacity: RESOURCE_EXHAUSTED (the scheduler reserves first).
  absl::Status Extend(int64_t n) override;
  void Truncate(int64_t new_length) override;
  float* Slot(int layer, int64_t pos) override;
  const float* Slot(int layer, int64_t pos) const override;
  int num_layers() const override {
    return view_ == View::kMain ? static_cast<int>(table_->pool()->n_layers()) : 1;
  }
  int64_t row_size() const override { return table_->pool()->slot_dim(); }
  // The GPU engine mirrors the pool's blocks in its device caches by these ids.
  std::span<const int32_t> page_ids() const override { return table_->blocks(); }
  int64_t page_size() const override { return table_->pool()->block_size(); }

  int64_t capacity() const { return table_->capacity(); }
  const std::vector<int32_t>& block_table() const { return table_->blocks(); }

 private:
  std::unique_ptr<BlockTable> owned_;  // with Create
  BlockTable* table_;
  View view_;
  int64_t length_;
};

}  // namespace expertmesh::attention
