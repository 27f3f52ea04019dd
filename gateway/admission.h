// Admission control: at most `max_running` requests generate at once; up to `max_waiting`
// more wait in a FIFO queue for a slot (until their deadline); beyond that a request is
// refused at once with RESOURCE_EXHAUSTED (HTTP 429 with Retry-After). A Ticket releases its
// slot when destroyed, so no path can leak one. Time is taken from the deadline the caller
// passes; the queue itself reads no clock.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <utility>

#include "absl/status/statusor.h"

namespace expertmesh::gateway {

class Admission {
 public:
  struct Options {
    uint32_t max_running = 64;
    uint32_t max_waiting = 64;
  };
  using Clock = std::chrono::steady_clock;

  explicit Admission(Options options);

  class Ticket {
   public:
    Ticket() = default;
    Ticket(Ticket&& other) noexcept : owner_(std::exchange(other.owner_, nullptr)) {}
    Ticket& operator=(Ticket&& other) noexcept;
    ~Ticket();
    bool held() const { return owner_ != nullptr; }

   private:
    friend class Admission;
    explicit Ticket(Admission* owner) : owner_(owner) {}
    Admission* owner_ = nullptr;
  };

  // A running slot, after waiting in the queue if needed. RESOURCE_EXHAUSTED when the queue
  // is full, DEADLINE_EXCEEDED when `deadline` passes first, CANCELLED when `cancelled`
  // (polled while waiting) turns true or Close() was called.
  absl::StatusOr<Ticket> Enter(Clock::time_point deadline,
                               const std::function<bool()>& cancelled = nullptr);

  // Refuses every later Enter (UNAVAILABLE) and wakes the waiters; running tickets stay valid.
  void Close();

  uint32_t running() const;
  uint32_t waiting() const;

 private:
  void Release();

  const Options options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint32_t running_ = 0;
  std::deque<uint64_t> queue_;  // waiters' ids, FIFO
  uint64_t next_id_ = 0;
  bool closed_ = false;
};

}  // namespace expertmesh::gateway
