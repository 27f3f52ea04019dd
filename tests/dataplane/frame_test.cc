// The framed TCP data plane's transport (dataplane/frame.h, frame_server.h): the header and
// error-payload codecs and SplitHostPort on every refusal; a FrameServer with a small echo
// session on loopback, driven by FrameConnection (round trips of 0 bytes to several MiB, many
// frames on one connection, the connection bound, the idle and frame timeouts, Stop) and by raw
// sockets as a hostile client would (garbage, oversized lengths, half frames, trickles). Every
// wait is bounded by a deadline; ctest's TIMEOUT bounds the whole.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "dataplane/frame.h"
#include "dataplane/frame_server.h"
#include "tests/common/poll.h"
#include "tests/common/raw_client.h"

namespace expertmesh::dataplane {
namespace {

using testing::PollUntil;
using testing::RawClient;

std::string Header(FrameType type, uint32_t length) {
  char h[kFrameHeaderBytes];
  EncodeFrameHeader(type, length, h);
  return std::string(h, kFrameHeaderBytes);
}

std::string Frame(FrameType type, std::string_view payload) {
  return Header(type, static_cast<uint32_t>(payload.size())) + std::string(payload);
}

// ---------------------------------------------------------------------------------------------
// Codecs

TEST(FrameHeaderTest, RoundTripsEveryTypeAndLength) {
  for (FrameType type : {FrameType::kHello, FrameType::kHelloOk, FrameType::kRequest,
                         FrameType::kResponse, FrameType::kError}) {
    for (uint32_t length : {0u, 1u, 255u, 256u, 0x01020304u, 1000000u}) {
      const std::string h = Header(type, length);
      ASSERT_EQ(h.size(), kFrameHeaderBytes);
      absl::StatusOr<FrameHeader> d = DecodeFrameHeader(h, 0x7fffffff);
      ASSERT_TRUE(d.ok()) << d.status();
      EXPECT_EQ(d->type, type);
      EXPECT_EQ(d->length, length);
    }
  }
  // The layout itself: magic, type, three zero bytes, little-endian length.
  const std::string h = Header(FrameType::kRequest, 0x01020304u);
  EXPECT_EQ(h, std::string("EMD1\x03\x00\x00\x00\x04\x03\x02\x01", 12));
  // The limit is inclusive.
  EXPECT_TRUE(DecodeFrameHeader(Header(FrameType::kRequest, 4096), 4096).ok());
  EXPECT_TRUE(DecodeFrameHeader(Header(FrameType::kRequest, 0xffffffffu), 0xffffffffu).ok());
}

TEST(FrameHeaderTest, RefusesEachMalformedHeaderWithItsCode) {
  const std::string good = Header(FrameType::kRequest, 10);
  auto decode = [](const std::string& h) { return DecodeFrameHeader(h, 1024).status(); };
  ASSERT_TRUE(decode(good).ok());
  auto with = [&](int i, char c) {
    std::string h = good;
    h[i] = c;
    return h;
  };
  for (int i = 0; i < 4; ++i) {
    const absl::Status s = decode(with(i, 'X'));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << i;
    EXPECT_NE(s.message().find("magic"), std::string::npos) << s;
  }
  for (int i = 5; i < 8; ++i) {
    const absl::Status s = decode(with(i, '\x01'));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << i;
    EXPECT_NE(s.message().find("reserved"), std::string::npos) << s;
  }
  for (int t : {0, 5, 6, 14, 16, 128, 255}) {
    const absl::Status s = decode(with(4, static_cast<char>(t)));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << t;
    EXPECT_NE(s.message().find(absl::StrCat("unknown frame type ", t)), std::string::npos) << s;
  }
  const absl::Status big = decode(Header(FrameType::kRequest, 1025));
  EXPECT_EQ(big.code(), absl::StatusCode::kResourceExhausted) << big;
  EXPECT_NE(big.message().find("1025"), std::string::npos) << big;
  EXPECT_EQ(decode(Header(FrameType::kRequest, 0xffffffffu)).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(decode(good.substr(0, 11)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(decode(good + "x").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(decode("").code(), absl::StatusCode::kInvalidArgument);
}

TEST(ErrorPayloadTest, RoundTripsAndRefusesMalformedPayloads) {
  for (absl::StatusCode code :
       {absl::StatusCode::kCancelled, absl::StatusCode::kInvalidArgument,
        absl::StatusCode::kFailedPrecondition, absl::StatusCode::kResourceExhausted,
        absl::StatusCode::kUnavailable, absl::StatusCode::kUnauthenticated}) {
    for (const std::string& message :
         {std::string(), std::string("why"), std::string("\0binary\xff", 8)}) {
      const absl::Status in(code, message);
      const absl::Status out = DecodeErrorPayload(EncodeErrorPayload(in));
      EXPECT_EQ(out, in);
    }
  }
  // Code in the first four bytes, little-endian.
  EXPECT_EQ(EncodeErrorPayload(absl::ResourceExhaustedError("m")), std::string("\x08\0\0\0m", 5));
  for (const std::string& bad :
       {std::string(), std::string("\x03\0\0", 3), std::string("\0\0\0\0message", 11),
        std::string("\x11\0\0\0", 4), std::string("\xff\xff\xff\xff", 4),
        std::string("\x03\0\0\x01", 4)}) {
    const absl::Status s = DecodeErrorPayload(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
    EXPECT_NE(s.message().find("malformed"), std::string::npos) << s;
  }
}

TEST(SplitHostPortTest, AcceptsAndRefuses) {
  struct Good {
    std::string address, host;
    int port;
  };
  for (const Good& g :
       std::vector<Good>{{"127.0.0.1:80", "127.0.0.1", 80},
                         {"localhost:0", "localhost", 0},
                         {"shard-1.experts.svc:65535", "shard-1.experts.svc", 65535},
                         {"[::1]:9000", "::1", 9000},
                         {"[fe80::1%eth0]:1", "fe80::1%eth0", 1},
                         {"0.0.0.0:5", "0.0.0.0", 5}}) {
    std::string host = "unchanged";
    int port = -7;
    const absl::Status s = SplitHostPort(g.address, &host, &port);
    ASSERT_TRUE(s.ok()) << g.address << ": " << s;
    EXPECT_EQ(host, g.host) << g.address;
    EXPECT_EQ(port, g.port) << g.address;
  }
  for (const std::string bad :
       {"", "127.0.0.1", "127.0.0.1:", ":80", "[]:80", "host:65536", "host:99999999999", "host:-1",
        "host:+1", "host:8o", "host: 80", "host:0x10", "[::1]", "[::1:80", "::1:80", "ho]st:80",
        "[::1]x:80"}) {
    std::string host = "unchanged";
    int port = -7;
    const absl::Status s = SplitHostPort(bad, &host, &port);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << "\"" << bad << "\" accepted";
    EXPECT_NE(s.message().find("address"), std::string::npos) << s;
    EXPECT_EQ(host, "unchanged") << bad;
    EXPECT_EQ(port, -7) << bad;
  }
}

// ---------------------------------------------------------------------------------------------
// A FrameServer with a test session on loopback.

// Echo session: kHello -> kHelloOk "hi"; kRequest -> kResponse with the same payload, except
// the payloads "refuse" (a FailedPrecondition error frame) and "sleep" (answered after 400 ms).
class EchoSession final : public FrameSession {
 public:
  explicit EchoSession(std::atomic<int>* frames) : frames_(frames) {}
  absl::Status OnFrame(FrameType type, std::string_view payload, FrameType* reply_type,
                       std::string* reply) override {
    frames_->fetch_add(1);
    if (type == FrameType::kHello) {
      *reply_type = FrameType::kHelloOk;
      *reply = "hi";
      return absl::OkStatus();
    }
    if (type != FrameType::kRequest) return absl::InvalidArgumentError("not a request");
    if (payload == "refuse") return absl::FailedPreconditionError("refused by the test session");
    if (payload == "sleep") absl::SleepFor(absl::Milliseconds(400));
    *reply_type = FrameType::kResponse;
    reply->assign(payload);
    return absl::OkStatus();
  }

 private:
  std::atomic<int>* const frames_;
};

class FrameServerTest : public ::testing::Test {
 protected:
  // Starts the server with `o` (listen defaults to 127.0.0.1:0).
  void StartServer(FrameServerOptions o = {}) {
    if (o.listen.empty()) o.listen = "127.0.0.1:0";
    o.on_connections = [this](uint32_t n) { gauge_.store(n); };
    o.on_refused = [this] { refused_.fetch_add(1); };
    absl::StatusOr<std::unique_ptr<FrameServer>> s = FrameServer::Start(
        std::move(o), [this] { return std::make_unique<EchoSession>(&frames_); });
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    ASSERT_GT(server_->port(), 0);
  }
  std::string Address() const { return absl::StrCat("127.0.0.1:", server_->port()); }

  std::unique_ptr<FrameConnection> Connect(uint32_t max_frame_bytes = 64u << 20) {
    absl::StatusOr<std::unique_ptr<FrameConnection>> c =
        FrameConnection::Connect(Address(), absl::Now() + absl::Seconds(10), max_frame_bytes);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }

  // Hello, then one echo: the connection is accepted and served.
  static void ExpectServed(FrameConnection& c, const std::string& payload = "ping") {
    ASSERT_TRUE(
        Exchange(c, FrameType::kHello, "", FrameType::kHelloOk, absl::Now() + absl::Seconds(10))
            .ok());
    EXPECT_EQ(c.payload(), "hi");
    const absl::Status s = Exchange(c, FrameType::kRequest, payload, FrameType::kResponse,
                                    absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(c.payload(), payload);
  }

  // A connection greeted and served once (ExpectServed); nullptr where it could not connect.
  std::unique_ptr<FrameConnection> ConnectAndServe() {
    std::unique_ptr<FrameConnection> c = Connect();
    if (c != nullptr) ExpectServed(*c);
    return c;
  }

  // The frames a raw client got: the status of each kError frame, OK for any other frame.
  static std::vector<absl::Status> FramesIn(std::string_view bytes) {
    std::vector<absl::Status> out;
    while (bytes.size() >= kFrameHeaderBytes) {
      absl::StatusOr<FrameHeader> h =
          DecodeFrameHeader(bytes.substr(0, kFrameHeaderBytes), 1 << 20);
      if (!h.ok() || bytes.size() < kFrameHeaderBytes + h->length) break;
      if (h->type == FrameType::kError) {
        out.push_back(DecodeErrorPayload(bytes.substr(kFrameHeaderBytes, h->length)));
      } else {
        out.push_back(absl::OkStatus());
      }
      bytes.remove_prefix(kFrameHeaderBytes + h->length);
    }
    return out;
  }

  std::atomic<int> frames_{0};
  std::atomic<uint32_t> gauge_{0};
  std::atomic<int> refused_{0};
  std::unique_ptr<FrameServer> server_;
};

TEST_F(FrameServerTest, StartRefusesBadOptions) {
  auto start = [](FrameServerOptions o) {
    return FrameServer::Start(std::move(o), [] { return std::unique_ptr<FrameSession>(); })
        .status();
  };
  // A good base; each case breaks one option of it.
  FrameServerOptions good;
  good.listen = "127.0.0.1:0";
  good.max_connections = 1;
  good.idle_timeout = absl::Seconds(1);
  good.frame_timeout = absl::Seconds(1);
  good.max_frame_bytes = 1024;
  good.hello_timeout = absl::Seconds(1);
  good.max_buffered_bytes = 1024;
  good.max_first_frame_bytes = 64;
  ASSERT_TRUE(start(good).ok()) << "the base must be good for each case to test its option";
  const std::pair<const char*, std::function<void(FrameServerOptions&)>> kBad[] = {
      {"listen without a port", [](FrameServerOptions& o) { o.listen = "127.0.0.1"; }},
      {"no connections", [](FrameServerOptions& o) { o.max_connections = 0; }},
      {"zero idle timeout", [](FrameServerOptions& o) { o.idle_timeout = absl::ZeroDuration(); }},
      {"negative frame timeout",
       [](FrameServerOptions& o) { o.frame_timeout = -absl::Seconds(1); }},
      {"frame bound below a header", [](FrameServerOptions& o) { o.max_frame_bytes = 4; }},
      {"zero hello timeout", [](FrameServerOptions& o) { o.hello_timeout = absl::ZeroDuration(); }},
      {"buffer below one frame", [](FrameServerOptions& o) { o.max_buffered_bytes = 1023; }},
      {"zero first-frame bound", [](FrameServerOptions& o) { o.max_first_frame_bytes = 0; }},
  };
  for (const auto& [name, mutate] : kBad) {
    FrameServerOptions o = good;
    mutate(o);
    EXPECT_EQ(start(o).code(), absl::StatusCode::kInvalidArgument) << name;
  }
  // A port already taken: the good base with the listen address of a running server.
  StartServer();
  FrameServerOptions o = good;
  o.listen = Address();
  EXPECT_EQ(start(o).code(), absl::StatusCode::kUnavailable);
}

TEST_F(FrameServerTest, RoundTripsOfZeroOneAndManyMebibytes) {
  StartServer();
  std::unique_ptr<FrameConnection> c = Connect();
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(
      Exchange(*c, FrameType::kHello, "", FrameType::kHelloOk, absl::Now() + absl::Seconds(10))
          .ok());
  std::mt19937 rng(7);
  // Larger than the socket buffers on both sides: the writer waits for the reader.
  for (size_t size : {size_t{0}, size_t{1}, size_t{12}, size_t{65537}, size_t{6u << 20}}) {
    std::string payload(size, '\0');
    for (char& ch : payload) ch = static_cast<char>(rng());
    const absl::Status s = Exchange(*c, FrameType::kRequest, payload, FrameType::kResponse,
                                    absl::Now() + absl::Seconds(30));
    ASSERT_TRUE(s.ok()) << size << ": " << s;
    EXPECT_EQ(c->frame_type(), FrameType::kResponse);
    ASSERT_EQ(c->payload().size(), size);
    EXPECT_TRUE(c->payload() == payload) << size;
    EXPECT_TRUE(c->QuietAndOpen());
  }
}

TEST_F(FrameServerTest, ManyFramesOnOneConnection) {
  StartServer();
  std::unique_ptr<FrameConnection> c = Connect();
  ASSERT_NE(c, nullptr);
  ExpectServed(*c);
  for (int i = 0; i < 2000; ++i) {
    const std::string payload(static_cast<size_t>(i % 97), static_cast<char>('a' + i % 26));
    const absl::Status s = Exchange(*c, FrameType::kRequest, payload, FrameType::kResponse,
                                    absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(s.ok()) << i << ": " << s;
    ASSERT_EQ(c->payload(), payload) << i;
  }
  EXPECT_EQ(frames_.load(), 2002);
  EXPECT_EQ(server_->open_connections(), 1u);
}

TEST_F(FrameServerTest, ConnectionBoundRefusesOneMoreAndServesAfterOneCloses) {
  FrameServerOptions o;
  o.max_connections = 2;
  o.min_idle_to_evict = absl::Hours(1);  // no idle connection makes room here
  StartServer(o);
  std::unique_ptr<FrameConnection> a = ConnectAndServe(), b = ConnectAndServe();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(server_->open_connections(), 2u);
  EXPECT_EQ(gauge_.load(), 2u);
  for (int i = 0; i < 3; ++i) {
    std::unique_ptr<FrameConnection> extra = Connect();
    ASSERT_NE(extra, nullptr);
    // The refusal is the first (and only) frame, whatever the client sent.
    const absl::Status s = extra->ReadFrame(absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(extra->frame_type(), FrameType::kError);
    const absl::Status why = DecodeErrorPayload(extra->payload());
    EXPECT_EQ(why.code(), absl::StatusCode::kResourceExhausted) << why;
    EXPECT_NE(why.message().find("2 connections"), std::string::npos) << why;
    // Then the server closes it.
    const absl::Status after = extra->ReadFrame(absl::Now() + absl::Seconds(10));
    EXPECT_EQ(after.code(), absl::StatusCode::kUnavailable) << after;
  }
  EXPECT_EQ(refused_.load(), 3);
  // The two served connections are unharmed.
  ASSERT_TRUE(Exchange(*a, FrameType::kRequest, "again", FrameType::kResponse,
                       absl::Now() + absl::Seconds(10))
                  .ok());
  // One closes: a new connection is served once the server has seen the close.
  a.reset();
  ASSERT_TRUE(PollUntil([&] { return server_->open_connections() == 1; }, absl::Seconds(10)));
  EXPECT_EQ(gauge_.load(), 1u);
  std::unique_ptr<FrameConnection> c = Connect();
  ASSERT_NE(c, nullptr);
  ExpectServed(*c, "served after a close");
  EXPECT_EQ(gauge_.load(), 2u);
}

// At the connection bound, a new connection takes the place of the one idle longest: silent
// or idle clients cannot lock out working ones. Working connections are never evicted.
TEST_F(FrameServerTest, AtTheBoundTheConnectionIdleLongestMakesRoom) {
  FrameServerOptions o;
  o.max_connections = 2;
  o.min_idle_to_evict = absl::Milliseconds(100);
  std::atomic<int> evicted{0};
  o.on_evicted = [&evicted] { evicted.fetch_add(1); };
  StartServer(o);
  std::unique_ptr<FrameConnection> a = Connect(), b = Connect();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ExpectServed(*a);
  absl::SleepFor(absl::Milliseconds(50));
  ExpectServed(*b);  // a has been idle longer than b
  absl::SleepFor(absl::Milliseconds(300));
  std::unique_ptr<FrameConnection> c = Connect();
  ASSERT_NE(c, nullptr);
  ExpectServed(*c, "served in the place of the idlest");
  EXPECT_EQ(evicted.load(), 1);
  EXPECT_EQ(refused_.load(), 0);
  // a was closed; b still works.
  EXPECT_EQ(a->ReadFrame(absl::Now() + absl::Seconds(10)).code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(
      Exchange(*b, FrameType::kRequest, "b", FrameType::kResponse, absl::Now() + absl::Seconds(10))
          .ok());
  ASSERT_TRUE(PollUntil([&] { return server_->open_connections() == 2; }, absl::Seconds(10)));
  // A connection busy with a frame is not idle: with b and c both answering slow requests,
  // a new client is refused.
  ASSERT_TRUE(b->WriteFrame(FrameType::kRequest, "sleep", absl::Now() + absl::Seconds(10)).ok());
  ASSERT_TRUE(c->WriteFrame(FrameType::kRequest, "sleep", absl::Now() + absl::Seconds(10)).ok());
  absl::SleepFor(absl::Milliseconds(150));
  std::unique_ptr<FrameConnection> d = Connect();
  ASSERT_NE(d, nullptr);
  ASSERT_TRUE(d->ReadFrame(absl::Now() + absl::Seconds(10)).ok());
  ASSERT_EQ(d->frame_type(), FrameType::kError);
  EXPECT_EQ(DecodeErrorPayload(d->payload()).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(refused_.load(), 1);
  ASSERT_TRUE(b->ReadFrame(absl::Now() + absl::Seconds(10)).ok());
  ASSERT_TRUE(c->ReadFrame(absl::Now() + absl::Seconds(10)).ok());
  EXPECT_EQ(b->payload(), "sleep");
  EXPECT_EQ(c->payload(), "sleep");
}

// A client that connects and never speaks is closed after the hello timeout (not the idle
// timeout), and its first frame may not be larger than a hello needs.
TEST_F(FrameServerTest, TheFirstFrameIsBoundedInTimeAndSize) {
  FrameServerOptions o;
  o.hello_timeout = absl::Milliseconds(200);
  o.max_first_frame_bytes = 1024;
  StartServer(o);  // idle timeout: 10 minutes
  {
    RawClient silent(server_->port());
    ASSERT_TRUE(silent.connected());
    const absl::Time start = absl::Now();
    ASSERT_TRUE(silent.ReadUntilClosed(std::chrono::seconds(10)));
    const absl::Duration took = absl::Now() - start;
    EXPECT_GE(took, absl::Milliseconds(150));
    EXPECT_LT(took, absl::Seconds(5));
    EXPECT_EQ(silent.received(), "");
  }
  {
    RawClient big(server_->port());
    ASSERT_TRUE(big.connected());
    ASSERT_TRUE(big.Send(Header(FrameType::kHello, 1025)));
    ASSERT_TRUE(big.ReadUntilClosed(std::chrono::seconds(10)));
    const std::vector<absl::Status> errors = FramesIn(big.received());
    ASSERT_EQ(errors.size(), 1u);
    EXPECT_EQ(errors[0].code(), absl::StatusCode::kResourceExhausted) << errors[0];
  }
  // After the first frame the frame limit applies, and a quiet pause may last past the hello
  // timeout.
  std::unique_ptr<FrameConnection> c = Connect();
  ASSERT_NE(c, nullptr);
  ExpectServed(*c, std::string(4096, 'f'));
  absl::SleepFor(absl::Milliseconds(400));
  ASSERT_TRUE(Exchange(*c, FrameType::kRequest, "still open", FrameType::kResponse,
                       absl::Now() + absl::Seconds(10))
                  .ok());
}

// The payload bytes held for frames in progress, all connections together, stay within
// max_buffered_bytes: a frame that would pass it is refused with RESOURCE_EXHAUSTED, and the
// budget comes back once the frames in progress end.
TEST_F(FrameServerTest, BufferedBytesAreBoundedAcrossConnections) {
  FrameServerOptions o;
  o.max_frame_bytes = 256u << 10;
  o.max_buffered_bytes = 256u << 10;
  StartServer(o);
  std::unique_ptr<FrameConnection> a = ConnectAndServe(), b = ConnectAndServe();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  // a announces 256 KiB and sends 200 KiB of it: its buffer has grown to the whole budget.
  const std::string partial =
      Header(FrameType::kRequest, 256u << 10) + std::string(200u << 10, 'a');
  ASSERT_EQ(::send(a->fd(), partial.data(), partial.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(partial.size()));
  absl::SleepFor(absl::Milliseconds(200));
  const absl::Status s = Exchange(*b, FrameType::kRequest, std::string(100u << 10, 'b'),
                                  FrameType::kResponse, absl::Now() + absl::Seconds(10));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  // a finishes its frame and is answered; then the budget is free again.
  const std::string rest(56u << 10, 'a');
  ASSERT_EQ(::send(a->fd(), rest.data(), rest.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(rest.size()));
  ASSERT_TRUE(a->ReadFrame(absl::Now() + absl::Seconds(10)).ok());
  EXPECT_EQ(a->frame_type(), FrameType::kResponse);
  EXPECT_EQ(a->payload().size(), 256u << 10);
  std::unique_ptr<FrameConnection> c = Connect();
  ASSERT_NE(c, nullptr);
  ExpectServed(*c, std::string(200u << 10, 'c'));
}

TEST_F(FrameServerTest, IdleTimeoutClosesASilentConnection) {
  FrameServerOptions o;
  o.idle_timeout = absl::Milliseconds(200);
  StartServer(o);
  std::unique_ptr<FrameConnection> c = Connect();
  ASSERT_NE(c, nullptr);
  ExpectServed(*c);
  const absl::Time start = absl::Now();
  const absl::Status s = c->ReadFrame(absl::Now() + absl::Seconds(10));
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("closed by the peer"), std::string::npos) << s;
  EXPECT_GE(took, absl::Milliseconds(150));
  EXPECT_LT(took, absl::Seconds(5));
  EXPECT_FALSE(c->QuietAndOpen());
  ASSERT_TRUE(PollUntil([&] { return server_->open_connections() == 0; }, absl::Seconds(10)));
  EXPECT_EQ(gauge_.load(), 0u);
  // A connection that keeps talking within the idle timeout stays.
  std::unique_ptr<FrameConnection> busy = Connect();
  ASSERT_NE(busy, nullptr);
  ExpectServed(*busy);
  for (int i = 0; i < 6; ++i) {
    absl::SleepFor(absl::Milliseconds(80));
    ASSERT_TRUE(Exchange(*busy, FrameType::kRequest, "x", FrameType::kResponse,
                         absl::Now() + absl::Seconds(10))
                    .ok())
        << i;
  }
}

TEST_F(FrameServerTest, HalfAFrameIsClosedAfterTheFrameTimeoutWhileOthersAreServed) {
  FrameServerOptions o;
  o.frame_timeout = absl::Milliseconds(300);
  StartServer(o);
  for (int cut : {5, 12, 20}) {  // inside the header, after it, inside the payload
    RawClient stalled(server_->port());
    ASSERT_TRUE(stalled.connected());
    ASSERT_TRUE(stalled.Send(Frame(FrameType::kHello, std::string(100, 'h')).substr(0, cut)));
    const absl::Time start = absl::Now();
    // Meanwhile another client is served.
    std::unique_ptr<FrameConnection> other = Connect();
    ASSERT_NE(other, nullptr);
    ExpectServed(*other);
    ASSERT_TRUE(stalled.ReadUntilClosed(std::chrono::seconds(10))) << cut;
    const absl::Duration took = absl::Now() - start;
    EXPECT_GE(took, absl::Milliseconds(250)) << cut;
    EXPECT_LT(took, absl::Seconds(5)) << cut;
    EXPECT_EQ(stalled.received(), "") << cut;  // nothing answered, no frame to answer
  }
}

// A frame sent in a trickle, every gap under the frame timeout, is still closed once the whole
// frame has taken longer than the frame timeout from its first byte.
TEST_F(FrameServerTest, TheFrameTimeoutBoundsTheWholeFrameNotEachGap) {
  FrameServerOptions o;
  o.frame_timeout = absl::Milliseconds(400);
  StartServer(o);
  const std::string frame = Frame(FrameType::kHello, std::string(6, 'h'));
  RawClient slow(server_->port());
  ASSERT_TRUE(slow.connected());
  const absl::Time start = absl::Now();
  // 11 header bytes, the 12th, one payload byte, the rest: each 300 ms after the last.
  for (const auto& [from, to] :
       std::vector<std::pair<size_t, size_t>>{{0, 11}, {11, 12}, {12, 13}, {13, frame.size()}}) {
    if (from > 0) absl::SleepFor(absl::Milliseconds(300));
    if (!slow.Send(frame.substr(from, to - from))) break;  // already closed
  }
  slow.ReadUntilClosed(std::chrono::seconds(10));
  EXPECT_EQ(FramesIn(slow.received()).size(), 0u)
      << "a frame that took " << absl::Now() - start << " was answered";
  EXPECT_EQ(frames_.load(), 0);
}

TEST_F(FrameServerTest, OversizedLengthGetsResourceExhausted) {
  FrameServerOptions o;
  o.max_frame_bytes = 1024;
  StartServer(o);
  RawClient raw(server_->port());
  ASSERT_TRUE(raw.connected());
  ASSERT_TRUE(raw.Send(Header(FrameType::kHello, 1025)));
  ASSERT_TRUE(raw.ReadUntilClosed(std::chrono::seconds(10)));
  const std::vector<absl::Status> errors = FramesIn(raw.received());
  ASSERT_EQ(errors.size(), 1u) << raw.received().size();
  EXPECT_EQ(errors[0].code(), absl::StatusCode::kResourceExhausted) << errors[0];
  EXPECT_NE(errors[0].message().find("1025"), std::string::npos) << errors[0];
  EXPECT_EQ(frames_.load(), 0);
  // The limit itself is served.
  std::unique_ptr<FrameConnection> c = Connect();
  ASSERT_NE(c, nullptr);
  ExpectServed(*c, std::string(1024, 'z'));
}

// A client writing a frame above the limit learns why from the error frame, not from a reset
// in the middle of its write (the server reads on for a moment after refusing, so the client's
// write ends and its read finds the error frame).
TEST_F(FrameServerTest, AnOversizedFrameBeingWrittenGetsItsErrorFrame) {
  FrameServerOptions o;
  o.max_frame_bytes = 1u << 20;
  StartServer(o);
  for (size_t size : {size_t{(1u << 20) + 1}, size_t{8u << 20}}) {
    std::unique_ptr<FrameConnection> c = Connect();
    ASSERT_NE(c, nullptr);
    ExpectServed(*c);
    const absl::Status s = Exchange(*c, FrameType::kRequest, std::string(size, 'o'),
                                    FrameType::kResponse, absl::Now() + absl::Seconds(10));
    EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << size << ": " << s;
  }
}

TEST_F(FrameServerTest, GarbageGetsInvalidArgumentAndTheServerStaysUp) {
  StartServer();
  std::string unknown_type = Header(FrameType::kRequest, 0);
  unknown_type[4] = 9;
  for (const std::string& garbage :
       {std::string("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n"),
        std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), std::string(12, '\0'), unknown_type,
        std::string("EMD1\x03\x01\x00\x00\x00\x00\x00\x00", 12)}) {
    RawClient raw(server_->port());
    ASSERT_TRUE(raw.connected());
    ASSERT_TRUE(raw.Send(garbage));
    ASSERT_TRUE(raw.ReadUntilClosed(std::chrono::seconds(10)));
    const std::vector<absl::Status> errors = FramesIn(raw.received());
    ASSERT_EQ(errors.size(), 1u) << garbage;
    EXPECT_EQ(errors[0].code(), absl::StatusCode::kInvalidArgument) << errors[0];
  }
  // A session's refusal is its own error frame, and closes only that connection.
  {
    std::unique_ptr<FrameConnection> c = Connect();
    ASSERT_NE(c, nullptr);
    ExpectServed(*c);
    const absl::Status s = Exchange(*c, FrameType::kRequest, "refuse", FrameType::kResponse,
                                    absl::Now() + absl::Seconds(10));
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_EQ(s.message(), "refused by the test session");
    EXPECT_EQ(c->ReadFrame(absl::Now() + absl::Seconds(10)).code(), absl::StatusCode::kUnavailable);
  }
  // A client that connects and closes at once, or closes inside a frame.
  {
    RawClient quick(server_->port());
    ASSERT_TRUE(quick.connected());
  }
  {
    RawClient half(server_->port());
    ASSERT_TRUE(half.Send(Header(FrameType::kRequest, 50) + "abc"));
  }
  std::unique_ptr<FrameConnection> c = Connect();
  ASSERT_NE(c, nullptr);
  ExpectServed(*c);
  ASSERT_TRUE(PollUntil([&] { return server_->open_connections() == 1; }, absl::Seconds(10)));
}

// A client announcing the largest frame and sending nothing more costs the server what it has
// sent, not the length it announced (16 connections x 48 MiB announced).
TEST_F(FrameServerTest, AnnouncedLengthsAreNotAllocatedAhead) {
  auto rss_kib = [] {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line)) {
      if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
    }
    return -1L;
  };
  FrameServerOptions o;
  o.max_frame_bytes = 48u << 20;
  StartServer(o);
  std::vector<std::unique_ptr<FrameConnection>> conns;
  for (int i = 0; i < 16; ++i) {
    conns.push_back(Connect());
    ASSERT_NE(conns.back(), nullptr);
    ExpectServed(*conns.back());
  }
  const long before = rss_kib();
  ASSERT_GT(before, 0);
  for (auto& c : conns) {
    const std::string partial = Header(FrameType::kRequest, 48u << 20) + "x";
    ASSERT_EQ(::send(c->fd(), partial.data(), partial.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(partial.size()));
  }
  absl::SleepFor(absl::Milliseconds(300));  // the server threads have read the bytes
  const long after = rss_kib();
  EXPECT_LT(after - before, 64 * 1024) << "RSS grew by " << (after - before) << " KiB";
}

TEST_F(FrameServerTest, StopCutsOpenConnectionsPromptly) {
  StartServer();  // idle timeout: 10 minutes
  std::vector<std::unique_ptr<FrameConnection>> idle;
  for (int i = 0; i < 3; ++i) {
    idle.push_back(Connect());
    ASSERT_NE(idle.back(), nullptr);
    ExpectServed(*idle.back());
  }
  RawClient half(server_->port());  // inside a frame
  ASSERT_TRUE(half.Send(Header(FrameType::kRequest, 100) + "abc"));
  // One computing an answer (400 ms): Stop waits for it, then its write fails.
  std::unique_ptr<FrameConnection> busy = Connect();
  ASSERT_NE(busy, nullptr);
  ExpectServed(*busy);
  ASSERT_TRUE(busy->WriteFrame(FrameType::kRequest, "sleep", absl::Now() + absl::Seconds(10)).ok());
  ASSERT_TRUE(PollUntil([&] { return frames_.load() == 9; }, absl::Seconds(10)));
  ASSERT_TRUE(PollUntil([&] { return server_->open_connections() == 5; }, absl::Seconds(10)));

  const absl::Time start = absl::Now();
  server_->Stop();
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  EXPECT_EQ(server_->open_connections(), 0u);
  EXPECT_EQ(gauge_.load(), 0u);
  for (auto& c : idle) {
    const absl::Status s = c->ReadFrame(absl::Now() + absl::Seconds(5));
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
    EXPECT_FALSE(c->QuietAndOpen());
  }
  EXPECT_TRUE(half.ReadUntilClosed(std::chrono::seconds(5)));
  EXPECT_EQ(busy->ReadFrame(absl::Now() + absl::Seconds(5)).code(), absl::StatusCode::kUnavailable);
  // The listener is closed too: a new client is refused at once instead of waiting.
  const absl::Time t = absl::Now();
  absl::StatusOr<std::unique_ptr<FrameConnection>> late =
      FrameConnection::Connect(Address(), absl::Now() + absl::Seconds(5), 1024);
  if (late.ok()) {
    EXPECT_FALSE((*late)->ReadFrame(absl::Now() + absl::Seconds(5)).ok());
  } else {
    EXPECT_EQ(late.status().code(), absl::StatusCode::kUnavailable) << late.status();
  }
  EXPECT_LT(absl::Now() - t, absl::Seconds(2)) << "a connection after Stop() was left waiting";
  server_->Stop();  // idempotent
  server_.reset();
}

// ---------------------------------------------------------------------------------------------
// The client side against a raw server socket: partial reads, bad frames, deadlines.

class RawListener {
 public:
  RawListener() {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(fd_, 8) != 0 || ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len)) {
      ::close(fd_);
      fd_ = -1;
      return;
    }
    port_ = ntohs(addr.sin_port);
  }
  ~RawListener() {
    if (peer_ >= 0) ::close(peer_);
    if (fd_ >= 0) ::close(fd_);
  }
  int port() const { return port_; }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }
  bool Accept() {
    peer_ = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    return peer_ >= 0;
  }
  bool Send(std::string_view bytes) {
    return ::send(peer_, bytes.data(), bytes.size(), MSG_NOSIGNAL) ==
           static_cast<ssize_t>(bytes.size());
  }
  void ClosePeer() {
    ::close(peer_);
    peer_ = -1;
  }

 private:
  int fd_ = -1;
  int peer_ = -1;
  int port_ = 0;
};

std::unique_ptr<FrameConnection> ConnectTo(const RawListener& l, uint32_t max_frame_bytes) {
  absl::StatusOr<std::unique_ptr<FrameConnection>> c =
      FrameConnection::Connect(l.address(), absl::Now() + absl::Seconds(10), max_frame_bytes);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

// Waits until the client's socket has something to read (or 2 s).
void WaitReadable(const FrameConnection& c) {
  [[maybe_unused]] absl::StatusOr<bool> r = PollOne(c.fd(), POLLIN, absl::Now() + absl::Seconds(2));
}

TEST(FrameConnectionTest, ReadAvailableAssemblesFramesDeliveredByteByByte) {
  RawListener l;
  ASSERT_GT(l.port(), 0);
  std::unique_ptr<FrameConnection> c = ConnectTo(l, 1024);
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(l.Accept());
  EXPECT_TRUE(c->QuietAndOpen());
  absl::StatusOr<bool> got = c->ReadAvailable();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(*got);  // nothing yet, and no blocking
  for (const std::string& payload :
       {std::string("hello, frames"), std::string(), std::string("z")}) {
    const std::string frame = Frame(FrameType::kResponse, payload);
    for (size_t i = 0; i < frame.size(); ++i) {
      ASSERT_TRUE(l.Send(frame.substr(i, 1)));
      WaitReadable(*c);
      got = c->ReadAvailable();
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_EQ(*got, i + 1 == frame.size()) << "byte " << i << " of " << frame.size();
      if (i + 1 < frame.size()) {
        EXPECT_FALSE(c->QuietAndOpen()) << "a frame half read";
      }
    }
    EXPECT_EQ(c->frame_type(), FrameType::kResponse);
    EXPECT_EQ(c->payload(), payload);
    EXPECT_TRUE(c->QuietAndOpen());
  }
  // Two frames in one segment: one per call, the second from the buffer of the socket.
  ASSERT_TRUE(l.Send(Frame(FrameType::kResponse, "one") + Frame(FrameType::kHelloOk, "two")));
  ASSERT_TRUE(c->ReadFrame(absl::Now() + absl::Seconds(5)).ok());
  EXPECT_EQ(c->payload(), "one");
  ASSERT_TRUE(c->ReadFrame(absl::Now() + absl::Seconds(5)).ok());
  EXPECT_EQ(c->frame_type(), FrameType::kHelloOk);
  EXPECT_EQ(c->payload(), "two");
  // Unexpected bytes on an idle connection: not quiet.
  ASSERT_TRUE(l.Send("x"));
  WaitReadable(*c);
  EXPECT_FALSE(c->QuietAndOpen());
}

TEST(FrameConnectionTest, QuietAndOpenIsFalseOnceThePeerClosed) {
  RawListener l;
  std::unique_ptr<FrameConnection> c = ConnectTo(l, 1024);
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(l.Accept());
  ASSERT_TRUE(l.Send(Frame(FrameType::kResponse, "a")));
  ASSERT_TRUE(c->ReadFrame(absl::Now() + absl::Seconds(5)).ok());
  EXPECT_TRUE(c->QuietAndOpen());
  l.ClosePeer();
  EXPECT_TRUE(PollUntil([&] { return !c->QuietAndOpen(); }, absl::Seconds(5)));
  const absl::Status s = c->ReadFrame(absl::Now() + absl::Seconds(5));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("closed by the peer"), std::string::npos) << s;
}

TEST(FrameConnectionTest, BadFramesFromTheServerAreErrors) {
  struct Case {
    std::string bytes;
    absl::StatusCode code;
  };
  std::string reserved = Header(FrameType::kResponse, 0);
  reserved[6] = 1;
  for (const Case& k : std::vector<Case>{
           {"HTTP/1.1 400 Bad Request\r\n\r\n", absl::StatusCode::kInvalidArgument},
           {reserved, absl::StatusCode::kInvalidArgument},
           {Header(FrameType::kResponse, 1025), absl::StatusCode::kResourceExhausted},
           {Header(FrameType::kResponse, 10) + "short", absl::StatusCode::kUnavailable}}) {
    RawListener l;
    std::unique_ptr<FrameConnection> c = ConnectTo(l, 1024);
    ASSERT_NE(c, nullptr);
    ASSERT_TRUE(l.Accept());
    ASSERT_TRUE(l.Send(k.bytes));
    if (k.code == absl::StatusCode::kUnavailable) l.ClosePeer();  // closed inside the frame
    const absl::Status s = c->ReadFrame(absl::Now() + absl::Seconds(5));
    EXPECT_EQ(s.code(), k.code) << s;
    EXPECT_NE(s.message().find(l.address()), std::string::npos) << s;
  }
}

TEST(FrameConnectionTest, ExchangeMapsErrorFramesAndUnexpectedTypes) {
  RawListener l;
  std::unique_ptr<FrameConnection> c = ConnectTo(l, 1024);
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(l.Accept());
  ASSERT_TRUE(
      l.Send(Frame(FrameType::kError, EncodeErrorPayload(absl::PermissionDeniedError("go away")))));
  absl::Status s =
      Exchange(*c, FrameType::kRequest, "q", FrameType::kResponse, absl::Now() + absl::Seconds(5));
  EXPECT_EQ(s, absl::PermissionDeniedError("go away"));
  ASSERT_TRUE(l.Send(Frame(FrameType::kHelloOk, "")));
  s = Exchange(*c, FrameType::kRequest, "q", FrameType::kResponse, absl::Now() + absl::Seconds(5));
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_NE(s.message().find("answered a hello-ok frame to a request frame"), std::string::npos)
      << s;
  ASSERT_TRUE(l.Send(Frame(FrameType::kError, "\x02")));  // malformed error payload
  s = Exchange(*c, FrameType::kRequest, "q", FrameType::kResponse, absl::Now() + absl::Seconds(5));
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
}

TEST(FrameConnectionTest, ReadsAndWritesEndAtTheirDeadlines) {
  RawListener l;
  std::unique_ptr<FrameConnection> c = ConnectTo(l, 64u << 20);
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(l.Accept());  // and never reads nor writes
  absl::Time start = absl::Now();
  absl::Status s = c->ReadFrame(absl::Now() + absl::Milliseconds(200));
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(190));
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  // More than both socket buffers hold: the write cannot finish.
  const std::string big(48u << 20, 'b');
  start = absl::Now();
  s = c->WriteFrame(FrameType::kRequest, big, absl::Now() + absl::Milliseconds(300));
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
}

TEST(FrameConnectionTest, ConnectRefusals) {
  absl::StatusOr<std::unique_ptr<FrameConnection>> c =
      FrameConnection::Connect("127.0.0.1", absl::Now() + absl::Seconds(5), 1024);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  int free_port = 0;
  {
    RawListener l;  // a port that was free a moment ago, closed again: nothing listens
    free_port = l.port();
  }
  const absl::Time start = absl::Now();
  c = FrameConnection::Connect(absl::StrCat("127.0.0.1:", free_port),
                               absl::Now() + absl::Seconds(5), 1024);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable) << c.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
}

}  // namespace
}  // namespace expertmesh::dataplane
