#include "core/kernels/plan/paged_batch.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace expertmesh {

absl::StatusOr<PagedBatchLayout> BuildPagedBatchLayout(std::span<const PagedSequence> seqs,
                                                       int64_t page_size, int64_t n_pages) {
  if (page_size < 1) return absl::InvalidArgumentError("paged batch: page_size < 1");
  PagedBatchLayout l;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const PagedSequence& s = seqs[i];
    const int64_t needed = (s.start + s.n + page_size - 1) / page_size;
    if (s.n < 1 || s.start < 0 || needed > std::ssize(s.pages)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("paged batch: sequence %d: %d + %d tokens need %d pages of %d, it has %d",
                          i, s.start, s.n, needed, page_size, s.pages.size()));
    }
    for (int64_t p = 0; p < needed; ++p) {
      if (s.pages[p] < 0 || s.pages[p] >= n_pages) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "paged batch: sequence %d: page id %d outside [0, %d)", i, s.pages[p], n_pages));
      }
    }
    l.max_pages = std::max(l.max_pages, needed);
    l.n_tokens += s.n;
  }
  const int64_t T = l.n_tokens, P = l.max_pages;
  l.positions.resize(T);
  l.seq_lens.resize(T);
  l.slots.resize(T);
  l.block_table.assign(T * P, 0);
  int64_t t = 0;
  for (const PagedSequence& s : seqs) {
    const int64_t needed = (s.start + s.n + page_size - 1) / page_size;
    for (int64_t i = 0; i < s.n; ++i, ++t) {
      const int64_t pos = s.start + i;
      l.positions[t] = static_cast<int32_t>(pos);
      l.seq_lens[t] = static_cast<int32_t>(pos + 1);
      l.slots[t] = int64_t{s.pages[pos / page_size]} * page_size + pos % page_size;
      std::copy_n(s.pages.begin(), needed, l.block_table.begin() + t * P);
      if (s.all_logits || i == s.n - 1) l.out_rows.push_back(static_cast<int32_t>(t));
    }
  }
  return l;
}

}  // namespace expertmesh
