// The gateway's and the attention service's edges against a real cluster on loopback (router,
// one expert shard and the attention service as processes, started by the launcher; the
// gateway in process with short, test-set timeouts): half-sent requests and idle keep-alive
// connections are closed within their deadlines, and /health answers while more half-open
// connections are held than the gateway takes; grpc.health.v1 answers for each service's own
// name and follows SERVING.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <boost/json.hpp>

#include "gateway/gateway_server.h"
#include "gtest/gtest.h"
#include "service-common/grpc_util.h"
#include "tests/common/poll.h"
#include "tests/common/raw_client.h"
#include "tests/gateway/gateway_test_util.h"
#include "tools/launcher/cluster.h"

namespace expertmesh::gateway {
namespace {

using expertmesh::testing::PollUntil;
using testing::HttpRequest;

constexpr auto kHeaderTimeout = std::chrono::milliseconds(1000);
constexpr auto kBodyTimeout = std::chrono::milliseconds(1500);
constexpr auto kIdleTimeout = std::chrono::milliseconds(1200);
constexpr int kMaxConnections = 64;
// How much later than its deadline the server may close (scheduling on a loaded machine).
constexpr auto kSlack = std::chrono::seconds(4);

using Clock = std::chrono::steady_clock;

using ::expertmesh::testing::RawClient;

// The time from now until the server closes `client` (nullopt: not within `limit`).
std::optional<std::chrono::milliseconds> TimeUntilClosed(RawClient& client,
                                                         std::chrono::milliseconds limit) {
  const auto start = Clock::now();
  if (!client.ReadUntilClosed(limit)) return std::nullopt;
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
}

class GatewayConnectionTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> dir = testing::MakeGatewayTestModel();
    ASSERT_TRUE(dir.ok()) << dir.status();
    model_dir_ = new std::string(*dir);
    launcher::ClusterOptions co;
    co.model_dir = *dir;
    co.bin_dir = EXPERTMESH_BINARY_DIR;
    co.shards = 1;
    co.max_batch = 4;
    co.max_waiting = 16;
    absl::StatusOr<std::unique_ptr<launcher::Cluster>> cluster = launcher::Cluster::Start(co);
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    cluster_ = cluster->release();

    GatewayOptions go;
    go.model_dir = *dir;
    go.attention = {cluster_->attention().grpc_address};
    go.http_host = "127.0.0.1";
    go.http_header_timeout = kHeaderTimeout;
    go.http_body_timeout = kBodyTimeout;
    go.http_idle_timeout = kIdleTimeout;
    go.max_connections = kMaxConnections;
    absl::StatusOr<std::unique_ptr<GatewayServer>> gateway = GatewayServer::Create(go);
    ASSERT_TRUE(gateway.ok()) << gateway.status();
    gateway_ = gateway->release();
    ASSERT_TRUE(gateway_->pool().WaitReady(std::chrono::seconds(60)));
  }
  static void TearDownTestSuite() {
    delete gateway_;  // before the cluster it talks to
    gateway_ = nullptr;
    delete cluster_;
    cluster_ = nullptr;
    if (model_dir_ != nullptr) std::filesystem::remove_all(*model_dir_);
    delete model_dir_;
    model_dir_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(cluster_, nullptr);
    ASSERT_NE(gateway_, nullptr);
  }

  int port() const { return gateway_->http_port(); }

  static std::string* model_dir_;
  static launcher::Cluster* cluster_;
  static GatewayServer* gateway_;
};
std::string* GatewayConnectionTest::model_dir_ = nullptr;
launcher::Cluster* GatewayConnectionTest::cluster_ = nullptr;
GatewayServer* GatewayConnectionTest::gateway_ = nullptr;

TEST_F(GatewayConnectionTest, HalfSentRequestLineIsClosedWithinTheHeaderTimeout) {
  RawClient client(port());
  ASSERT_TRUE(client.connected());
  ASSERT_TRUE(client.Send("GET /hea"));
  const auto closed = TimeUntilClosed(client, kHeaderTimeout + kSlack);
  ASSERT_TRUE(closed.has_value()) << "a half-sent request line kept the connection open";
  EXPECT_GE(*closed, kHeaderTimeout / 2);
  // Either closed outright or told why first.
  if (!client.received().empty()) {
    EXPECT_EQ(client.received().substr(0, 12), "HTTP/1.1 408") << client.received();
  }
}

TEST_F(GatewayConnectionTest, HalfSentHeaderIsClosedWithinTheHeaderTimeout) {
  RawClient client(port());
  ASSERT_TRUE(client.connected());
  const auto start = Clock::now();
  ASSERT_TRUE(client.Send("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty"));
  // Trickling more header bytes does not extend the deadline.
  for (int i = 0; i < 3 && !client.ClosedByServer(); ++i) {
    std::this_thread::sleep_for(kHeaderTimeout / 4);
    client.Send("p");
  }
  ASSERT_TRUE(client.ReadUntilClosed(kHeaderTimeout + kSlack));
  EXPECT_LE(Clock::now() - start, kHeaderTimeout + kSlack);
  EXPECT_EQ(client.received().substr(0, 12), "HTTP/1.1 408") << client.received();
  EXPECT_NE(client.received().find("\"error\""), std::string::npos) << client.received();
}

