// Per-token addressing of a paged batch (core/kernels/plan/paged_batch.h), the host side of the GPU
// engine's attention: positions, causal lengths, cache slots, page tables, logit rows.
#include "core/kernels/plan/paged_batch.h"

#include <vector>

#include "gtest/gtest.h"

namespace expertmesh {
namespace {

TEST(PagedBatch, PrefillAndDecodeRows) {
  const std::vector<int32_t> a = {5, 2, 7}, b = {0};
  // a: 2 cached tokens + 5 new (prefill chunk, all logits); b: decode of its 4th token.
  const std::vector<PagedSequence> seqs = {{a, 2, 5, true}, {b, 3, 1, false}};
  auto l = BuildPagedBatchLayout(seqs, 4, 8);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->n_tokens, 6);
  EXPECT_EQ(l->max_pages, 2);  // a needs pages for 7 tokens: 2 of 4
  EXPECT_EQ(l->positions, (std::vector<int32_t>{2, 3, 4, 5, 6, 3}));
  EXPECT_EQ(l->seq_lens, (std::vector<int32_t>{3, 4, 5, 6, 7, 4}));
  EXPECT_EQ(l->slots, (std::vector<int64_t>{5 * 4 + 2, 5 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 2 * 4 + 2,
                                            0 * 4 + 3}));
  EXPECT_EQ(l->block_table, (std::vector<int32_t>{5, 2, 5, 2, 5, 2, 5, 2, 5, 2, 0, 0}));
  EXPECT_EQ(l->out_rows, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
}

// Every position a row attends to is found through its page table at the slot where that
// position's token was (or is being) written: the kernel reads what the cache write stored.
TEST(PagedBatch, RowsReadWhatWasWritten) {
  const std::vector<int32_t> pages = {3, 9, 1, 4};
  const int64_t ps = 3;
  std::vector<int64_t> written;  // slot of position p, over successive forwards
  int64_t cached = 0;
  for (int64_t n : {5, 1, 1, 4, 1}) {
    const std::vector<PagedSequence> seqs = {{pages, cached, n, false}};
    auto l = BuildPagedBatchLayout(seqs, ps, 10);
    ASSERT_TRUE(l.ok()) << l.status();
    written.insert(written.end(), l->slots.begin(), l->slots.end());
    for (int64_t t = 0; t < l->n_tokens; ++t) {
      for (int64_t j = 0; j < l->seq_lens[t]; ++j) {
        const int64_t page = l->block_table[t * l->max_pages + j / ps];
        EXPECT_EQ(page * ps + j % ps, written[j]) << "row " << t << " position " << j;
      }
    }
    EXPECT_EQ(l->out_rows, (std::vector<int32_t>{static_cast<int32_t>(n - 1)}));
    cached += n;
  }
}

TEST(PagedBatch, RefusesUncoveredOrForeignPages) {
  const std::vector<int32_t> one = {0}, bad = {0, 12};
  EXPECT_FALSE(BuildPagedBatchLayout(std::vector<PagedSequence>{{one, 3, 2, false}}, 4, 8).ok());
  EXPECT_FALSE(BuildPagedBatchLayout(std::vector<PagedSequence>{{bad, 3, 2, false}}, 4, 8).ok());
  EXPECT_FALSE(BuildPagedBatchLayout(std::vector<PagedSequence>{{one, 0, 0, false}}, 4, 8).ok());
  EXPECT_TRUE(BuildPagedBatchLayout(std::vector<PagedSequence>{{bad, 3, 1, false}}, 4, 8).ok());
}

}  // namespace
}  // namespace expertmesh
