#include "gateway/http_server.h"

#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string_view>
#include <thread>
#include <unordered_map>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
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

absl::Status ValidateHttpTls(const HttpTls& tls) {
  if (!tls.enabled()) return absl::OkStatus();
  if (tls.cert.empty() || tls.key.empty()) {
    return absl::InvalidArgumentError(
        tls.cert.empty() && tls.key.empty()
            ? "--http-tls-ca needs --http-tls-cert and --http-tls-key (server TLS)"
            : (tls.cert.empty() ? "--http-tls-key needs --http-tls-cert"
                                : "--http-tls-cert needs --http-tls-key"));
  }
  return absl::OkStatus();
}

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = net::ip::tcp;
using error_code = boost::system::error_code;
namespace ssl = net::ssl;

namespace {

// The TLS context new connections get, loaded again when its files change.
class TlsContexts {
 public:
  explicit TlsContexts(HttpTls tls) : tls_(std::move(tls)) {}

  // Loads the files once (an error names the file that does not load).
  absl::Status Init() {
    stamp_ = Stamp();
    absl::StatusOr<std::shared_ptr<ssl::context>> ctx = Load();
    if (!ctx.ok()) return ctx.status();
    current_ = *std::move(ctx);
    last_check_ = Clock::now();
    return absl::OkStatus();
  }

  // The context for a connection accepted now; reloads first when a file changed since the
  // last load (looked at most every reload_check). Acceptor strand only.
  std::shared_ptr<ssl::context> Current() {
    const auto now = Clock::now();
    if (now - last_check_ < tls_.reload_check) return current_;
    last_check_ = now;
    std::string stamp = Stamp();
    if (stamp == stamp_) return current_;
    stamp_ = std::move(stamp);
    absl::StatusOr<std::shared_ptr<ssl::context>> ctx = Load();
    if (ctx.ok()) {
      current_ = *std::move(ctx);
      spdlog::info("http TLS: certificate files changed, reloaded for new connections");
    } else {
      spdlog::warn(
          "http TLS: certificate files changed but do not load ({}); keeping the "
          "previous ones",
          std::string(ctx.status().message()));
    }
    return current_;
  }

 private:
  using Clock = std::chrono::steady_clock;

  // What tells a changed file: device, inode, size and modification time of each (a
  // Kubernetes Secret update swaps a symlink: stat follows it).
  std::string Stamp() const {
    std::string out;
    for (const std::string* path : {&tls_.cert, &tls_.key, &tls_.client_ca}) {
      struct stat st {};
      if (path->empty() || ::stat(path->c_str(), &st) != 0) {
        out += "-;";
        continue;
      }
      out += Cat(st.st_dev, ":", st.st_ino, ":", st.st_size, ":", st.st_mtim.tv_sec, ".",
                 st.st_mtim.tv_nsec, ";");
    }
    return out;
  }

  absl::StatusOr<std::shared_ptr<ssl::context>> Load() const {
    auto ctx = std::make_shared<ssl::context>(ssl::context::tls_server);
    error_code ec;
    ctx->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                         ssl::context::no_sslv3 | ssl::context::no_tlsv1 |
                         ssl::context::no_tlsv1_1 | ssl::context::single_dh_use,
                     ec);
    ctx->use_certificate_chain_file(tls_.cert, ec);
    if (ec)
      return absl::FailedPreconditionError(Cat("--http-tls-cert ", tls_.cert, ": ", ec.message()));
    ctx->use_private_key_file(tls_.key, ssl::context::pem, ec);
    if (ec)
      return absl::FailedPreconditionError(Cat("--http-tls-key ", tls_.key, ": ", ec.message()));
    if (SSL_CTX_check_private_key(ctx->native_handle()) != 1) {
      return absl::FailedPreconditionError(
          Cat("--http-tls-key ", tls_.key, " does not match --http-tls-cert ", tls_.cert));
    }
    if (!tls_.client_ca.empty()) {
      ctx->load_verify_file(tls_.client_ca, ec);
      if (ec) {
        return absl::FailedPreconditionError(
            Cat("--http-tls-ca ", tls_.client_ca, ": ", ec.message()));
      }
      ctx->set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert, ec);
      // Session resumption with client verification needs a session id context.
      static constexpr unsigned char kSessionContext[] = "expertmesh-gateway";
      SSL_CTX_set_session_id_context(ctx->native_handle(), kSessionContext,
                                     sizeof(kSessionContext) - 1);
    }
    return ctx;
  }

  const HttpTls tls_;
  std::string stamp_;
  std::shared_ptr<ssl::context> current_;
  Clock::time_point last_check_;
};

using Clock = std::chrono::steady_clock;

