// The delay relay over real loopback sockets: the round trip through it is at least twice the
// one-way delay (both directions are delayed), bytes come through unchanged and in order also
// when the bounded queue makes the reader wait, the end of a stream and a dead upstream reach the
// client, and bad options are refused. Wall-clock bounds here are lower bounds (guaranteed by
// construction) and one generous upper bound.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tools/netdelay/relay.h"

namespace expertmesh::netdelay {
namespace {

std::string Local(uint16_t port) { return "127.0.0.1:" + std::to_string(port); }

int ConnectTo(uint16_t port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
  return fd;
}

TEST(NetDelay, RoundTripCarriesTwiceTheDelay) {
  auto echo = EchoServer::Create("127.0.0.1:0");
  ASSERT_TRUE(echo.ok()) << echo.status();
  RelayOptions o;
  o.listen = "127.0.0.1:0";
  o.connect = Local((*echo)->port());
  o.delay = std::chrono::microseconds(3000);
  auto relay = Relay::Create(o);
  ASSERT_TRUE(relay.ok()) << relay.status();
  auto direct = PingPong(Local((*echo)->port()), 2048, 20, 2);
  ASSERT_TRUE(direct.ok()) << direct.status();
  auto delayed = PingPong(Local((*relay)->port()), 2048, 20, 2);
  ASSERT_TRUE(delayed.ok()) << delayed.status();
  std::vector<double> d = *delayed;
  std::sort(d.begin(), d.end());
  EXPECT_GE(d.front(), 6000.0);                   // 3 ms out + 3 ms back, never less
  EXPECT_LT(d[d.size() / 2], 6000.0 + 100000.0);  // generous: a loaded 2-core machine
  EXPECT_LT(*std::min_element(direct->begin(), direct->end()), 6000.0);
  EXPECT_EQ((*relay)->connections_accepted(), 1);
}

TEST(NetDelay, LargeTransfersSurviveBackPressureInOrder) {
  auto echo = EchoServer::Create("127.0.0.1:0");
  ASSERT_TRUE(echo.ok()) << echo.status();
  RelayOptions o;
  o.listen = "127.0.0.1:0";
  o.connect = Local((*echo)->port());
  o.delay = std::chrono::microseconds(200);
  o.max_queue_bytes = 64 << 10;  // one chunk: the reader waits on nearly every read
  auto relay = Relay::Create(o);
  ASSERT_TRUE(relay.ok()) << relay.status();
  // PingPong compares every reply byte with the (position-dependent) request.
  auto rtt = PingPong(Local((*relay)->port()), 8u << 20, 3, 0);
  ASSERT_TRUE(rtt.ok()) << rtt.status();
  EXPECT_EQ(rtt->size(), 3u);
}

TEST(NetDelay, EndOfStreamPassesAfterTheData) {
  auto echo = EchoServer::Create("127.0.0.1:0");
  ASSERT_TRUE(echo.ok()) << echo.status();
  RelayOptions o;
  o.listen = "127.0.0.1:0";
  o.connect = Local((*echo)->port());
  o.delay = std::chrono::microseconds(1000);
  auto relay = Relay::Create(o);
  ASSERT_TRUE(relay.ok()) << relay.status();
  const int fd = ConnectTo((*relay)->port());
  const std::string msg = "all of this, then the end";
  ASSERT_EQ(write(fd, msg.data(), msg.size()), static_cast<ssize_t>(msg.size()));
  shutdown(fd, SHUT_WR);
  std::string got;
  char buf[256];
  for (ssize_t r; (r = read(fd, buf, sizeof buf)) > 0;) got.append(buf, r);
  EXPECT_EQ(got, msg);  // read() returned 0: the echo's end of stream came back
  close(fd);
}

TEST(NetDelay, DeadUpstreamClosesTheClient) {
  uint16_t dead_port = 0;
  {
    auto echo = EchoServer::Create("127.0.0.1:0");
    ASSERT_TRUE(echo.ok());
    dead_port = (*echo)->port();
  }  // closed: nothing listens there now
  RelayOptions o;
  o.listen = "127.0.0.1:0";
  o.connect = Local(dead_port);
  auto relay = Relay::Create(o);
  ASSERT_TRUE(relay.ok()) << relay.status();
  const int fd = ConnectTo((*relay)->port());
  char c;
  EXPECT_LE(read(fd, &c, 1), 0);
  close(fd);
  EXPECT_FALSE(PingPong(Local((*relay)->port()), 16, 1, 0).ok());
}

TEST(NetDelay, BadOptionsAreRefused) {
  RelayOptions o;
  o.listen = "127.0.0.1:0";
  o.connect = "nowhere";
  EXPECT_EQ(Relay::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.connect = "127.0.0.1:70000";
  EXPECT_EQ(Relay::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.connect = "127.0.0.1:1";
  o.listen = "example:1";
  EXPECT_EQ(Relay::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.listen = "127.0.0.1:0";
  o.delay = std::chrono::microseconds(-1);
  EXPECT_EQ(Relay::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.delay = std::chrono::microseconds(0);
  o.max_queue_bytes = 100;
  EXPECT_EQ(Relay::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PingPong("127.0.0.1:1", 0, 1, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace expertmesh::netdelay
