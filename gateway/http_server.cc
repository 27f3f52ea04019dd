#include "gateway/http_server.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <ctime>
#include <list>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>

#include "gateway/api_error.h"
#include "gateway/api_keys.h"
#include "gateway/openai_parse.h"
#include "gateway/openai_response.h"
#include "gateway/strings.h"
#include "spdlog/spdlog.h"

namespace expertmesh::gateway {
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = net::ip::tcp;

namespace {

struct Connection {
  tcp::socket socket;
  std::atomic<bool> busy{false};    // a request is being answered
  std::atomic<bool> cancel{false};  // drain ran out of grace: give up the request
  std::thread thread;
  std::atomic<bool> done{false};
  explicit Connection(tcp::socket s) : socket(std::move(s)) {}
};

bool PeerHungUp(int fd) {
  pollfd p{fd, POLLIN | POLLRDHUP, 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

int64_t UnixNow() { return static_cast<int64_t>(std::time(nullptr)); }

using Clock = std::chrono::steady_clock;

// A connection's socket as Beast's synchronous read stream, with a deadline: every read_some
// first waits (poll) for data until the deadline, then reads what has come; past the deadline
// it fails with beast::error::timeout. (SO_RCVTIMEO cannot do this: when recv() times out
// with EAGAIN, Asio's synchronous read takes it for a non-blocking socket and polls without
// a timeout.) Writes go to the socket unchanged.
class DeadlineStream {
 public:
  using executor_type = tcp::socket::executor_type;
  explicit DeadlineStream(tcp::socket& socket) : socket_(socket) {}
  executor_type get_executor() { return socket_.get_executor(); }
  void expires_after(std::chrono::milliseconds d) { deadline_ = Clock::now() + d; }

  // Waits until the socket is readable (data, end of stream or error) or the deadline passes.
  bool WaitReadable(boost::system::error_code& ec) {
    while (true) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline_ - Clock::now());
      if (left.count() <= 0) break;
      pollfd p{socket_.native_handle(), POLLIN | POLLRDHUP, 0};
      const int r = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1 << 30)));
      if (r > 0) return true;
      if (r < 0 && errno != EINTR) {
        ec.assign(errno, boost::system::system_category());
        return false;
      }
    }
    ec = beast::error::timeout;
    return false;
  }

  template <class MutableBuffers>
  size_t read_some(const MutableBuffers& buffers, boost::system::error_code& ec) {
    if (!WaitReadable(ec)) return 0;
    return socket_.read_some(buffers, ec);
  }
  template <class MutableBuffers>
  size_t read_some(const MutableBuffers& buffers) {
    boost::system::error_code ec;
    const size_t n = read_some(buffers, ec);
    if (ec) throw boost::system::system_error(ec);
    return n;
  }
  template <class ConstBuffers>
  size_t write_some(const ConstBuffers& buffers, boost::system::error_code& ec) {
    return socket_.write_some(buffers, ec);
  }
  template <class ConstBuffers>
  size_t write_some(const ConstBuffers& buffers) {
    return socket_.write_some(buffers);
  }

 private:
  tcp::socket& socket_;
  Clock::time_point deadline_ = Clock::now();
};

}  // namespace

class HttpServer::Impl {
 public:
  Impl(Options options, const RequestRunner* runner, GatewayMetrics* metrics, ReadinessFn readiness)
      : options_(std::move(options)),
        api_keys_(options_.api_keys),
        runner_(runner),
        metrics_(metrics),
        readiness_(std::move(readiness)),
        acceptor_(io_) {}