int64_t UnixNow() { return static_cast<int64_t>(std::time(nullptr)); }

bool PeerHungUp(int fd) {
  pollfd p{fd, POLLIN | POLLRDHUP, 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

// The generation workers: threads made on demand up to `max_threads` tasks queued or running
// at once, each leaving after `idle_exit` without work.
class WorkerPool {
 public:
  WorkerPool(int max_threads, std::chrono::milliseconds idle_exit)
      : max_threads_(std::max(1, max_threads)), idle_exit_(idle_exit) {}
  ~WorkerPool() { Stop(); }

  // False (nothing runs) when `max_threads` tasks are already queued or running, or stopped.
  bool TrySubmit(std::function<void()> task) {
    std::lock_guard lock(mu_);
    ReapLocked();
    if (stopped_ || pending_ >= max_threads_) return false;
    ++pending_;
    tasks_.push_back(std::move(task));
    if (threads_.size() - busy_ < tasks_.size()) {
      const uint64_t id = next_id_++;
      threads_.emplace(id, std::thread([this, id] { Loop(id); }));
    } else {
      cv_.notify_one();
    }
    return true;
  }

  // Runs what is queued, then joins every thread; later TrySubmit calls fail.
  void Stop() {
    std::unique_lock lock(mu_);
    stopped_ = true;
    cv_.notify_all();
    exited_.wait(lock, [this] { return threads_.empty(); });
    ReapLocked();
  }

  int threads() const {
    std::lock_guard lock(mu_);
    return static_cast<int>(threads_.size());
  }

 private:
  void Loop(uint64_t id) {
    std::unique_lock lock(mu_);
    while (true) {
      if (tasks_.empty()) {
        if (stopped_) break;
        if (!cv_.wait_for(lock, idle_exit_, [this] { return stopped_ || !tasks_.empty(); })) break;
        continue;
      }
      std::function<void()> task = std::move(tasks_.front());
      tasks_.pop_front();
      ++busy_;
      lock.unlock();
      task();
      task = nullptr;
      lock.lock();
      --busy_;
      --pending_;
    }
    auto it = threads_.find(id);
    finished_.push_back(std::move(it->second));
    threads_.erase(it);
    exited_.notify_all();
  }
  // Joins threads that left their loop (they hold no lock any more once listed).
  void ReapLocked() {
    for (std::thread& t : finished_) t.join();
    finished_.clear();
  }

  const int max_threads_;
  const std::chrono::milliseconds idle_exit_;
  mutable std::mutex mu_;
  std::condition_variable cv_, exited_;
  std::deque<std::function<void()>> tasks_;
  std::map<uint64_t, std::thread> threads_;
  std::vector<std::thread> finished_;
  uint64_t next_id_ = 0;
  size_t busy_ = 0;
  int pending_ = 0;  // queued + running
  bool stopped_ = false;
};

// One connection. Its socket's executor is the connection's strand: the session coroutine,
// its deadline timer and the writes a generation worker posts all run there, one at a time.
// With TLS, `tls` is the SSL stream over `socket` (which it refers to) and every read and
// write goes through it; cancelling or shutting down `socket` ends its operations too.
struct Conn {
  explicit Conn(tcp::socket s, std::shared_ptr<ssl::context> ctx = nullptr)
      : socket(std::move(s)),
        timer(socket.get_executor()),
        fd(socket.native_handle()),
        tls_context(std::move(ctx)) {
    if (tls_context) tls = std::make_unique<ssl::stream<tcp::socket&>>(socket, *tls_context);
  }
  tcp::socket socket;
  net::steady_timer timer;
  uint64_t timer_generation = 0;    // strand only: tells a stale expiry from the armed one
  bool timed_out = false;           // strand only: the armed deadline passed
  const int fd;                     // for the hang-up poll of a generation worker
  std::atomic<bool> busy{false};    // a request is being answered
  std::atomic<bool> cancel{false};  // drain ran out of grace: give up the request
  std::shared_ptr<ssl::context> tls_context;  // kept while the connection lives
  std::unique_ptr<ssl::stream<tcp::socket&>> tls;
};

// The deadline of the connection's current operation: past it, the socket's operations are
// cancelled and `timed_out` is set. Strand only.
void Arm(const std::shared_ptr<Conn>& c, std::chrono::milliseconds d) {
  const uint64_t generation = ++c->timer_generation;
  c->timed_out = false;
  c->timer.expires_after(d);
  c->timer.async_wait([w = std::weak_ptr<Conn>(c), generation](error_code ec) {
    if (ec) return;
    std::shared_ptr<Conn> c = w.lock();
    if (c == nullptr || c->timer_generation != generation) return;
    c->timed_out = true;
    error_code ignored;
    c->socket.cancel(ignored);
  });
}

void Disarm(const std::shared_ptr<Conn>& c) {
  ++c->timer_generation;
  c->timer.cancel();
}

constexpr auto kAwait = net::use_awaitable;

// The connection's reads and writes, on its SSL stream when it has one, else on the socket.
net::awaitable<void> ReadHeader(Conn& c, beast::flat_buffer& buffer,
                                http::request_parser<http::string_body>& parser, error_code& ec) {
  if (c.tls) {
    co_await http::async_read_header(*c.tls, buffer, parser, net::redirect_error(kAwait, ec));
  } else {
    co_await http::async_read_header(c.socket, buffer, parser, net::redirect_error(kAwait, ec));
  }
}
net::awaitable<void> ReadBody(Conn& c, beast::flat_buffer& buffer,
                              http::request_parser<http::string_body>& parser, error_code& ec) {
  if (c.tls) {
    co_await http::async_read(*c.tls, buffer, parser, net::redirect_error(kAwait, ec));
  } else {
    co_await http::async_read(c.socket, buffer, parser, net::redirect_error(kAwait, ec));
  }
}
net::awaitable<void> Write(Conn& c, net::const_buffer bytes, error_code& ec) {
  if (c.tls) {
    co_await net::async_write(*c.tls, bytes, net::redirect_error(kAwait, ec));
  } else {
    co_await net::async_write(c.socket, bytes, net::redirect_error(kAwait, ec));
  }
}
net::awaitable<size_t> ReadSome(Conn& c, net::mutable_buffer into, error_code& ec) {
  size_t n = 0;
  if (c.tls) {
    n = co_await c.tls->async_read_some(into, net::redirect_error(kAwait, ec));
  } else {
    n = co_await c.socket.async_read_some(into, net::redirect_error(kAwait, ec));
  }
  co_return n;
}

template <class Body>
std::string Serialize(http::response<Body>& r) {
  std::ostringstream os;
  os << r;
  return std::move(os).str();
}

std::string Chunk(std::string_view data) {
  char size[20];
  const int n = std::snprintf(size, sizeof(size), "%zx\r\n", data.size());
  std::string out;
  out.reserve(static_cast<size_t>(n) + data.size() + 2);
  out.append(size, static_cast<size_t>(n)).append(data).append("\r\n");
  return out;
}

}  // namespace

class HttpServer::Impl {
 public:
  Impl(Options options, const RequestRunner* runner, GatewayMetrics* metrics, ReadinessFn readiness)
      : options_(std::move(options)),
        api_keys_(options_.api_keys),
        runner_(runner),
        metrics_(metrics),
        readiness_(std::move(readiness)),
        work_(io_.get_executor()),
        acceptor_(net::make_strand(io_)),
        accept_retry_(acceptor_.get_executor()),
        workers_(options_.max_generations, std::chrono::seconds(30)),
        max_connections_(options_.max_connections) {}

  absl::Status Listen() {
    if (options_.tls.enabled()) {
      if (absl::Status s = ValidateHttpTls(options_.tls); !s.ok()) return s;
      tls_ = std::make_unique<TlsContexts>(options_.tls);
      if (absl::Status s = tls_->Init(); !s.ok()) return s;
    }
    LimitConnectionsToFileLimit();
    error_code ec;
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
    for (int i = 0; i < std::max(1, options_.io_threads); ++i) {
      io_threads_.emplace_back([this] {
        while (true) {
          try {
            io_.run();
            return;
          } catch (const std::exception& e) {
            spdlog::error("http: {}", e.what());
          }
        }
      });
    }
    return absl::OkStatus();
  }

  int port() const { return port_; }
  int open_connections() const { return open_.load(); }
  int generation_threads() const { return workers_.threads(); }

  void Drain(std::chrono::milliseconds grace) {
    if (drained_.exchange(true)) return;
    draining_ = true;
    net::post(acceptor_.get_executor(), [this] {
      error_code ec;
      acceptor_.close(ec);
      accept_retry_.cancel();
    });
    CloseIdle();
    std::unique_lock lock(mu_);
    const auto deadline = Clock::now() + grace;
    while (!conns_.empty() && Clock::now() < deadline) {
      lock.unlock();
      CloseIdle();  // a connection that finished its request and went idle
      lock.lock();
      cv_.wait_until(lock, std::min(deadline, Clock::now() + std::chrono::milliseconds(100)));
    }
    if (!conns_.empty()) {
      size_t busy = 0;
      for (auto& [raw, c] : conns_) busy += c->busy ? 1 : 0;
      if (busy > 0) spdlog::warn("drain: grace over, cancelling {} open request(s)", busy);
      for (auto& [raw, c] : conns_) {
        c->cancel = true;
        net::post(c->socket.get_executor(), [c = c] {
          error_code ignored;
          c->socket.shutdown(tcp::socket::shutdown_both, ignored);
          c->socket.cancel(ignored);
        });
      }
    }
    cv_.wait(lock, [this] { return conns_.empty(); });
    lock.unlock();
    workers_.Stop();
    work_.reset();
    io_.stop();
    for (std::thread& t : io_threads_) t.join();
  }

 private:
  // Each connection holds a descriptor: the cap is lowered to what RLIMIT_NOFILE allows
  // (raised to its hard limit first), keeping room for the rest of the process.
  void LimitConnectionsToFileLimit() {
    rlimit limit{};
    if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return;
    if (limit.rlim_cur < limit.rlim_max) {
      rlimit raised = limit;
      raised.rlim_cur = limit.rlim_max;
      if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) limit = raised;
    }
    constexpr rlim_t kReserve = 512;  // gRPC channels, model files, logs
    if (limit.rlim_cur == RLIM_INFINITY) return;
    const rlim_t room =
        limit.rlim_cur > 2 * kReserve ? limit.rlim_cur - kReserve : limit.rlim_cur / 2;
    if (static_cast<rlim_t>(max_connections_) > room) {
      spdlog::warn(
          "--max-connections {} exceeds what the open-file limit ({}) allows: at most {} "
          "HTTP connections (raise `ulimit -n`)",
          max_connections_, limit.rlim_cur, room);
      max_connections_ = static_cast<int>(room);
    }
  }

  void CloseIdle() {
    std::lock_guard lock(mu_);
    for (auto& [raw, c] : conns_) {
      net::post(c->socket.get_executor(), [c = c] {
        if (c->busy) return;
        error_code ignored;
        c->socket.cancel(ignored);
      });
    }
  }

  void Accept() {
    acceptor_.async_accept(net::make_strand(io_), [this](error_code ec, tcp::socket socket) {
      if (ec) {
        if (draining_ || ec == net::error::operation_aborted) return;
        // Out of descriptors (EMFILE) or similar: retry shortly rather than spin.
        const auto now = Clock::now();
        if (now - last_accept_warning_ > std::chrono::seconds(10)) {
          last_accept_warning_ = now;
          spdlog::warn("http accept: {}", ec.message());
        }
        accept_retry_.expires_after(std::chrono::milliseconds(50));
        accept_retry_.async_wait([this](error_code e) {
          if (!e && !draining_) Accept();
        });
        return;
      }
      if (draining_) return;
      Admit(std::move(socket));
      Accept();
    });
  }

  void Admit(tcp::socket socket) {
    error_code ignored;
    if (open_.load() >= max_connections_) {
      // Refused cleanly: a 503 (it fits the socket's buffer), then close.
      static const std::string kBusy = [] {
        http::response<http::string_body> r{http::status::service_unavailable, 11};
        r.set(http::field::server, "expertmesh-gateway");
        r.set(http::field::content_type, "application/json");
        r.set(http::field::retry_after, "1");
        r.keep_alive(false);
        r.body() = ApiErrorJson(ToApiError(
            absl::UnavailableError("The gateway has too many open connections; retry later.")));
        r.prepare_payload();
        return Serialize(r);
      }();
      socket.non_blocking(true, ignored);
      socket.send(net::buffer(kBusy), 0, ignored);
      socket.shutdown(tcp::socket::shutdown_send, ignored);
      socket.close(ignored);
      return;
    }
    socket.set_option(tcp::no_delay(true), ignored);
    auto c = std::make_shared<Conn>(std::move(socket), tls_ ? tls_->Current() : nullptr);
    {
      std::lock_guard lock(mu_);
      conns_.emplace(c.get(), c);
      ++open_;
    }
    net::co_spawn(c->socket.get_executor(), Session(c), [this, c](std::exception_ptr e) {
      if (e) {
        try {
          std::rethrow_exception(e);
        } catch (const std::exception& ex) {
          spdlog::error("http connection: {}", ex.what());
        }
      }
      Disarm(c);
      error_code ignored;
      c->socket.close(ignored);
      std::lock_guard lock(mu_);
      conns_.erase(c.get());
      --open_;
      cv_.notify_all();
    });
  }

  // (GCC 12 mis-destroys temporaries of class type in a full-expression that holds a
  // co_await: every co_await below takes named objects only.)
  net::awaitable<void> Session(std::shared_ptr<Conn> c) {
    beast::flat_buffer buffer;
    bool first = true;
    if (c->tls) {
      // The handshake counts against the first request's header deadline.
      error_code ec;
      Arm(c, options_.header_timeout);
      co_await c->tls->async_handshake(ssl::stream_base::server, net::redirect_error(kAwait, ec));
      Disarm(c);
      if (ec) {
        // Not TLS (plain HTTP to the TLS port), an unverified client, a timeout: close.
        spdlog::debug("http TLS handshake: {}", ec.message());
        error_code ignored;
        c->socket.shutdown(tcp::socket::shutdown_both, ignored);
        co_return;
      }
    }
    while (!draining_) {
      error_code ec;
      if (!first && buffer.size() == 0 && c->tls) {
        // Keep-alive over TLS: the SSL stream may hold the next request's bytes already
        // (pipelined), so wait by reading (into a small buffer) rather than for readability.
        Arm(c, options_.idle_timeout);
        net::mutable_buffer into = buffer.prepare(1024);
        const size_t n = co_await ReadSome(*c, into, ec);
        buffer.commit(n);
        if (ec || draining_) break;
      } else if (!first && buffer.size() == 0) {
        // Keep-alive: the next request must begin within the idle timeout; else close
        // quietly. Waiting for readability holds no buffer.
        buffer.shrink_to_fit();
        Arm(c, options_.idle_timeout);
        co_await c->socket.async_wait(tcp::socket::wait_read, net::redirect_error(kAwait, ec));
        if (ec || draining_) break;
      }
      first = false;
      // The first request's header counts from the connection's start, a later one's from
      // its first byte (or, pipelined, from the end of the previous response).
      Arm(c, options_.header_timeout);
      http::request_parser<http::string_body> parser;
      parser.body_limit(options_.max_body_bytes);
      parser.header_limit(options_.max_header_bytes);
      co_await ReadHeader(*c, buffer, parser, ec);
      if (!ec) {
        Arm(c, options_.body_timeout);
        if (parser.get()[http::field::expect] == "100-continue") {
          // curl asks before sending a body over 1 KiB.
          static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
          const net::const_buffer bytes = net::buffer(kContinue);
          co_await Write(*c, bytes, ec);
        }
        if (!ec) co_await ReadBody(*c, buffer, parser, ec);
      }
      const bool timed_out = ec && c->timed_out;
      Disarm(c);
      bool close_quietly = false, linger = false;
      const std::string refusal = Refusal(parser, ec, timed_out, &close_quietly, &linger);
      if (close_quietly) break;  // closed, cancelled by a drain, not HTTP, or nothing begun
      c->busy = true;
      if (!refusal.empty()) {
        co_await Send(c, refusal);
        if (linger) co_await LingeringClose(c);
        break;
      }
      http::request<http::string_body> request = parser.release();
      const bool keep = request.keep_alive();
      bool chat = false;
      const std::optional<std::string> answer = Answer(request, keep, &chat);
      bool keep_alive = false;
      if (answer.has_value()) {
        const bool sent = co_await Send(c, *answer);
        keep_alive = sent && keep;
      } else {
        keep_alive = co_await Generation(c, request, chat, keep);
      }
      c->busy = false;
      if (!keep_alive) break;
    }
    if (c->tls && !c->cancel) {
      // close_notify, waiting a moment for the client's (a client already gone ends it).
      error_code ec;
      Arm(c, std::chrono::seconds(1));
      co_await c->tls->async_shutdown(net::redirect_error(kAwait, ec));
      Disarm(c);
    }
    error_code ignored;
    c->socket.shutdown(tcp::socket::shutdown_both, ignored);
  }

  // What ends a request read that cannot be served: the answer (then the connection closes,
  // after lingering when the request's bytes were not all read), or *close_quietly. Empty
  // when the request is to be served.
  std::string Refusal(const http::request_parser<http::string_body>& parser, error_code ec,
                      bool timed_out, bool* close_quietly, bool* linger) const {
    if (timed_out) {
      if (!parser.got_some()) {
        *close_quietly = true;
        return {};
      }
      // A request begun and not finished in time: say so.
      std::string message = parser.is_header_done()
                                ? Cat("The request body did not arrive within ",
                                      options_.body_timeout.count(), " ms.")
                                : Cat("The request header did not arrive within ",
                                      options_.header_timeout.count(), " ms.");
      return ErrorBytes(WithCode(absl::InvalidArgumentError(message), "request_timeout"), false,
                        408);
    }
    if (ec == http::error::body_limit) {
      *linger = true;
      return ErrorBytes(absl::InvalidArgumentError(
                            Cat("The request body exceeds ", options_.max_body_bytes, " bytes.")),
                        false, 413);
    }
    if (ec == http::error::header_limit) {
      *linger = true;
      // The parser consumes the request line (and each whole field) as it goes, and keeps
      // the target once the request line is complete: without one, the request line alone
      // exceeded the limit, and it is the URL that is too long.
      const size_t target = parser.get().target().size();
      if (target == 0 || target > options_.max_url_bytes) {
        return ErrorBytes(UrlTooLong(), false, 414);
      }
      return ErrorBytes(absl::InvalidArgumentError(Cat("The request header exceeds ",
                                                       options_.max_header_bytes, " bytes.")),
                        false, 431);
    }
    if (ec) {
      *close_quietly = true;
      return {};
    }
    if (parser.get().target().size() > options_.max_url_bytes) {
      return ErrorBytes(UrlTooLong(), false, 414);
    }
    if (parser.get().version() >= 11 &&
        parser.get().find(http::field::host) == parser.get().end()) {
      // RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
      return ErrorBytes(absl::InvalidArgumentError("HTTP/1.1 requests must carry a Host header."),
                        false, 400);
    }
    return {};
  }

  absl::Status UrlTooLong() const {
    return absl::InvalidArgumentError(
        Cat("The request URL exceeds ", options_.max_url_bytes, " bytes."));
  }

  // After answering a request whose bytes were not all read (413, 414, 431): stop sending,
  // then read and drop what the client still sends (at most 1 MiB, for at most 1 s) before
  // the socket closes, so that closing with unread data does not reset the connection
  // before the client has read the answer.
  net::awaitable<void> LingeringClose(const std::shared_ptr<Conn>& c) {
    error_code ec;
    // (Over TLS the stream stays open for its close_notify; the client reads the answer.)
    if (!c->tls) c->socket.shutdown(tcp::socket::shutdown_send, ec);
    Arm(c, std::chrono::seconds(1));
    std::vector<char> drop(16384);
    size_t dropped = 0;
    while (dropped < (1u << 20)) {
      const net::mutable_buffer into = net::buffer(drop);
      const size_t n = co_await ReadSome(*c, into, ec);
      if (ec) break;  // the client closed too, the second passed, or an error
      dropped += n;
    }
    Disarm(c);
  }

  // Writes `bytes` within the send timeout; false when the connection broke or timed out.
  net::awaitable<bool> Send(const std::shared_ptr<Conn>& c, const std::string& bytes) {
    Arm(c, options_.send_timeout);
    error_code ec;
    const net::const_buffer view = net::buffer(bytes);
    co_await Write(*c, view, ec);
    Disarm(c);
    co_return !ec;
  }
  net::awaitable<bool> SendOwned(std::shared_ptr<Conn> c, std::string bytes) {
    const bool sent = co_await Send(c, bytes);
    co_return sent;
  }

  // Send, from a generation worker: runs on the connection's strand, waits for the result.
  bool SendFromWorker(const std::shared_ptr<Conn>& c, std::string bytes) {
    auto done = std::make_shared<std::promise<bool>>();
    std::future<bool> result = done->get_future();
    net::co_spawn(c->socket.get_executor(), SendOwned(c, std::move(bytes)),
                  [done](std::exception_ptr e, bool ok) { done->set_value(!e && ok); });
    return result.get();
  }

  // Runs `fn` on a generation worker; the coroutine resumes on its strand when it is done.
  // False (fn not run) when every worker is taken.
  net::awaitable<bool> RunOnWorker(const std::function<void()>& fn) {
    return net::async_initiate<decltype(kAwait), void(bool)>(
        [this](auto handler, std::function<void()> fn) {
          auto h = std::make_shared<decltype(handler)>(std::move(handler));
          auto ex = net::get_associated_executor(*h);
          const bool submitted = workers_.TrySubmit([h, ex, fn = std::move(fn)] {
            try {
              fn();
            } catch (const std::exception& e) {
              spdlog::error("http generation: {}", e.what());
            }
            net::post(ex, [h] { std::move (*h)(true); });
          });
          if (!submitted) net::post(ex, [h] { std::move (*h)(false); });
        },
        kAwait, fn);
  }

  static std::string JsonBytes(int status, std::string body, bool keep_alive, int retry_after_s = 0,
                               const std::optional<std::string>& allow = std::nullopt) {
    http::response<http::string_body> r{static_cast<http::status>(status), 11};
    r.set(http::field::server, "expertmesh-gateway");
    r.set(http::field::content_type, "application/json");
    if (retry_after_s > 0) r.set(http::field::retry_after, std::to_string(retry_after_s));
    if (allow) r.set(http::field::allow, *allow);
    r.keep_alive(keep_alive);
    r.body() = std::move(body);
    r.prepare_payload();
    return Serialize(r);
  }

  static std::string ErrorBytes(const absl::Status& status, bool keep_alive,
                                int http_status_override = 0) {
    ApiError e = ToApiError(status);
    if (http_status_override != 0) e.http_status = http_status_override;
    return JsonBytes(e.http_status, ApiErrorJson(e), keep_alive, e.retry_after_s, e.allow);
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

  // The response to a request that needs no generation; nullopt for a completion request
  // (then *chat says which API).
  std::optional<std::string> Answer(const http::request<http::string_body>& request, bool keep,
                                    bool* chat) {
    const std::string target(request.target());
    const std::string path = target.substr(0, target.find('?'));
    const bool get = request.method() == http::verb::get;
    const bool post = request.method() == http::verb::post;

    if (path == "/health") {
      if (!get) return ErrorBytes(MethodNotAllowed("GET", "Use GET /health."), keep);
      absl::Status ready =
          draining_ ? absl::UnavailableError("The gateway is shutting down.") : readiness_();
      if (!ready.ok()) {
        return ErrorBytes(
            absl::UnavailableError(Cat("The cluster is not ready: ", std::string(ready.message()))),
            keep);
      }
      return JsonBytes(200, R"({"status":"ok"})", keep);
    }
    if (path == "/metrics") {
      http::response<http::string_body> r{http::status::ok, 11};
      r.set(http::field::content_type, "text/plain; version=0.0.4");
      r.keep_alive(keep);
      r.body() = metrics_->registry.RenderText();
      r.prepare_payload();
      return Serialize(r);
    }
    if (path.rfind("/v1/", 0) != 0) {
      return ErrorBytes(absl::NotFoundError(Cat("Unknown path ", path, ".")), keep);
    }
    if (!Authorized(request)) {
      metrics_->Requests("http", 401).Inc();
      return ErrorBytes(absl::UnauthenticatedError("Incorrect API key provided. Pass it as "
                                                   "'Authorization: Bearer <key>'."),
                        keep);
    }
    if (path == "/v1/models" || path.rfind("/v1/models/", 0) == 0) {
      if (!get) return ErrorBytes(MethodNotAllowed("GET", "Use GET on /v1/models."), keep);
      json::object model{{"id", runner_->card().id},
                         {"object", "model"},
                         {"created", 0},
                         {"owned_by", "expertmesh"},
                         {"max_model_len", runner_->max_context()}};
      if (path == "/v1/models") {
        json::object list{{"object", "list"}, {"data", json::array{model}}};
        return JsonBytes(200, json::serialize(list), keep);
      }
      if (path.substr(std::string_view("/v1/models/").size()) != runner_->card().id) {
        return ErrorBytes(UnknownModel(path.substr(11)), keep);
      }
      return JsonBytes(200, json::serialize(model), keep);
    }
    const bool completions = path == "/v1/completions";
    *chat = path == "/v1/chat/completions";
    if (!completions && !*chat) {
      return ErrorBytes(absl::NotFoundError(Cat("Unknown path ", path, ".")), keep);
    }
    if (!post) return ErrorBytes(MethodNotAllowed("POST", Cat("Use POST ", path, ".")), keep);
    return std::nullopt;
  }

  // A completion request: parsing, tokenizing and generating run on a worker; this coroutine
  // waits without a thread. Returns whether the connection may be kept open.
  net::awaitable<bool> Generation(const std::shared_ptr<Conn>& c,
                                  const http::request<http::string_body>& request, bool chat,
                                  bool keep) {
    const std::string client = ClientKey(*c, request);
    bool keep_after = false;
    const std::function<void()> work = [&] {
      keep_after = Generate(c, request.body(), chat, keep, client);
    };
    const bool ran = co_await RunOnWorker(work);
    if (ran) co_return keep_after;
    metrics_->Requests(chat ? "chat" : "completions", 429).Inc();
    metrics_->queue_rejected.Inc();
    const std::string refusal = ErrorBytes(
        WithRetryAfter(
            absl::ResourceExhaustedError("Too many requests in flight at this gateway; retry "
                                         "later."),
            1),
        keep, 429);
    const bool sent = co_await Send(c, refusal);
    co_return sent&& keep;
  }

  // The admission queue's fair-share key: the API key when keys are configured (only a
  // digest of it is kept), else the peer's address (without the port).
  std::string ClientKey(Conn& c, const http::request<http::string_body>& request) const {
    if (!api_keys_.empty()) {
      auto it = request.find(http::field::authorization);
      if (it != request.end()) {
        const std::string_view value(it->value().data(), it->value().size());
        return Cat("key:", std::hash<std::string_view>{}(value));
      }
    }
    error_code ec;
    const tcp::endpoint peer = c.socket.remote_endpoint(ec);
    return ec ? std::string("peer:?") : Cat("peer:", peer.address().to_string());
  }

  // A sink that writes SSE chunks from the generation worker; the headers go out with the
  // first chunk, so that errors found before any token (429, 503 ...) still get their HTTP
  // status.
  class SseSink : public GenerationSink {
   public:
    SseSink(Impl& server, std::shared_ptr<Conn> c, OpenAiResponder& responder, bool include_usage)
        : server_(server), c_(std::move(c)), responder_(responder), include_usage_(include_usage) {}
    bool OnDelta(const Delta& delta) override {
      return SendHeaders() && Send(SseEvent(responder_.Chunk(delta, include_usage_)));
    }
    bool ClientGone() override { return broken_ || c_->cancel.load() || PeerHungUp(c_->fd); }
    // The header is sent with the next chunk.
    bool SendHeaders() {
      if (headers_sent_) return !broken_;
      headers_sent_ = true;
      http::response<http::empty_body> r{http::status::ok, 11};
      r.set(http::field::server, "expertmesh-gateway");
      r.set(http::field::content_type, "text/event-stream");
      r.set(http::field::cache_control, "no-cache");
      r.chunked(true);
      std::ostringstream os;
      os << r.base();
      header_ = std::move(os).str();
      return !broken_;
    }
    bool Send(const std::string& data) { return Write(Chunk(data)); }
    bool End() { return Write("0\r\n\r\n"); }
    bool headers_sent() const { return headers_sent_; }

   private:
    bool Write(std::string bytes) {
      if (broken_) return false;
      if (!header_.empty()) bytes = std::exchange(header_, std::string()) + bytes;
      broken_ = !server_.SendFromWorker(c_, std::move(bytes));
      return !broken_;
    }
    Impl& server_;
    std::shared_ptr<Conn> c_;
    OpenAiResponder& responder_;
    const bool include_usage_;
    std::string header_;
    bool headers_sent_ = false;
    bool broken_ = false;
  };

  class CollectSink : public GenerationSink {
   public:
    CollectSink(Conn& c, OpenAiResponder& responder) : c_(c), responder_(responder) {}
    bool OnDelta(const Delta& delta) override {
      responder_.Collect(delta);
      return true;
    }
    bool ClientGone() override { return c_.cancel.load() || PeerHungUp(c_.fd); }

   private:
    Conn& c_;
    OpenAiResponder& responder_;
  };

  // On a generation worker: one completion request, answered in full. Returns whether the
  // connection may be kept open.
  bool Generate(const std::shared_ptr<Conn>& c, const std::string& body, bool chat, bool keep,
                std::string client) {
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
      return SendFromWorker(c, ErrorBytes(prepared.status(), keep)) && keep;
    }
    const GenerationRequest& r = prepared->request;
    OpenAiResponder responder(r, Cat(chat ? "chatcmpl-" : "cmpl-", prepared->request_id),
                              UnixNow());
    if (!r.stream) {
      CollectSink sink(*c, responder);
      absl::StatusOr<Outcome> outcome = runner_->Run(*prepared, sink);
      if (!outcome.ok()) {
        metrics_->Requests(api, ToApiError(outcome.status()).http_status).Inc();
        if (outcome.status().code() == absl::StatusCode::kCancelled) return false;
        return SendFromWorker(c, ErrorBytes(outcome.status(), keep)) && keep;
      }
      metrics_->Requests(api, 200).Inc();
      return SendFromWorker(c, JsonBytes(200, responder.Full(*outcome), keep)) && keep;
    }
    SseSink sink(*this, c, responder, r.include_usage);
    absl::StatusOr<Outcome> outcome = runner_->Run(*prepared, sink);
    if (!outcome.ok()) {
      metrics_->Requests(api, ToApiError(outcome.status()).http_status).Inc();
      if (outcome.status().code() == absl::StatusCode::kCancelled) return false;
      if (!sink.headers_sent())
        return SendFromWorker(c, ErrorBytes(outcome.status(), keep)) && keep;
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
  net::executor_work_guard<net::io_context::executor_type> work_;
  tcp::acceptor acceptor_;
  net::steady_timer accept_retry_;           // acceptor strand
  Clock::time_point last_accept_warning_{};  // acceptor strand
  WorkerPool workers_;
  std::vector<std::thread> io_threads_;
  int max_connections_;
  std::unique_ptr<TlsContexts> tls_;  // null: plain HTTP
  int port_ = 0;
  std::atomic<int> open_{0};
  std::atomic<bool> draining_{false};
  std::atomic<bool> drained_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<Conn*, std::shared_ptr<Conn>> conns_;
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
int HttpServer::generation_threads() const { return impl_->generation_threads(); }

}  // namespace expertmesh::gateway
