#include "attention-service/kv_block_pool.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/base/check.h"

namespace expertmesh::attention {

absl::StatusOr<std::unique_ptr<KvBlockPool>> KvBlockPool::Create(int64_t n_blocks,
                                                                 int64_t block_size,
                                                                 int64_t n_layers, int64_t slot_dim,
                                                                 bool host_storage,
                                                                 int64_t mtp_layers) {
  if (n_blocks <= 0 || block_size <= 0 || n_layers <= 0 || slot_dim <= 0 || mtp_layers < 0 ||
      mtp_layers > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV pool: n_blocks=", n_blocks, " block_size=", block_size, " n_layers=", n_layers,
        " slot_dim=", slot_dim, " must all be positive, mtp_layers=", mtp_layers, " 0 or 1"));
  }
  if (n_blocks > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError(absl::StrCat("KV pool: too many blocks: ", n_blocks));
  }
  const double bytes = 4.0 * n_blocks * (n_layers + mtp_layers) * block_size * slot_dim;
  if (host_storage && bytes > 64.0 * (int64_t{1} << 30)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV pool of ", bytes / (1 << 30), " GiB is more than 64 GiB"));
  }
  return std::unique_ptr<KvBlockPool>(
      new KvBlockPool(n_blocks, block_size, n_layers, slot_dim, host_storage, mtp_layers));
}

KvBlockPool::KvBlockPool(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t slot_dim,
                         bool host_storage, int64_t mtp_layers)
    : n_blocks_(n_blocks),
      block_size_(block_size),
      n_layers_(n_layers),
      slot_dim_(slot_dim),
      mtp_layers_(mtp_layers),
      storage_(host_storage ? static_cast<size_t>(n_blocks * n_layers * block_size * slot_dim) : 0,
               0.0f),
      mtp_storage_(host_storage && mtp_layers > 0
                       ? static_cast<size_t>(n_blocks * block_size * slot_dim)
                       : 0,
                   0.0f),
      refs_(static_cast<size_t>(n_blocks), 0),
      lru_pos_(static_cast<size_t>(n_blocks)),
      in_lru_(static_cast<size_t>(n_blocks), false),
      registered_(static_cast<size_t>(n_blocks), false),
      hash_(static_cast<size_t>(n_blocks), 0),
      mtp_next_(static_cast<size_t>(n_blocks), -1) {
  free_list_.reserve(static_cast<size_t>(n_blocks));
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_list_.push_back(static_cast<int32_t>(b));
}

int64_t KvBlockPool::used_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_;
}

int64_t KvBlockPool::free_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(free_list_.size() + lru_.size());
}

int64_t KvBlockPool::cached_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(by_hash_.size());
}

int64_t KvBlockPool::shared_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return shared_;
}

void KvBlockPool::DropRegistrationLocked(int32_t block) {
  const size_t b = static_cast<size_t>(block);
  if (!registered_[b]) return;
  by_hash_.erase(hash_[b]);
  registered_[b] = false;
  mtp_next_[b] = -1;
}

std::optional<std::vector<int32_t>> KvBlockPool::Allocate(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  if (n < 0 || n > static_cast<int64_t>(free_list_.size() + lru_.size())) return std::nullopt;
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    int32_t b;
    if (!free_list_.empty()) {
      b = free_list_.back();
      free_list_.pop_back();
    } else {  // evict the least recently released cached block
      b = lru_.front();
      lru_.pop_front();
      in_lru_[static_cast<size_t>(b)] = false;
      DropRegistrationLocked(b);
    }
    refs_[static_cast<size_t>(b)] = 1;
    ++used_;
    out.push_back(b);
  }
  return out;
}

void KvBlockPool::Free(std::span<const int32_t> blocks) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int32_t block : blocks) {
    EM_CHECK(block >= 0 && block < n_blocks_ && refs_[static_cast<size_t>(block)] > 0,
             absl::StrCat("KV pool: freeing block ", block, " which is not allocated"));
    const size_t b = static_cast<size_t>(block);
    if (refs_[b] == 2) --shared_;
    if (--refs_[b] > 0) continue;
    --used_;
    if (registered_[b]) {
      lru_pos_[b] = lru_.insert(lru_.end(), block);
      in_lru_[b] = true;
    } else {
      // Keep the lowest free id at the back so allocation order does not depend on history.
      free_list_.insert(
          std::lower_bound(free_list_.begin(), free_list_.end(), block, std::greater<int32_t>()),
          block);
    }
  }
}

bool KvBlockPool::MtpRowsValid(int32_t block, int32_t next) const {
  std::lock_guard<std::mutex> lock(mu_);
  return block >= 0 && block < n_blocks_ && mtp_next_[static_cast<size_t>(block)] == next;
}

std::optional<int32_t> KvBlockPool::Acquire(uint64_t hash) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return std::nullopt;
  const int32_t block = it->second;
  const size_t b = static_cast<size_t>(block);
  if (in_lru_[b]) {
    lru_.erase(lru_pos_[b]);
    in_lru_[b] = false;
  }
  if (refs_[b] == 0) ++used_;
  if (refs_[b] == 1) ++shared_;
  ++refs_[b];
  return block;
}

void KvBlockPool::Register(int32_t block, uint64_t hash, std::optional<int32_t> mtp_next) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t b = static_cast<size_t>(block);
  EM_CHECK(block >= 0 && block < n_blocks_ && refs_[b] > 0,
           absl::StrCat("KV pool: registering block ", block, " which is not held"));
  if (!registered_[b]) {
    if (by_hash_.contains(hash)) return;  // the same prefix is cached in another block
    registered_[b] = true;
    hash_[b] = hash;
    by_hash_[hash] = block;
  }
  if (hash_[b] == hash && mtp_next.has_value() && mtp_layers_ > 0) mtp_next_[b] = *mtp_next;
}

uint64_t KvBlockPool::ChainHash(uint64_t previous, std::span<const int32_t> tokens) {
  // splitmix64 over the previous hash and each token: 64 bits, deterministic across runs.
  auto mix = [](uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  };
  uint64_t h = mix(previous ^ 0x51ed27071bd9e4d3ULL);
  for (int32_t t : tokens) h = mix(h ^ static_cast<uint32_t>(t));
  return h;
}

}  // namespace expertmesh::attention
