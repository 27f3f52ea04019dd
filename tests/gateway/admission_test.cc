// Admission: slots, the bounded FIFO queue, refusal beyond it, deadlines, cancellation, close.
#include "gateway/admission.h"

#include <atomic>
#include <thread>

#include "gtest/gtest.h"
#include "tests/common/poll.h"

namespace expertmesh::gateway {
namespace {

using Clock = Admission::Clock;
const Clock::time_point kFar = Clock::now() + std::chrono::hours(1);

TEST(Admission, QueueThenRefuse) {
  Admission a({.max_running = 2, .max_waiting = 1});
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
  ASSERT_TRUE(expertmesh::testing::PollUntil([&] { return a.waiting() == 1; }, absl::Seconds(30),
                                             absl::Milliseconds(1)));

  auto refused = a.Enter(kFar);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);

  *t1 = Admission::Ticket();  // releases a slot: the waiter takes it
  waiter.join();
  EXPECT_TRUE(third_in);
  EXPECT_EQ(a.waiting(), 0u);
  EXPECT_EQ(a.running(), 1u);  // t2 held; the waiter's ticket was dropped when it returned
}

TEST(Admission, DeadlineCancelAndClose) {
  Admission a({.max_running = 1, .max_waiting = 4});
  auto held = a.Enter(kFar);
  ASSERT_TRUE(held.ok());
  auto late = a.Enter(Clock::now());
  EXPECT_EQ(late.status().code(), absl::StatusCode::kDeadlineExceeded);
  auto gone = a.Enter(kFar, [] { return true; });
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(a.waiting(), 0u);

  std::thread waiter([&] {
    auto t = a.Enter(kFar);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kUnavailable);
  });
  ASSERT_TRUE(expertmesh::testing::PollUntil([&] { return a.waiting() == 1; }, absl::Seconds(30),
                                             absl::Milliseconds(1)));
  a.Close();
  waiter.join();
  EXPECT_EQ(a.Enter(kFar).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(a.running(), 1u);
  held = absl::StatusOr<Admission::Ticket>(Admission::Ticket());
  EXPECT_EQ(a.running(), 0u);
}

}  // namespace
}  // namespace expertmesh::gateway
