// The attention service's KV memory: a fixed pool of `n_blocks` blocks, each holding
// `block_size` token slots of every layer's MLA cache entry (c_kv after kv_a_layernorm,
// then k_pe after RoPE: kv_lora_rank + qk_rope_head_dim floats). A sequence owns a list of
// blocks (its block table); token position p lives in block table[p / block_size] at
// offset p % block_size. Capacity is fixed at start-up (--kv-blocks), so admission control
// can be exact: a sequence is admitted only when blocks for all its tokens can be taken.
//
// Layout of the pool: [n_blocks, n_layers, block_size, slot_dim] floats.
// Thread-safety: Allocate/Free/counters are thread-safe; Slot() is a pure address
// computation (the scheduler thread is the only writer of the slots).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh::attention {

class KvBlockPool {
 public:
  // host_storage = false: block ids only (the GPU engine keeps the slots in device memory);
  // Slot() then returns null.
  static absl::StatusOr<std::unique_ptr<KvBlockPool>> Create(int64_t n_blocks, int64_t block_size,
                                                             int64_t n_layers, int64_t slot_dim,
                                                             bool host_storage = true);

  int64_t block_size() const { return block_size_; }
  int64_t n_layers() const { return n_layers_; }
  int64_t slot_dim() const { return slot_dim_; }
  int64_t total_blocks() const { return n_blocks_; }
  int64_t used_blocks() const;
  int64_t free_blocks() const;
  // Blocks needed to hold n_tokens tokens.
  int64_t BlocksFor(int64_t n_tokens) const { return (n_tokens + block_size_ - 1) / block_size_; }

  // Takes n blocks, all or nothing (nullopt when fewer are free). Lowest ids first, so a
  // run's block assignment is reproducible.
  std::optional<std::vector<int32_t>> Allocate(int64_t n);
  // Returns blocks to the pool. Each id must be currently allocated (checked, fatal if not:
  // a double free is a broken invariant).
  void Free(std::span<const int32_t> blocks);

  // The slot of (block, layer, offset): slot_dim floats.
  float* Slot(int32_t block, int64_t layer, int64_t offset) {
    if (storage_.empty()) return nullptr;
    return storage_.data() +
           ((static_cast<int64_t>(block) * n_layers_ + layer) * block_size_ + offset) * slot_dim_;
  }

 private:
  KvBlockPool(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t slot_dim,
              bool host_storage);
  const int64_t n_blocks_, block_size_, n_layers_, slot_dim_;
  std::vector<float> storage_;
  mutable std::mutex mu_;
  std::vector<int32_t> free_list_;  // kept sorted descending: back() is the lowest id
  std::vector<bool> in_use_;
};

}  // namespace expertmesh::attention
