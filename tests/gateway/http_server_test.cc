// The asynchronous HTTP server on loopback, without a cluster: the paths that need no
// generation (/health, /metrics, /v1/models, unknown paths) over raw sockets. Pipelined
// requests are answered in order on one keep-alive connection; a header trickled byte by byte
// is cut at the header deadline (408); the connection cap answers 503 beyond it; hundreds of
// idle connections cost no thread and do not delay /health; a drain closes idle connections.
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "gateway/generation.h"
#include "gateway/http_server.h"
#include "gtest/gtest.h"
#include "service-common/metrics.h"
#include "tests/common/raw_client.h"

namespace expertmesh::gateway {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// The shared raw client, plus the complete HTTP responses it has received (Content-Length
// bodies), for pipelining.
class RawClient : public ::expertmesh::testing::RawClient {
 public:
  using ::expertmesh::testing::RawClient::RawClient;
  // Reads until `count` responses have fully arrived, the server closes, or `timeout` passes.
  // Returns whether the server closed the connection.
  bool Read(milliseconds timeout, int count = 1 << 30) {
    return ::expertmesh::testing::RawClient::Read(
        timeout, [&](const std::string& r) { return Complete(r) >= count; });
  }
  // The status codes of the complete responses received so far, in order.
  std::vector<int> Statuses() const {
    std::vector<int> out;
    Walk(received(), [&](int status) { out.push_back(status); });
    return out;
  }

 private:
  static int Complete(const std::string& received) {
    int n = 0;
    Walk(received, [&](int) { ++n; });
    return n;
  }
  template <typename F>
  static void Walk(const std::string& received, F&& f) {
    size_t pos = 0;
    while (pos + 12 <= received.size()) {
      const size_t end = received.find("\r\n\r\n", pos);
      if (end == std::string::npos) return;
      const std::string head = received.substr(pos, end - pos);
      size_t length = 0;
      const size_t cl = head.find("Content-Length: ");
      if (cl != std::string::npos) length = std::stoul(head.substr(cl + 16));
      if (end + 4 + length > received.size()) return;
      f(std::stoi(head.substr(9, 3)));
      pos = end + 4 + length;
    }
  }
};

int ThreadCount() {
  int n = 0;
  if (DIR* d = ::opendir("/proc/self/task")) {
    while (dirent* e = ::readdir(d)) n += e->d_name[0] != '.' ? 1 : 0;
    ::closedir(d);
  }
  return n;
}

std::string Get(std::string_view path, bool close = false) {
  return std::string("GET ") + std::string(path) + " HTTP/1.1\r\nHost: t\r\n" +
         (close ? "Connection: close\r\n" : "") + "\r\n";
}

class HttpServerTest : public ::testing::Test {
 protected:
  void Start(HttpServer::Options o) {
    o.host = "127.0.0.1";
    ModelCard card;
    card.id = "tiny";
    card.max_context = 64;
    // The paths under test never generate: no tokenizer, attention pool or admission.
    runner_ = std::make_unique<RequestRunner>(nullptr, nullptr, card, nullptr, nullptr, &metrics_,
                                              RequestRunner::Options{});
    absl::StatusOr<std::unique_ptr<HttpServer>> s =
        HttpServer::Start(o, runner_.get(), &metrics_, [] { return absl::OkStatus(); });
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
  }
  int port() const { return server_->port(); }
  bool WaitOpen(int n, milliseconds timeout = milliseconds(5000)) {
    const auto deadline = Clock::now() + timeout;
    while (server_->open_connections() != n) {
      if (Clock::now() > deadline) return false;
      std::this_thread::sleep_for(milliseconds(10));
    }
    return true;
  }