  absl::Status Listen() {
    boost::system::error_code ec;
    tcp::endpoint endpoint(net::ip::make_address(options_.host, ec),
                           static_cast<uint16_t>(options_.port));
    if (ec) return absl::InvalidArgumentError(Cat("bad --http-host ", options_.host));
    acceptor_.open(endpoint.protocol(), ec);
    if (!ec) acceptor_.set_option(net::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(endpoint, ec);
    if (!ec) acceptor_.listen(net::socket_base::max_listen_connections, ec);
    if (ec) {
      return absl::UnavailableError(
          Cat("cannot listen on ", options_.host, ":", options_.port, ": ", ec.message()));
    }
    port_ = acceptor_.local_endpoint().port();
    Accept();
    io_thread_ = std::thread([this] { io_.run(); });
    return absl::OkStatus();
  }

  int port() const { return port_; }

  int open_connections() const {
    std::lock_guard lock(mu_);
    return static_cast<int>(connections_.size());
  }

  void Drain(std::chrono::milliseconds grace) {
    if (drained_.exchange(true)) return;
    draining_ = true;
    net::post(io_, [this] {
      boost::system::error_code ec;
      acceptor_.close(ec);
    });
    auto close_idle = [this] {
      std::lock_guard lock(mu_);
      for (auto& c : connections_) {
        if (!c->busy) ::shutdown(c->socket.native_handle(), SHUT_RD);
      }
    };
    close_idle();
    std::unique_lock lock(mu_);
    const auto deadline = std::chrono::steady_clock::now() + grace;
    while (!connections_.empty() && std::chrono::steady_clock::now() < deadline) {
      lock.unlock();
      close_idle();  // a connection that finished its request and went idle
      lock.lock();
      cv_.wait_until(lock, std::min(deadline, std::chrono::steady_clock::now() +
                                                  std::chrono::milliseconds(100)));
      Reap(lock);
    }
    if (!connections_.empty()) {
      spdlog::warn("drain: grace over, cancelling {} open request(s)", connections_.size());
      for (auto& c : connections_) {
        c->cancel = true;
        ::shutdown(c->socket.native_handle(), SHUT_RDWR);
      }
    }
    while (!connections_.empty()) {
      cv_.wait_for(lock, std::chrono::milliseconds(100));
      Reap(lock);
    }
    lock.unlock();
    io_.stop();
    if (io_thread_.joinable()) io_thread_.join();
  }

 private:
  void Accept() {
    acceptor_.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
      if (ec) {
        if (ec != net::error::operation_aborted && !draining_) {
          spdlog::warn("accept: {}", ec.message());
          Accept();
        }
        return;
      }
      std::unique_lock lock(mu_);
      Reap(lock);
      if (static_cast<int>(connections_.size()) >= options_.max_connections || draining_) {
        boost::system::error_code ignored;
        socket.close(ignored);
      } else {
        auto conn = std::make_unique<Connection>(std::move(socket));
        Connection* raw = conn.get();
        connections_.push_back(std::move(conn));
        raw->thread = std::thread([this, raw] {
          Serve(*raw);
          raw->done = true;
          cv_.notify_all();
        });
      }
      lock.unlock();
      Accept();
    });
  }

  // Joins and forgets finished connections (called with mu_ held).
  void Reap(std::unique_lock<std::mutex>&) {
    for (auto it = connections_.begin(); it != connections_.end();) {
      if ((*it)->done) {
        (*it)->thread.join();
        it = connections_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void Serve(Connection& c) {
    DeadlineStream stream(c.socket);
    beast::flat_buffer buffer;
    bool first = true;
    while (!draining_) {
      http::request_parser<http::string_body> parser;
      parser.body_limit(options_.max_body_bytes);
      parser.header_limit(options_.max_header_bytes);
      boost::system::error_code ec;
      if (!first && buffer.size() == 0) {
        // Keep-alive: the next request must begin within the idle timeout; else close quietly.
        stream.expires_after(options_.idle_timeout);
        if (!stream.WaitReadable(ec)) break;
      }
      first = false;
      // The first request's header counts from the connection's start, a later one's from its
      // first byte.
      stream.expires_after(options_.header_timeout);
      http::read_header(stream, buffer, parser, ec);
      if (!ec && parser.get()[http::field::expect] == "100-continue") {
        // curl asks before sending a body over 1 KiB.
        http::response<http::empty_body> go_on{http::status::continue_, 11};
        http::write(c.socket, go_on, ec);
      }
      if (!ec) {
        stream.expires_after(options_.body_timeout);
        http::read(stream, buffer, parser, ec);
      }
      if (ec == beast::error::timeout) {
        if (parser.got_some()) {  // a request begun and not finished in time: say so
          c.busy = true;
          WriteError(c,
                     WithCode(absl::InvalidArgumentError(
                                  parser.is_header_done()
                                      ? Cat("The request body did not arrive within ",
                                            options_.body_timeout.count(), " ms.")
                                      : Cat("The request header did not arrive within ",
                                            options_.header_timeout.count(), " ms.")),
                              "request_timeout"),
                     false, 408);
        }
        break;
      }
      if (ec == http::error::body_limit) {
        c.busy = true;
        WriteError(c,
                   absl::InvalidArgumentError(
                       Cat("The request body exceeds ", options_.max_body_bytes, " bytes.")),
                   false, 413);
        LingeringClose(c);
        break;
      }
      if (ec == http::error::header_limit) {
        c.busy = true;
        // The parser consumes the request line (and each whole field) as it goes, and keeps
        // the target once the request line is complete: without one, the request line alone
        // exceeded the limit, and it is the URL that is too long.
        const size_t target = parser.get().target().size();
        if (target == 0 || target > options_.max_url_bytes) {
          WriteError(c, UrlTooLong(), false, 414);
        } else {
          WriteError(c,
                     absl::InvalidArgumentError(
                         Cat("The request header exceeds ", options_.max_header_bytes, " bytes.")),
                     false, 431);
        }
        LingeringClose(c);
        break;
      }
      if (ec) break;  // closed, timed out, or not HTTP
      c.busy = true;
      http::request<http::string_body> request = parser.release();
      if (request.target().size() > options_.max_url_bytes) {
        WriteError(c, UrlTooLong(), false, 414);
        break;
      }
      if (request.version() >= 11 && request.find(http::field::host) == request.end()) {
        // RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
        WriteError(c, absl::InvalidArgumentError("HTTP/1.1 requests must carry a Host header."),
                   false, 400);
        break;
      }
      const bool keep_alive = Handle(c, request) && request.keep_alive();
      c.busy = false;
      if (!keep_alive) break;
    }
    boost::system::error_code ignored;
    c.socket.shutdown(tcp::socket::shutdown_both, ignored);
    c.socket.close(ignored);
  }

  absl::Status UrlTooLong() const {
    return absl::InvalidArgumentError(
        Cat("The request URL exceeds ", options_.max_url_bytes, " bytes."));
  }

  // After answering a request whose bytes were not all read (413, 414, 431): stop sending,
  // then read and drop what the client still sends (at most 1 MiB, for at most 1 s) before
  // the socket closes, so that closing with unread data does not reset the connection
  // before the client has read the answer.
  static void LingeringClose(Connection& c) {
    const int fd = c.socket.native_handle();
    ::shutdown(fd, SHUT_WR);
    const auto deadline = Clock::now() + std::chrono::seconds(1);
    size_t dropped = 0;
    char buf[16384];
    while (dropped < (1u << 20)) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) break;
      pollfd p{fd, POLLIN, 0};
      const int r = ::poll(&p, 1, static_cast<int>(left.count()));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      const ssize_t n = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
      if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
      if (n <= 0) break;  // the client closed too, or an error
      dropped += static_cast<size_t>(n);
    }
  }

  bool Write(Connection& c, http::response<http::string_body>& response) {
    boost::system::error_code ec;
    response.prepare_payload();
    http::write(c.socket, response, ec);
    return !ec;
  }

  bool WriteJson(Connection& c, int status, std::string body, bool keep_alive,
                 int retry_after_s = 0, const std::optional<std::string>& allow = std::nullopt) {
    http::response<http::string_body> r{static_cast<http::status>(status), 11};
    r.set(http::field::server, "expertmesh-gateway");
    r.set(http::field::content_type, "application/json");
    if (retry_after_s > 0) r.set(http::field::retry_after, std::to_string(retry_after_s));
    if (allow) r.set(http::field::allow, *allow);
    r.keep_alive(keep_alive);
    r.body() = std::move(body);
    return Write(c, r) && keep_alive;
  }

  bool WriteError(Connection& c, const absl::Status& status, bool keep_alive,
                  int http_status_override = 0) {
    ApiError e = ToApiError(status);
    if (http_status_override != 0) e.http_status = http_status_override;
    return WriteJson(c, e.http_status, ApiErrorJson(e), keep_alive, e.retry_after_s, e.allow);
  }

  bool Authorized(const http::request<http::string_body>& request) const {
    if (api_keys_.empty()) return true;
    auto it = request.find(http::field::authorization);
    if (it == request.end()) return false;
    std::string_view value(it->value().data(), it->value().size());
    constexpr std::string_view kBearer = "Bearer ";
    if (value.substr(0, kBearer.size()) != kBearer) return false;
    value.remove_prefix(kBearer.size());
    return api_keys_.Accepts(value);
  }

  // Returns whether the connection may be kept open.
  bool Handle(Connection& c, http::request<http::string_body>& request) {
    const std::string target(request.target());
    const std::string path = target.substr(0, target.find('?'));
    const bool keep = request.keep_alive();
    const bool get = request.method() == http::verb::get;
    const bool post = request.method() == http::verb::post;

    if (path == "/health") {
      if (!get) return WriteError(c, MethodNotAllowed("GET", "Use GET /health."), keep);
      absl::Status ready =
          draining_ ? absl::UnavailableError("The gateway is shutting down.") : readiness_();
      if (!ready.ok()) {
        return WriteError(
            c,
            absl::UnavailableError(Cat("The cluster is not ready: ", std::string(ready.message()))),
            keep);
      }
      return WriteJson(c, 200, R"({"status":"ok"})", keep);
    }
    if (path == "/metrics") {
      http::response<http::string_body> r{http::status::ok, 11};
      r.set(http::field::content_type, "text/plain; version=0.0.4");
      r.keep_alive(keep);
      r.body() = metrics_->registry.RenderText();
      return Write(c, r) && keep;
    }
    if (path.rfind("/v1/", 0) != 0) {
      return WriteError(c, absl::NotFoundError(Cat("Unknown path ", path, ".")), keep);
    }
    if (!Authorized(request)) {
      metrics_->Requests("http", 401).Inc();
      return WriteError(c,
                        absl::UnauthenticatedError("Incorrect API key provided. Pass it as "
                                                   "'Authorization: Bearer <key>'."),
                        keep);
    }
    if (path == "/v1/models" || path.rfind("/v1/models/", 0) == 0) {
      if (!get) return WriteError(c, MethodNotAllowed("GET", "Use GET on /v1/models."), keep);
      json::object model{{"id", runner_->card().id},
                         {"object", "model"},
                         {"created", 0},
                         {"owned_by", "expertmesh"},
                         {"max_model_len", runner_->max_context()}};
      if (path == "/v1/models") {
        json::object list{{"object", "list"}, {"data", json::array{model}}};
        return WriteJson(c, 200, json::serialize(list), keep);
      }
      if (path.substr(std::string_view("/v1/models/").size()) != runner_->card().id) {
        return WriteError(c, UnknownModel(path.substr(11)), keep);
      }
      return WriteJson(c, 200, json::serialize(model), keep);
    }
    const bool completions = path == "/v1/completions";
    const bool chat = path == "/v1/chat/completions";
    if (!completions && !chat) {
      return WriteError(c, absl::NotFoundError(Cat("Unknown path ", path, ".")), keep);
    }
    if (!post) return WriteError(c, MethodNotAllowed("POST", Cat("Use POST ", path, ".")), keep);
    return Generate(c, request.body(), chat, keep, ClientKey(c, request));
  }

  // The admission queue's fair-share key: the API key when keys are configured (only a
  // digest of it is kept), else the peer's address (without the port).
  std::string ClientKey(Connection& c, const http::request<http::string_body>& request) const {
    if (!api_keys_.empty()) {
      auto it = request.find(http::field::authorization);
      if (it != request.end()) {
        const std::string_view value(it->value().data(), it->value().size());
        return Cat("key:", std::hash<std::string_view>{}(value));
      }
    }
    boost::system::error_code ec;
    const tcp::endpoint peer = c.socket.remote_endpoint(ec);
    return ec ? std::string("peer:?") : Cat("peer:", peer.address().to_string());
  }

  // A sink that writes SSE chunks; the headers go out with the first chunk, so that errors
  // found before any token (429, 503 ...) still get their HTTP status.
  class SseSink : public GenerationSink {
   public:
    SseSink(Connection& c, OpenAiResponder& responder, bool include_usage)
        : c_(c), responder_(responder), include_usage_(include_usage) {}
    bool OnDelta(const Delta& delta) override {
      return SendHeaders() && Send(SseEvent(responder_.Chunk(delta, include_usage_)));
    }
    bool ClientGone() override {
      return broken_ || c_.cancel.load() || PeerHungUp(c_.socket.native_handle());
    }
    bool SendHeaders() {
      if (headers_sent_) return !broken_;
      headers_sent_ = true;
      http::response<http::empty_body> r{http::status::ok, 11};
      r.set(http::field::server, "expertmesh-gateway");
      r.set(http::field::content_type, "text/event-stream");
      r.set(http::field::cache_control, "no-cache");
      r.chunked(true);
      http::response_serializer<http::empty_body> sr{r};
      boost::system::error_code ec;
      http::write_header(c_.socket, sr, ec);
      broken_ = broken_ || ec;
      return !broken_;
    }
    bool Send(const std::string& data) {
      if (broken_) return false;
      boost::system::error_code ec;
      net::write(c_.socket, http::make_chunk(net::buffer(data)), ec);
      broken_ = broken_ || ec;
      return !broken_;
    }
    bool End() {
      if (broken_) return false;
      boost::system::error_code ec;
      net::write(c_.socket, http::make_chunk_last(), ec);
      broken_ = broken_ || ec;
      return !broken_;
    }
    bool headers_sent() const { return headers_sent_; }

   private:
    Connection& c_;
    OpenAiResponder& responder_;
    const bool include_usage_;
    bool headers_sent_ = false;
    bool broken_ = false;
  };

  class CollectSink : public GenerationSink {
   public:
    CollectSink(Connection& c, OpenAiResponder& responder) : c_(c), responder_(responder) {}
    bool OnDelta(const Delta& delta) override {
      responder_.Collect(delta);
      return true;
    }
    bool ClientGone() override { return c_.cancel.load() || PeerHungUp(c_.socket.native_handle()); }

   private:
    Connection& c_;
    OpenAiResponder& responder_;
  };

  bool Generate(Connection& c, const std::string& body, bool chat, bool keep, std::string client) {
    const std::string api = chat ? "chat" : "completions";
    const RequestLimits limits;
    absl::StatusOr<GenerationRequest> request =
        chat ? ParseChatCompletionRequest(body, runner_->card(), limits)
             : ParseCompletionRequest(body, runner_->card(), limits);
    if (request.ok()) request->client = std::move(client);
    absl::StatusOr<PreparedRequest> prepared =
        request.ok() ? runner_->Prepare(std::move(*request))
                     : absl::StatusOr<PreparedRequest>(request.status());
    if (!prepared.ok()) {
      metrics_->Requests(api, ToApiError(prepared.status()).http_status).Inc();
      return WriteError(c, prepared.status(), keep);
    }
    const GenerationRequest& r = prepared->request;
    OpenAiResponder responder(r, Cat(chat ? "chatcmpl-" : "cmpl-", prepared->request_id),
                              UnixNow());
    if (!r.stream) {
      CollectSink sink(c, responder);
      absl::StatusOr<Outcome> outcome = runner_->Run(*prepared, sink);
      if (!outcome.ok()) {
        metrics_->Requests(api, ToApiError(outcome.status()).http_status).Inc();
        if (outcome.status().code() == absl::StatusCode::kCancelled) return false;
        return WriteError(c, outcome.status(), keep);
      }
      metrics_->Requests(api, 200).Inc();
      return WriteJson(c, 200, responder.Full(*outcome), keep);
    }
    SseSink sink(c, responder, r.include_usage);
    absl::StatusOr<Outcome> outcome = runner_->Run(*prepared, sink);
    if (!outcome.ok()) {
      metrics_->Requests(api, ToApiError(outcome.status()).http_status).Inc();
      if (outcome.status().code() == absl::StatusCode::kCancelled) return false;
      if (!sink.headers_sent()) return WriteError(c, outcome.status(), keep);
      // Mid-stream failure: an error event, then the end of the stream.
      sink.Send(SseEvent(ApiErrorJson(ToApiError(outcome.status()))));
      sink.Send(std::string(kSseDone));
      return sink.End() && keep;
    }
    metrics_->Requests(api, 200).Inc();
    bool ok =
        sink.SendHeaders() && sink.Send(SseEvent(responder.FinishChunk(*outcome, r.include_usage)));
    if (ok && r.include_usage) ok = sink.Send(SseEvent(responder.UsageChunk(outcome->usage)));
    ok = ok && sink.Send(std::string(kSseDone)) && sink.End();
    return ok && keep;
  }

  const Options options_;
  const ApiKeyChecker api_keys_;
  const RequestRunner* runner_;
  GatewayMetrics* metrics_;
  ReadinessFn readiness_;
  net::io_context io_;
  tcp::acceptor acceptor_;
  std::thread io_thread_;
  int port_ = 0;
  std::atomic<bool> draining_{false};
  std::atomic<bool> drained_{false};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::list<std::unique_ptr<Connection>> connections_;
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpServer::~HttpServer() { impl_->Drain(std::chrono::milliseconds(0)); }

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(Options options,
                                                              const RequestRunner* runner,
                                                              GatewayMetrics* metrics,
                                                              ReadinessFn readiness) {
  auto impl = std::make_unique<Impl>(std::move(options), runner, metrics, std::move(readiness));
  absl::Status s = impl->Listen();
  if (!s.ok()) return s;
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

int HttpServer::port() const { return impl_->port(); }
void HttpServer::Drain(std::chrono::milliseconds grace) { impl_->Drain(grace); }
int HttpServer::open_connections() const { return impl_->open_connections(); }

}  // namespace expertmesh::gateway