TEST_F(GatewayConnectionTest, HalfSentBodyIsClosedWithinTheBodyTimeout) {
  RawClient client(port());
  ASSERT_TRUE(client.connected());
  ASSERT_TRUE(
      client.Send("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  "Content-Length: 100\r\n\r\n{\"prompt\":"));
  const auto closed = TimeUntilClosed(client, kBodyTimeout + kSlack);
  ASSERT_TRUE(closed.has_value()) << "a half-sent body kept the connection open";
  EXPECT_GE(*closed, kBodyTimeout / 2);
  EXPECT_EQ(client.received().substr(0, 12), "HTTP/1.1 408") << client.received();
}

TEST_F(GatewayConnectionTest, IdleKeepAliveConnectionIsClosedWithinTheIdleTimeout) {
  RawClient client(port());
  ASSERT_TRUE(client.connected());
  ASSERT_TRUE(client.Send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
  ASSERT_FALSE(client.Read(
      std::chrono::seconds(10),
      [](const std::string& r) { return r.find("{\"status\":\"ok\"}") != std::string::npos; }))
      << "closed before answering: " << client.received();
  ASSERT_EQ(client.received().substr(0, 15), "HTTP/1.1 200 OK") << client.received();
  // A second request on the same connection works (keep-alive) ...
  ASSERT_TRUE(client.Send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
  ASSERT_FALSE(client.Read(std::chrono::seconds(10), [](const std::string& r) {
    return r.find("HTTP/1.1 200 OK", 1) != std::string::npos && r.rfind("{\"status\":\"ok\"}") > 20;
  })) << client.received();
  // ... and then nothing: the server closes it, quietly.
  const size_t answered = client.received().size();
  const auto closed = TimeUntilClosed(client, kIdleTimeout + kSlack);
  ASSERT_TRUE(closed.has_value()) << "an idle keep-alive connection stayed open";
  EXPECT_GE(*closed, kIdleTimeout / 2);
  EXPECT_EQ(client.received().size(), answered);
}

// More half-open connections than the gateway takes (kMaxConnections): they used to hold
// every slot forever, so that new clients were reset and /health was unreachable.
TEST_F(GatewayConnectionTest, HealthAnswersWhileManyHalfOpenConnectionsAreHeld) {
  constexpr int kHeld = 3 * kMaxConnections;  // 192
  std::vector<std::unique_ptr<RawClient>> held;
  for (int i = 0; i < kHeld; ++i) {
    held.push_back(std::make_unique<RawClient>(port()));
    ASSERT_TRUE(held.back()->connected()) << i;
    ASSERT_TRUE(
        held.back()->Send(i % 2 == 0 ? "GET /health HT" : "POST /v1/completions HTTP/1.1\r\n"))
        << i;
  }
  // While every one of them is still open on this side, /health answers within the header
  // deadline (plus slack).
  absl::StatusOr<testing::HttpResult> health;
  const bool answered = PollUntil(
      [&] {
        health = HttpRequest(port(), "GET", "/health");
        return health.ok() && health->status == 200;
      },
      absl::FromChrono(kHeaderTimeout + kSlack), absl::Milliseconds(100));
  EXPECT_TRUE(answered) << (health.ok() ? health->body : health.status().ToString());
  // The server closed (or refused) every held connection by itself.
  int closed = 0;
  const auto deadline = Clock::now() + kHeaderTimeout + kSlack;
  for (auto& c : held) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    closed += c->ReadUntilClosed(std::max(left, std::chrono::milliseconds(1))) ? 1 : 0;
  }
  EXPECT_EQ(closed, kHeld);
  held.clear();
  // None left open on the server: only the /metrics request itself.
  EXPECT_TRUE(PollUntil(
      [&] {
        absl::StatusOr<testing::HttpResult> m = HttpRequest(port(), "GET", "/metrics");
        return m.ok() &&
               m->body.find("\nexpertmesh_gateway_http_connections 1\n") != std::string::npos;
      },
      absl::Seconds(10), absl::Milliseconds(100)));
}

// The status code of the one response in `raw` (0 if none) and its body's error object.
struct RawResponse {
  int status = 0;
  boost::json::object error;
};
RawResponse ParseErrorResponse(const std::string& raw) {
  RawResponse r;
  if (raw.size() < 12 || raw.compare(0, 9, "HTTP/1.1 ") != 0) return r;
  r.status = std::stoi(raw.substr(9, 3));
  const size_t body = raw.find("\r\n\r\n");
  if (body == std::string::npos) return r;
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(raw.substr(body + 4), ec);
  if (!ec && v.is_object() && v.as_object().contains("error") &&
      v.as_object().at("error").is_object()) {
    r.error = v.as_object().at("error").as_object();
  }
  return r;
}

// Sends `request` on a fresh connection and reads until the server closes it (bounded).
RawResponse SendAndReadUntilClosed(int port, const std::string& request, bool* closed) {
  RawClient client(port);
  EXPECT_TRUE(client.connected());
  EXPECT_TRUE(client.Send(request));
  *closed = client.ReadUntilClosed(std::chrono::seconds(10));
  return ParseErrorResponse(client.received());
}

void ExpectOpenAiError(const RawResponse& r, int status, const std::string& needle) {
  EXPECT_EQ(r.status, status);
  ASSERT_TRUE(r.error.contains("message")) << boost::json::serialize(r.error);
  EXPECT_NE(std::string(r.error.at("message").as_string()).find(needle), std::string::npos)
      << boost::json::serialize(r.error);
  EXPECT_EQ(r.error.at("type").as_string(), "invalid_request_error");
  EXPECT_TRUE(r.error.contains("param"));
  EXPECT_TRUE(r.error.contains("code"));
}

TEST_F(GatewayConnectionTest, OversizedHeaderGets431) {
  bool closed = false;
  const RawResponse r = SendAndReadUntilClosed(
      port(),
      "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(64 << 10, 'a') + "\r\n\r\n",
      &closed);
  ExpectOpenAiError(r, 431, "header");
  EXPECT_TRUE(closed);
}

TEST_F(GatewayConnectionTest, OversizedUrlGets414) {
  for (const size_t url_bytes : {size_t{100} << 10, size_t{20} << 10}) {
    // 100 KB: past the header limit too; 20 KB: within it, past the URL limit.
    bool closed = false;
    const RawResponse r = SendAndReadUntilClosed(
        port(), "GET /v1/models?q=" + std::string(url_bytes, 'u') + " HTTP/1.1\r\nHost: x\r\n\r\n",
        &closed);
    ExpectOpenAiError(r, 414, "URL");
    EXPECT_TRUE(closed) << url_bytes;
  }
}

TEST_F(GatewayConnectionTest, Http11WithoutHostGets400) {
  bool closed = false;
  const RawResponse r =
      SendAndReadUntilClosed(port(), "GET /health HTTP/1.1\r\nAccept: */*\r\n\r\n", &closed);
  ExpectOpenAiError(r, 400, "Host");
  EXPECT_TRUE(closed);
  // HTTP/1.0 has no such rule.
  RawClient old(port());
  ASSERT_TRUE(old.connected());
  ASSERT_TRUE(old.Send("GET /health HTTP/1.0\r\n\r\n"));
  EXPECT_TRUE(old.ReadUntilClosed(std::chrono::seconds(10)));
  EXPECT_EQ(old.received().substr(0, 12), "HTTP/1.1 200") << old.received();
  // And the gateway serves on.
  auto health = HttpRequest(port(), "GET", "/health");
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(health->status, 200);
}

TEST_F(GatewayConnectionTest, WrongMethodGets405WithAllow) {
  auto r = HttpRequest(port(), "GET", "/v1/completions");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 405);
  EXPECT_EQ(r->headers["allow"], "POST");
}

// Last in this file: it stops and restarts the cluster's only shard.
TEST_F(GatewayConnectionTest, HealthAnswersForEachServiceNameAndFollowsServing) {
  struct Named {
    std::shared_ptr<grpc::Channel> channel;
    std::string name;
  };
  const Named named[] = {
      {MakeChannel(cluster_->attention().grpc_address), "expertmesh.v1.AttentionService"},
      {MakeChannel(LoopbackAddress(gateway_->grpc_port())), "expertmesh.v1.Gateway"},
  };
  const auto serving = [&](const Named& n, bool want) {
    return PollUntil(
        [&] {
          absl::StatusOr<bool> s = CheckHealth(*n.channel, n.name, absl::Seconds(2));
          return s.ok() && *s == want;
        },
        absl::Seconds(30), absl::Milliseconds(50));
  };
  for (const Named& n : named) {
    absl::StatusOr<bool> s = CheckHealth(*n.channel, n.name, absl::Seconds(5));
    ASSERT_TRUE(s.ok()) << n.name << ": " << s.status();
    EXPECT_TRUE(*s) << n.name;
    // A name nobody registered stays NOT_FOUND: the check above can tell them apart.
    absl::StatusOr<bool> unknown =
        CheckHealth(*n.channel, "expertmesh.v1.NoSuchService", absl::Seconds(5));
    EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound) << n.name;
  }
  // The only shard stops: both names (readiness) go NOT_SERVING while the whole server ("",
  // liveness: the process is fine) stays SERVING; then the names come back.
  ASSERT_TRUE(cluster_->KillExpert(0, 0, SIGTERM).ok());
  for (const Named& n : named) {
    EXPECT_TRUE(serving(n, false)) << n.name << " still SERVING without a shard";
    absl::StatusOr<bool> whole = CheckHealth(*n.channel, "", absl::Seconds(5));
    ASSERT_TRUE(whole.ok()) << whole.status();
    EXPECT_TRUE(*whole) << n.name;
  }
  ASSERT_TRUE(cluster_->RestartExpert(0, 0).ok());
  for (const Named& n : named) EXPECT_TRUE(serving(n, true)) << n.name;
}

}  // namespace
}  // namespace expertmesh::gateway