  MetricsRegistry registry_;
  GatewayMetrics metrics_{registry_};
  std::unique_ptr<RequestRunner> runner_;
  std::unique_ptr<HttpServer> server_;
};

TEST_F(HttpServerTest, PipelinedRequestsAreAnsweredInOrderOnOneConnection) {
  Start({});
  RawClient c(port());
  ASSERT_TRUE(c.connected());
  // Three requests in one write, then (after their answers) one that closes.
  ASSERT_TRUE(c.Send(Get("/health") + Get("/nope") + Get("/v1/models")));
  EXPECT_FALSE(c.Read(milliseconds(5000), 3));
  EXPECT_EQ(c.Statuses(), (std::vector<int>{200, 404, 200}));
  EXPECT_NE(c.received().find("\"id\":\"tiny\""), std::string::npos) << c.received();
  // The connection is still open (keep-alive) and serves more, in order, split mid-request.
  const std::string two = Get("/v1/models/other") + Get("/health", true);
  ASSERT_TRUE(c.Send(two.substr(0, 20)));
  std::this_thread::sleep_for(milliseconds(50));
  ASSERT_TRUE(c.Send(two.substr(20)));
  EXPECT_TRUE(c.Read(milliseconds(5000)));  // closed after the Connection: close request
  EXPECT_EQ(c.Statuses(), (std::vector<int>{200, 404, 200, 404, 200}));
}

TEST_F(HttpServerTest, HeaderTrickledByteByByteIsCutAtTheHeaderDeadline) {
  HttpServer::Options o;
  o.header_timeout = milliseconds(600);
  Start(o);
  RawClient c(port());
  ASSERT_TRUE(c.connected());
  const std::string request = Get("/health");
  const auto start = Clock::now();
  // One byte every 50 ms: the whole header would take ~1.3 s; each byte must not extend the
  // deadline. Stop sending once the server has answered (or closed).
  for (char ch : request) {
    if (c.Readable() || !c.Send(std::string_view(&ch, 1))) break;
    std::this_thread::sleep_for(milliseconds(50));
  }
  EXPECT_TRUE(c.Read(milliseconds(5000)));
  const auto took = Clock::now() - start;
  EXPECT_EQ(c.received().substr(0, 12), "HTTP/1.1 408") << c.received();
  EXPECT_LT(took, milliseconds(600 + 2500));
}

TEST_F(HttpServerTest, ConnectionsBeyondTheCapGet503AndTheRestStillServe) {
  HttpServer::Options o;
  o.max_connections = 4;
  Start(o);
  std::vector<std::unique_ptr<RawClient>> held;
  for (int i = 0; i < 4; ++i) {
    held.push_back(std::make_unique<RawClient>(port()));
    ASSERT_TRUE(held.back()->connected());
  }
  ASSERT_TRUE(WaitOpen(4));
  RawClient extra(port());
  ASSERT_TRUE(extra.connected());  // the kernel accepts; the server answers and closes
  EXPECT_TRUE(extra.Read(milliseconds(5000)));
  EXPECT_EQ(extra.received().substr(0, 12), "HTTP/1.1 503") << extra.received();
  // A held connection still serves.
  ASSERT_TRUE(held[0]->Send(Get("/health")));
  held[0]->Read(milliseconds(5000), 1);
  EXPECT_EQ(held[0]->Statuses(), std::vector<int>{200});
  // Once one closes, a new connection is taken again.
  held.pop_back();
  ASSERT_TRUE(WaitOpen(3));
  RawClient next(port());
  ASSERT_TRUE(next.Send(Get("/health", true)));
  EXPECT_TRUE(next.Read(milliseconds(5000)));
  EXPECT_EQ(next.Statuses(), std::vector<int>{200});
}

TEST_F(HttpServerTest, IdleConnectionsCostNoThreadAndHealthStillAnswers) {
  HttpServer::Options o;
  o.io_threads = 2;
  Start(o);
  // Let the server's threads start before counting.
  {
    RawClient warm(port());
    ASSERT_TRUE(warm.Send(Get("/health", true)));
    warm.Read(milliseconds(5000));
  }
  const int threads_before = ThreadCount();
  constexpr int kIdle = 400;
  std::vector<std::unique_ptr<RawClient>> idle;
  for (int i = 0; i < kIdle; ++i) {
    idle.push_back(std::make_unique<RawClient>(port()));
    ASSERT_TRUE(idle.back()->connected()) << i;
    if (i % 2 == 1) {
      ASSERT_TRUE(idle.back()->Send("GET /hea"));  // half a request line
    }
  }
  ASSERT_TRUE(WaitOpen(kIdle));
  EXPECT_LE(ThreadCount(), threads_before);  // no thread per connection
  const auto start = Clock::now();
  RawClient c(port());
  ASSERT_TRUE(c.Send(Get("/health", true)));
  EXPECT_TRUE(c.Read(milliseconds(5000)));
  EXPECT_EQ(c.Statuses(), std::vector<int>{200});
  EXPECT_LT(Clock::now() - start, milliseconds(2000));
  EXPECT_EQ(server_->generation_threads(), 0);
}

TEST_F(HttpServerTest, OversizedBodyGets413AndTheConnectionCloses) {
  HttpServer::Options o;
  o.max_body_bytes = 1024;
  Start(o);
  RawClient c(port());
  ASSERT_TRUE(c.Send("POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 4096\r\n\r\n" +
                     std::string(4096, 'x')));
  EXPECT_TRUE(c.Read(milliseconds(5000)));
  EXPECT_EQ(c.Statuses(), std::vector<int>{413});
}

TEST_F(HttpServerTest, DrainClosesIdleConnectionsAndHealthSays503Meanwhile) {
  Start({});
  RawClient idle(port());
  ASSERT_TRUE(idle.Send(Get("/health")));
  idle.Read(milliseconds(5000), 1);
  ASSERT_EQ(idle.Statuses(), std::vector<int>{200});
  const auto start = Clock::now();
  server_->Drain(milliseconds(5000));
  EXPECT_LT(Clock::now() - start, milliseconds(2000));  // nothing busy: no grace needed
  EXPECT_TRUE(idle.Read(milliseconds(2000)));           // closed by the drain
  EXPECT_EQ(server_->open_connections(), 0);
}

}  // namespace
}  // namespace expertmesh::gateway
