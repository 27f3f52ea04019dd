// Admission control by capacity. At most `max_running` requests generate at once; the others
// wait in a queue sized in tokens (each waiter costs its prompt tokens + max_tokens; at most
// `max_waiting_tokens` in all) and, to bound memory, in requests (`max_waiting`). A request
// that does not fit is refused at once with RESOURCE_EXHAUSTED (HTTP 429) carrying a
// Retry-After estimated from the recent drain rate (api_error.h: RetryAfterSeconds).
//
// The queue is ordered by priority (lower value first, as vLLM's `priority`), then fairly
// between clients at equal priority: each client's k-th waiting request gets round k
// (start-time fair queuing), and waiters go by (priority, round, arrival). One client with 900
// waiting requests therefore delays another client's single request by at most one of its
// own, whatever the order of arrival. A slot freed by a Ticket goes to the queue's head.
//
// A request alone larger than `max_waiting_tokens` still waits when the queue is empty (else
// it could never run). Waiting is bounded by the caller's deadline; the clock is injectable
// for the drain-rate estimate (tests).
#pragma once

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "absl/status/statusor.h"

namespace expertmesh::gateway {

class Admission {
 public:
  using Clock = std::chrono::steady_clock;
  struct Options {
    uint32_t max_running = 64;
    // Requests waiting at most (a memory bound; the token bound below is the one that binds
    // in normal use).
    uint32_t max_waiting = 4096;
    // Prompt + max_tokens of the waiting requests at most. 2^20: what one replica serving
    // ~1,750 tokens/s drains within the default 600 s request timeout (docs/ARCHITECTURE.md).
    uint64_t max_waiting_tokens = uint64_t{1} << 20;
    // The clock of the drain-rate estimate; null = Clock::now.
    std::function<Clock::time_point()> now;
  };

  // What admission needs to know of a request.
  struct Entry {
    int32_t priority = 0;  // lower first
    uint64_t tokens = 1;   // prompt tokens + max_tokens
    std::string client;    // fair-share key (API key or peer address)
  };

  explicit Admission(Options options);

  class Ticket {
   public:
    Ticket() = default;
    Ticket(Ticket&& other) noexcept
        : owner_(std::exchange(other.owner_, nullptr)), tokens_(other.tokens_) {}
    Ticket& operator=(Ticket&& other) noexcept;
    ~Ticket();
    bool held() const { return owner_ != nullptr; }

   private:
    friend class Admission;
    Ticket(Admission* owner, uint64_t tokens) : owner_(owner), tokens_(tokens) {}
    Admission* owner_ = nullptr;
    uint64_t tokens_ = 0;
  };

  // A running slot, after waiting in the queue if needed. RESOURCE_EXHAUSTED (with a
  // Retry-After payload) when the queue is full, DEADLINE_EXCEEDED when `deadline` passes
  // first, CANCELLED when `cancelled` (polled every 50 ms while waiting) turns true,
  // UNAVAILABLE after Close().
  absl::StatusOr<Ticket> Enter(const Entry& entry, Clock::time_point deadline,
                               const std::function<bool()>& cancelled = nullptr);
  absl::StatusOr<Ticket> Enter(Clock::time_point deadline,
                               const std::function<bool()>& cancelled = nullptr) {
    return Enter(Entry{}, deadline, cancelled);
  }

  // Refuses every later Enter (UNAVAILABLE) and wakes the waiters; running tickets stay valid.
  void Close();

  uint32_t running() const;
  uint32_t waiting() const;
  uint64_t waiting_tokens() const;
  // Seconds a refused request should wait before retrying: the time the recent drain rate
  // (tickets released over the last kRateWindowS seconds) needs to free the room it lacks;
  // kUnknownRetryS when nothing was released recently; within [1, kMaxRetryS].
  int RetryAfterSeconds(uint64_t tokens) const;

  static constexpr int kRateWindowS = 10;
  static constexpr int kUnknownRetryS = 5;
  static constexpr int kMaxRetryS = 600;

 private:
  struct Waiter {
    int32_t priority = 0;
    uint64_t round = 0;
    uint64_t seq = 0;
    uint64_t tokens = 0;
    std::string client;
    bool granted = false;
    std::condition_variable cv;
  };
  struct Before {
    bool operator()(const Waiter* a, const Waiter* b) const {
      return std::tie(a->priority, a->round, a->seq) < std::tie(b->priority, b->round, b->seq);
    }
  };
  struct Level {                // the fair-queuing state of one priority
    uint64_t served_round = 0;  // round of the last waiter granted at this priority
    uint32_t waiting = 0;
    std::map<std::string, std::pair<uint64_t, uint32_t>> clients;  // last round, waiting
  };
  struct Bucket {  // releases in one second of the clock
    int64_t second = -1;
    uint64_t requests = 0;
    uint64_t tokens = 0;
  };

  Clock::time_point Now() const { return options_.now ? options_.now() : Clock::now(); }
  void Release(uint64_t tokens);
  void Dispatch();         // grants slots to the queue's head while there is room
  void Remove(Waiter* w);  // out of the queue and its level's accounting
  int RetryAfterLocked(uint64_t tokens) const;

  const Options options_;
  const Clock::time_point epoch_;
  mutable std::mutex mu_;
  uint32_t running_ = 0;
  std::set<Waiter*, Before> queue_;
  std::map<int32_t, Level> levels_;
  uint64_t queued_tokens_ = 0;
  uint64_t next_seq_ = 0;
  bool closed_ = false;
  std::array<Bucket, kRateWindowS> released_{};
  Clock::time_point first_release_{};
  bool any_release_ = false;
};

}  // namespace expertmesh::gateway
