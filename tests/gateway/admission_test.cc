// Admission: slots, the queue bounded in tokens and in requests, refusal beyond it with a
// Retry-After from the drain rate, priority order, fairness between clients, deadlines,
// cancellation, close.
#include "gateway/admission.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gateway/api_error.h"
#include "gtest/gtest.h"
#include "tests/common/poll.h"

namespace expertmesh::gateway {
namespace {

using Clock = Admission::Clock;
const Clock::time_point kFar = Clock::now() + std::chrono::hours(1);

Admission::Options Opts(uint32_t running, uint32_t waiting, uint64_t tokens) {
  return Admission::Options{
      .max_running = running, .max_waiting = waiting, .max_waiting_tokens = tokens, .now = nullptr};
}

bool WaitingIs(const Admission& a, uint32_t n) {
  return expertmesh::testing::PollUntil([&] { return a.waiting() == n; }, absl::Seconds(30),
                                        absl::Milliseconds(1));
}

// Waiters in threads that record the order they got their slot in and give it back at once.
class Waiters {
 public:
  explicit Waiters(Admission& a) : a_(a) {}
  ~Waiters() { Join(); }
  void Add(std::string name, Admission::Entry entry) {
    const uint32_t before = a_.waiting();
    threads_.emplace_back([this, name, entry] {
      auto t = a_.Enter(entry, kFar);
      EXPECT_TRUE(t.ok()) << name << ": " << t.status();
      std::lock_guard lock(mu_);
      order_.push_back(name);
    });
    ASSERT_TRUE(WaitingIs(a_, before + 1)) << name;  // queued in this order
  }
  std::vector<std::string> Join() {
    for (std::thread& t : threads_) t.join();
    threads_.clear();
    return order_;
  }

