#include "attention-service/kv_block_pool.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/base/check.h"

namespace expertmesh::attention {

absl::StatusOr<std::unique_ptr<KvBlockPool>> KvBlockPool::Create(int64_t n_blocks,
                                                                 int64_t block_size,
                                                                 int64_t n_layers, int64_t slot_dim,
                                                                 bool host_storage) {
  if (n_blocks <= 0 || block_size <= 0 || n_layers <= 0 || slot_dim <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV pool: n_blocks=", n_blocks, " block_size=", block_size,
                     " n_layers=", n_layers, " slot_dim=", slot_dim, " must all be positive"));
  }
  if (n_blocks > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError(absl::StrCat("KV pool: too many blocks: ", n_blocks));
  }
  const double bytes = 4.0 * n_blocks * n_layers * block_size * slot_dim;
  if (host_storage && bytes > 64.0 * (int64_t{1} << 30)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV pool of ", bytes / (1 << 30), " GiB is more than 64 GiB"));
  }
  return std::unique_ptr<KvBlockPool>(
      new KvBlockPool(n_blocks, block_size, n_layers, slot_dim, host_storage));
}

KvBlockPool::KvBlockPool(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t slot_dim,
                         bool host_storage)
    : n_blocks_(n_blocks),
      block_size_(block_size),
      n_layers_(n_layers),
      slot_dim_(slot_dim),
      storage_(host_storage ? static_cast<size_t>(n_blocks * n_layers * block_size * slot_dim) : 0,
               0.0f),
      in_use_(static_cast<size_t>(n_blocks), false) {
  free_list_.reserve(static_cast<size_t>(n_blocks));
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_list_.push_back(static_cast<int32_t>(b));
}

int64_t KvBlockPool::used_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return n_blocks_ - static_cast<int64_t>(free_list_.size());
}

int64_t KvBlockPool::free_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(free_list_.size());
}

std::optional<std::vector<int32_t>> KvBlockPool::Allocate(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  if (n < 0 || n > static_cast<int64_t>(free_list_.size())) return std::nullopt;
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(free_list_.back());
    free_list_.pop_back();
    in_use_[static_cast<size_t>(out.back())] = true;
  }
  return out;
}

void KvBlockPool::Free(std::span<const int32_t> blocks) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int32_t b : blocks) {
    EM_CHECK(b >= 0 && b < n_blocks_ && in_use_[static_cast<size_t>(b)],
             absl::StrCat("KV pool: freeing block ", b, " which is not allocated"));
    in_use_[static_cast<size_t>(b)] = false;
    free_list_.push_back(b);
  }
  // Keep the lowest free id at the back so allocation order does not depend on history.
  std::sort(free_list_.begin(), free_list_.end(), std::greater<int32_t>());
}

}  // namespace expertmesh::attention
