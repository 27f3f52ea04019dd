// The attention service's KV memory: a fixed pool of `n_blocks` blocks, each holding
// `block_size` token slots of every layer's MLA cache entry (c_kv after kv_a_layernorm, then
// k_pe after RoPE: kv_lora_rank + qk_rope_head_dim floats) and, with mtp_layers = 1, the same
// slots of the MTP module's 1-layer cache: a sequence's main and MTP caches use the same
// block ids (one block table), so everything below holds for both.
//
// Blocks are reference-counted: a block is held by every sequence whose block table lists it.
// Prefix caching (as vLLM's automatic prefix caching): a full block whose tokens are final is
// registered under the hash of its tokens chained with its predecessors' (so a hash names the
// whole prefix up to the block's end); a new sequence with the same prefix acquires the block
// instead of computing it. A registered block nobody holds stays cached, evictable in LRU
// order: Allocate takes never-used or freed blocks first, then evicts the least recently
// released cached block. A block that is held is never evicted. The MTP rows of a block
// depend on one token past it (row i reads t[i+1]); they are shared only with a sequence whose
// token at the block's end is the same (`mtp_next`).
//
// Layout: [n_blocks, n_layers, block_size, slot_dim] floats, then the MTP storage
// [n_blocks, block_size, slot_dim]. Thread-safe; Slot() is a pure address computation (the
// scheduler thread is the only writer of the slots).
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh::attention {

class KvBlockPool {
 public:
  // host_storage = false: block ids only (the GPU engine keeps the slots in device memory);
  // Slot() then returns null. mtp_layers: 0 or 1 (the MTP module's cache beside the main one).
  static absl::StatusOr<std::unique_ptr<KvBlockPool>> Create(int64_t n_blocks, int64_t block_size,
                                                             int64_t n_layers, int64_t slot_dim,
                                                             bool host_storage = true,
                                                             int64_t mtp_layers = 0);

  int64_t block_size() const { return block_size_; }
  int64_t n_layers() const { return n_layers_; }
  int64_t slot_dim() const { return slot_dim_; }
  int64_t total_blocks() const { return n_blocks_; }
  bool has_mtp() const { return mtp_layers_ > 0; }
  // Held by at least one sequence.
  int64_t used_blocks() const;
  // Allocatable now: never used or freed, plus cached blocks nobody holds (evictable).
  int64_t free_blocks() const;
  // Registered in the prefix cache (held or not).
  int64_t cached_blocks() const;
  // Held by two sequences or more.
  int64_t shared_blocks() const;
  // Blocks needed to hold n_tokens tokens.
  int64_t BlocksFor(int64_t n_tokens) const { return (n_tokens + block_size_ - 1) / block_size_; }

  // Takes n blocks, all or nothing (nullopt when fewer are allocatable), each with one
  // reference. Free blocks lowest id first, then cached ones least recently released first
  // (their registration is dropped).
  std::optional<std::vector<int32_t>> Allocate(int64_t n);
  // Drops one reference of each block. Each must be held (checked, fatal if not: a double
  // free is a broken invariant). A block nobody holds any more stays cached when registered.
  void Free(std::span<const int32_t> blocks);

  // Prefix cache. The block registered under `hash`, with one more reference, or nullopt.
  std::optional<int32_t> Acquire(uint64_t hash);
  // Whether a cached block's MTP rows are final and were computed with `next` after it.
  bool MtpRowsValid(int32_t block, int32_t next) const;
  // Registers a held, full block under `hash` (no-op when the hash names another block or
  // the block has a hash already); with mtp_next, records that its MTP rows are final and
  // were computed with that token after the block.
  void Register(int32_t block, uint64_t hash, std::optional<int32_t> mtp_next);
  // The chained hash of a block of tokens after the prefix hashed as `previous` (0 first).
  static uint64_t ChainHash(uint64_t previous, std::span<const int32_t> tokens);

  // The slot of (block, layer, offset): slot_dim floats.
  float* Slot(int32_t block, int64_t layer, int64_t offset) {
    if (storage_.empty()) return nullptr;
    return storage_.data() +
           ((static_cast<int64_t>(block) * n_layers_ + layer) * block_size_ + offset) * slot_dim_;
  }
  // The MTP module's slot of (block, offset).
  float* MtpSlot(int32_t block, int64_t offset) {
    if (mtp_storage_.empty()) return nullptr;
    return mtp_storage_.data() + (static_cast<int64_t>(block) * block_size_ + offset) * slot_dim_;
  }

 private:
  KvBlockPool(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t slot_dim,
              bool host_storage, int64_t mtp_layers);
  void DropRegistrationLocked(int32_t block);

  const int64_t n_blocks_, block_size_, n_layers_, slot_dim_, mtp_layers_;
  std::vector<float> storage_;
  std::vector<float> mtp_storage_;
  mutable std::mutex mu_;
  std::vector<int32_t> free_list_;  // sorted descending: back() is the lowest id
  std::vector<int32_t> refs_;       // per block
  std::list<int32_t> lru_;          // cached blocks nobody holds, least recently released first
  std::vector<std::list<int32_t>::iterator> lru_pos_;
  std::vector<bool> in_lru_;
  std::vector<bool> registered_;
  std::vector<uint64_t> hash_;
  std::vector<int32_t> mtp_next_;  // -1: the block's MTP rows are not registered as final
  std::unordered_map<uint64_t, int32_t> by_hash_;
  int64_t used_ = 0;
  int64_t shared_ = 0;
};

}  // namespace expertmesh::attention
