#include "gateway/admission.h"

#include <algorithm>

#include "gateway/strings.h"

namespace expertmesh::gateway {

Admission::Admission(Options options) : options_(options) {}

Admission::Ticket& Admission::Ticket::operator=(Ticket&& other) noexcept {
  if (this != &other) {
    if (owner_ != nullptr) owner_->Release();
    owner_ = std::exchange(other.owner_, nullptr);
  }
  return *this;
}

Admission::Ticket::~Ticket() {
  if (owner_ != nullptr) owner_->Release();
}

absl::StatusOr<Admission::Ticket> Admission::Enter(Clock::time_point deadline,
                                                   const std::function<bool()>& cancelled) {
  std::unique_lock lock(mu_);
  if (closed_) return absl::UnavailableError("The server is shutting down.");
  if (running_ < options_.max_running && queue_.empty()) {
    ++running_;
    return Ticket(this);
  }
  if (queue_.size() >= options_.max_waiting) {
    return absl::ResourceExhaustedError(Cat("The server is at capacity (", running_, " running, ",
                                            queue_.size(), " waiting); retry later."));
  }
  const uint64_t id = next_id_++;
  queue_.push_back(id);
  auto leave_queue = [&] { queue_.erase(std::find(queue_.begin(), queue_.end(), id)); };
  // Waiters wake on every release; with a cancel predicate they also poll it every 50 ms.
  constexpr auto kPoll = std::chrono::milliseconds(50);
  while (true) {
    if (closed_) {
      leave_queue();
      cv_.notify_all();
      return absl::UnavailableError("The server is shutting down.");
    }
    if (queue_.front() == id && running_ < options_.max_running) {
      queue_.pop_front();
      ++running_;
      cv_.notify_all();  // the next waiter may fit too
      return Ticket(this);
    }
    if (cancelled && cancelled()) {
      leave_queue();
      cv_.notify_all();
      return absl::CancelledError("The client went away while the request was queued.");
    }
    const auto now = Clock::now();
    if (now >= deadline) {
      leave_queue();
      cv_.notify_all();
      return absl::DeadlineExceededError("The request's deadline passed while it was queued.");
    }
    cv_.wait_until(lock, cancelled ? std::min(deadline, now + kPoll) : deadline);
  }
}

void Admission::Release() {
  {
    std::lock_guard lock(mu_);
    --running_;
  }
  cv_.notify_all();
}

void Admission::Close() {
  {
    std::lock_guard lock(mu_);
    closed_ = true;
  }
  cv_.notify_all();
}

uint32_t Admission::running() const {
  std::lock_guard lock(mu_);
  return running_;
}

uint32_t Admission::waiting() const {
  std::lock_guard lock(mu_);
  return static_cast<uint32_t>(queue_.size());
}

}  // namespace expertmesh::gateway
