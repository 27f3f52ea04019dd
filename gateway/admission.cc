#include "gateway/admission.h"

#include <algorithm>
#include <cmath>

#include "gateway/api_error.h"
#include "gateway/strings.h"

namespace expertmesh::gateway {

Admission::Admission(Options options) : options_(std::move(options)), epoch_(Now()) {}

Admission::Ticket& Admission::Ticket::operator=(Ticket&& other) noexcept {
  if (this != &other) {
    if (owner_ != nullptr) owner_->Release(tokens_);
    owner_ = std::exchange(other.owner_, nullptr);
    tokens_ = other.tokens_;
  }
  return *this;
}

Admission::Ticket::~Ticket() {
  if (owner_ != nullptr) owner_->Release(tokens_);
}

absl::StatusOr<Admission::Ticket> Admission::Enter(const Entry& entry, Clock::time_point deadline,
                                                   const std::function<bool()>& cancelled) {
  const uint64_t tokens = std::max<uint64_t>(entry.tokens, 1);
  std::unique_lock lock(mu_);
  if (closed_) return absl::UnavailableError("The server is shutting down.");
  if (running_ < options_.max_running && queue_.empty()) {
    ++running_;
    return Ticket(this, tokens);
  }
  const bool count_full = queue_.size() >= options_.max_waiting;
  const bool tokens_full = !queue_.empty() && queued_tokens_ + tokens > options_.max_waiting_tokens;
  if (count_full || tokens_full) {
    const int retry = RetryAfterLocked(tokens);
    return WithRetryAfter(
        absl::ResourceExhaustedError(Cat(
            "The server is at capacity (", running_, " running, ", queue_.size(), " waiting with ",
            queued_tokens_, " tokens; the queue holds ", options_.max_waiting, " requests and ",
            options_.max_waiting_tokens, " tokens); retry after ", retry, " s.")),
        retry);
  }

  Waiter w;
  w.priority = entry.priority;
  w.tokens = tokens;
  w.client = entry.client;
  w.seq = next_seq_++;
  Level& level = levels_[w.priority];
  auto [it, fresh] = level.clients.try_emplace(w.client, 0, 0);
  w.round = std::max(level.served_round + 1, fresh ? 0 : it->second.first + 1);
  it->second.first = w.round;
  ++it->second.second;
  ++level.waiting;
  queued_tokens_ += tokens;
  queue_.insert(&w);
  Dispatch();  // a slot may be free (the queue was not empty when this one came)

  // The waiter is woken by Dispatch (granted), by Close, or polls the cancel predicate.
  constexpr auto kPoll = std::chrono::milliseconds(50);
  while (true) {
    if (w.granted) return Ticket(this, tokens);
    if (closed_) {
      Remove(&w);
      return absl::UnavailableError("The server is shutting down.");
    }
    if (cancelled && cancelled()) {
      Remove(&w);
      return absl::CancelledError("The client went away while the request was queued.");
    }
    const auto now = Clock::now();
    if (now >= deadline) {
      Remove(&w);
      return absl::DeadlineExceededError("The request's deadline passed while it was queued.");
    }
    w.cv.wait_until(lock, cancelled ? std::min(deadline, now + kPoll) : deadline);
  }
}

void Admission::Remove(Waiter* w) {
  queue_.erase(w);
  queued_tokens_ -= w->tokens;
  auto level = levels_.find(w->priority);
  auto client = level->second.clients.find(w->client);
  if (--client->second.second == 0) level->second.clients.erase(client);
  if (--level->second.waiting == 0) levels_.erase(level);
}

void Admission::Dispatch() {
  while (running_ < options_.max_running && !queue_.empty()) {
    Waiter* w = *queue_.begin();
    auto level = levels_.find(w->priority);
    level->second.served_round = std::max(level->second.served_round, w->round);
    Remove(w);
    w->granted = true;
    ++running_;
    w->cv.notify_one();
  }
}

void Admission::Release(uint64_t tokens) {
  std::lock_guard lock(mu_);
  --running_;
  const auto now = Now();
  const int64_t second = std::chrono::duration_cast<std::chrono::seconds>(now - epoch_).count();
  Bucket& b = released_[static_cast<size_t>(second % kRateWindowS)];
  if (b.second != second) b = Bucket{second, 0, 0};
  ++b.requests;
  b.tokens += tokens;
  if (!any_release_) {
    any_release_ = true;
    first_release_ = now;
  }
  Dispatch();
}

int Admission::RetryAfterSeconds(uint64_t tokens) const {
  std::lock_guard lock(mu_);
  return RetryAfterLocked(tokens);
}

int Admission::RetryAfterLocked(uint64_t tokens) const {
  const auto now = Now();
  const int64_t second = std::chrono::duration_cast<std::chrono::seconds>(now - epoch_).count();
  uint64_t requests = 0, released_tokens = 0;
  for (const Bucket& b : released_) {
    if (b.second >= 0 && b.second > second - kRateWindowS) {
      requests += b.requests;
      released_tokens += b.tokens;
    }
  }
  if (requests == 0) return kUnknownRetryS;
  // The window the buckets cover: the last kRateWindowS seconds, or less since the first
  // release; at least one second.
  const double span = std::clamp(std::chrono::duration<double>(now - first_release_).count(), 1.0,
                                 static_cast<double>(kRateWindowS));
  const double request_rate = static_cast<double>(requests) / span;
  const double token_rate = static_cast<double>(released_tokens) / span;
  const double lack_requests =
      static_cast<double>(queue_.size() + 1) - static_cast<double>(options_.max_waiting);
  const double lack_tokens = static_cast<double>(queued_tokens_ + tokens) -
                             static_cast<double>(options_.max_waiting_tokens);
  double seconds = 0.0;
  if (lack_requests > 0) seconds = std::max(seconds, lack_requests / request_rate);
  if (lack_tokens > 0) seconds = std::max(seconds, lack_tokens / token_rate);
  return static_cast<int>(std::clamp(std::ceil(seconds), 1.0, static_cast<double>(kMaxRetryS)));
}

void Admission::Close() {
  std::lock_guard lock(mu_);
  closed_ = true;
  for (Waiter* w : queue_) w->cv.notify_one();
}

uint32_t Admission::running() const {
  std::lock_guard lock(mu_);
  return running_;
}

uint32_t Admission::waiting() const {
  std::lock_guard lock(mu_);
  return static_cast<uint32_t>(queue_.size());
}

uint64_t Admission::waiting_tokens() const {
  std::lock_guard lock(mu_);
  return queued_tokens_;
}

}  // namespace expertmesh::gateway