 private:
  Admission& a_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::vector<std::string> order_;
};

TEST(Admission, QueueThenRefuseByCount) {
  Admission a(Opts(2, 1, 1 << 20));
  auto t1 = a.Enter(kFar);
  auto t2 = a.Enter(kFar);
  ASSERT_TRUE(t1.ok() && t2.ok());
  EXPECT_EQ(a.running(), 2u);

  std::atomic<bool> third_in{false};
  std::thread waiter([&] {
    auto t3 = a.Enter(kFar);
    ASSERT_TRUE(t3.ok()) << t3.status();
    third_in = true;
  });
  ASSERT_TRUE(WaitingIs(a, 1));

  auto refused = a.Enter(kFar);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_GE(RetryAfterOf(refused.status()), 1);

  *t1 = Admission::Ticket();  // releases a slot: the waiter takes it
  waiter.join();
  EXPECT_TRUE(third_in);
  EXPECT_EQ(a.waiting(), 0u);
  EXPECT_EQ(a.running(), 1u);  // t2 held; the waiter's ticket was dropped when it returned
}

TEST(Admission, TheQueueIsSizedInTokens) {
  // 1 running; the queue takes 100 tokens: a burst of 10 x 10 waits, the 11th is refused
  // (although the count bound, 1000, is far), and a small one that still fits is taken.
  Admission a(Opts(1, 1000, 100));
  auto held = a.Enter(kFar);
  ASSERT_TRUE(held.ok());
  std::vector<std::thread> threads;
  std::atomic<int> served{0};
  for (int i = 0; i < 9; ++i) {
    threads.emplace_back([&] {
      if (a.Enter({.priority = 0, .tokens = 10, .client = "c"}, kFar).ok()) ++served;
    });
  }
  ASSERT_TRUE(WaitingIs(a, 9));
  EXPECT_EQ(a.waiting_tokens(), 90u);
  auto big = a.Enter({.priority = 0, .tokens = 11, .client = "c"}, kFar);
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(std::string(big.status().message()).find("100 tokens"), std::string::npos)
      << big.status();
  EXPECT_EQ(ToApiError(big.status()).http_status, 429);
  EXPECT_GE(ToApiError(big.status()).retry_after_s, 1);
  threads.emplace_back([&] {
    if (a.Enter({.priority = 0, .tokens = 10, .client = "c"}, kFar).ok()) ++served;
  });
  ASSERT_TRUE(WaitingIs(a, 10));
  EXPECT_EQ(a.waiting_tokens(), 100u);
  EXPECT_EQ(a.Enter({.priority = -5, .tokens = 1, .client = "d"}, kFar).status().code(),
            absl::StatusCode::kResourceExhausted);  // full, whatever the priority
  *held = Admission::Ticket();
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(served.load(), 10);
  EXPECT_EQ(a.waiting_tokens(), 0u);
  EXPECT_EQ(a.running(), 0u);
}

TEST(Admission, ARequestLargerThanTheQueueWaitsWhenTheQueueIsEmpty) {
  Admission a(Opts(1, 10, 100));
  auto held = a.Enter(kFar);
  ASSERT_TRUE(held.ok());
  std::thread big(
      [&] { EXPECT_TRUE(a.Enter({.priority = 0, .tokens = 5000, .client = "c"}, kFar).ok()); });
  ASSERT_TRUE(WaitingIs(a, 1));
  EXPECT_EQ(a.Enter({.priority = 0, .tokens = 1, .client = "c"}, kFar).status().code(),
            absl::StatusCode::kResourceExhausted);
  *held = Admission::Ticket();
  big.join();
}

TEST(Admission, PriorityOrderThenArrival) {
  Admission a(Opts(1, 100, 1 << 20));
  auto held = a.Enter(kFar);
  ASSERT_TRUE(held.ok());
  Waiters w(a);
  w.Add("p5-a", {.priority = 5, .tokens = 1, .client = "x"});
  w.Add("p0-a", {.priority = 0, .tokens = 1, .client = "x"});
  w.Add("p5-b", {.priority = 5, .tokens = 1, .client = "x"});
  w.Add("pm3", {.priority = -3, .tokens = 1, .client = "x"});
  w.Add("p0-b", {.priority = 0, .tokens = 1, .client = "x"});
  *held = Admission::Ticket();
  EXPECT_EQ(w.Join(), (std::vector<std::string>{"pm3", "p0-a", "p0-b", "p5-a", "p5-b"}));
}

TEST(Admission, ClientsShareFairlyAtEqualPriority) {
  Admission a(Opts(1, 100, 1 << 20));
  auto held = a.Enter(kFar);
  ASSERT_TRUE(held.ok());
  Waiters w(a);
  for (int i = 0; i < 6; ++i) w.Add("A" + std::to_string(i), {.priority = 0, .client = "A"});
  w.Add("B0", {.priority = 0, .client = "B"});
  w.Add("C0", {.priority = 0, .client = "C"});
  w.Add("B1", {.priority = 0, .client = "B"});
  *held = Admission::Ticket();
  // Round-robin by client in order of their first arrival within each round.
  EXPECT_EQ(w.Join(),
            (std::vector<std::string>{"A0", "B0", "C0", "A1", "B1", "A2", "A3", "A4", "A5"}));
}

TEST(Admission, ALateClientIsNotStarvedByABacklog) {
  // A client with 20 queued, one slot; after 3 of them ran, client B's single request comes
  // and runs next but one (behind at most one of A's), not behind the 17 left.
  Admission a(Opts(1, 100, 1 << 20));
  auto held = a.Enter(kFar);
  ASSERT_TRUE(held.ok());
  std::mutex mu;
  std::vector<std::string> order;
  std::vector<std::thread> threads;
  auto add = [&](const std::string& name, const std::string& client, bool hold_on) {
    const uint32_t before = a.waiting();
    threads.emplace_back([&, name, client, hold_on] {
      auto t = a.Enter({.priority = 0, .tokens = 1, .client = client}, kFar);
      ASSERT_TRUE(t.ok());
      {
        std::lock_guard lock(mu);
        order.push_back(name);
      }
      if (hold_on) {  // A2 keeps its slot until B is queued
        ASSERT_TRUE(WaitingIs(a, 17 + 1));
      }
    });
    ASSERT_TRUE(WaitingIs(a, before + 1));
  };
  for (int i = 0; i < 20; ++i) add("A" + std::to_string(i), "A", i == 2);
  *held = Admission::Ticket();
  // A0, A1 ran, A2 holds the slot with 17 of A's queued.
  ASSERT_TRUE(WaitingIs(a, 17));
  threads.emplace_back([&] {
    auto t = a.Enter({.priority = 0, .tokens = 1, .client = "B"}, kFar);
    ASSERT_TRUE(t.ok());
    std::lock_guard lock(mu);
    order.push_back("B");
  });
  for (std::thread& t : threads) t.join();
  ASSERT_EQ(order.size(), 21u);
  const auto b = std::find(order.begin(), order.end(), "B") - order.begin();
  EXPECT_LE(b, 4) << "B ran at position " << b;
}

TEST(Admission, RetryAfterFollowsTheDrainRate) {
  auto now = std::make_shared<Clock::time_point>(Clock::now());
  Admission::Options o = Opts(1, 1000, 100);
  o.now = [now] { return *now; };
  Admission a(o);
  EXPECT_EQ(a.RetryAfterSeconds(10), Admission::kUnknownRetryS);  // nothing drained yet
  // 10 requests of 10 tokens released over 5 s: 20 tokens/s.
  for (int i = 0; i < 10; ++i) {
    auto t = a.Enter({.priority = 0, .tokens = 10, .client = "c"}, kFar);
    ASSERT_TRUE(t.ok());
    *now += std::chrono::milliseconds(500);
  }
  auto held = a.Enter(kFar);
  ASSERT_TRUE(held.ok());
  std::vector<std::thread> threads;
  for (int i = 0; i < 9; ++i) {
    threads.emplace_back(
        [&] { (void)a.Enter({.priority = 0, .tokens = 10, .client = "c"}, kFar); });
  }
  ASSERT_TRUE(WaitingIs(a, 9));  // 90 of 100 tokens
  // 90 + 70 - 100 = 60 tokens lacking at 20 tokens/s: 3 s.
  EXPECT_EQ(a.RetryAfterSeconds(70), 3);
  auto refused = a.Enter({.priority = 0, .tokens = 70, .client = "c"}, kFar);
  EXPECT_EQ(RetryAfterOf(refused.status()), 3);
  EXPECT_EQ(a.RetryAfterSeconds(11), 1);  // at least 1
  *held = Admission::Ticket();
  for (std::thread& t : threads) t.join();
  // Past the window the rate is unknown again.
  *now += std::chrono::seconds(Admission::kRateWindowS + 1);
  EXPECT_EQ(a.RetryAfterSeconds(10), Admission::kUnknownRetryS);
}

TEST(Admission, DeadlineCancelAndClose) {
  Admission a(Opts(1, 4, 1 << 20));
  auto held = a.Enter(kFar);
  ASSERT_TRUE(held.ok());
  auto late = a.Enter(Clock::now());
  EXPECT_EQ(late.status().code(), absl::StatusCode::kDeadlineExceeded);
  auto gone = a.Enter(kFar, [] { return true; });
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(a.waiting(), 0u);
  EXPECT_EQ(a.waiting_tokens(), 0u);

  std::thread waiter([&] {
    auto t = a.Enter(kFar);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kUnavailable);
  });
  ASSERT_TRUE(WaitingIs(a, 1));
  a.Close();
  waiter.join();
  EXPECT_EQ(a.Enter(kFar).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(a.running(), 1u);
  held = absl::StatusOr<Admission::Ticket>(Admission::Ticket());
  EXPECT_EQ(a.running(), 0u);
}

}  // namespace
}  // namespace expertmesh::gateway
