// Per-token addressing of a forward batch over paged KV caches, as the GPU engine
// (core/kernels/cuda/cuda_engine.h) hands it to its kernels: every new token is one query row with
// its position, its causal length and its sequence's page table, and one cache slot to write.
// Prefill therefore runs the decode attention kernel once per new position. Plain host code,
// unit-tested on the CPU (tests/core/paged_batch_test.cc).
// Legend: T = new tokens of the batch, P = columns of the per-token page table.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh {

struct PagedSequence {
  std::span<const int32_t> pages;  // the sequence's page ids, in position order
  int64_t start = 0;               // tokens already cached
  int64_t n = 0;                   // new tokens (>= 1), at positions [start, start + n)
  bool all_logits = false;         // logits for every new row, not only the last
};

struct PagedBatchLayout {
  int64_t n_tokens = 0;              // T
  int64_t max_pages = 0;             // P: pages the longest sequence needs
  std::vector<int32_t> positions;    // [T]
  std::vector<int32_t> seq_lens;     // [T] causal length: position + 1
  std::vector<int64_t> slots;        // [T] cache row: page * page_size + position % page_size
  std::vector<int32_t> block_table;  // [T, P] the row's sequence's pages (0-padded)
  std::vector<int32_t> out_rows;     // rows whose logits are wanted, in sequence order
};

// InvalidArgument when a sequence has n < 1, or its pages do not cover start + n tokens, or a
// page id lies outside [0, n_pages).
absl::StatusOr<PagedBatchLayout> BuildPagedBatchLayout(std::span<const PagedSequence> seqs,
                                                       int64_t page_size, int64_t n_pages);

}  // namespace expertmesh
