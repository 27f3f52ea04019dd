#include "service-common/metrics_http.h"

#include <chrono>
#include <map>
#include <mutex>
#include <thread>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "absl/strings/str_cat.h"
#include "core/base/check.h"
#include "spdlog/spdlog.h"

namespace expertmesh {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

constexpr auto kRequestTimeout = std::chrono::seconds(10);
constexpr size_t kMaxRequestBytes = 16 * 1024;

// The extra GET routes (path -> handler), shared by the server and its sessions.
struct Routes {
  std::mutex mu;
  std::map<std::string, HttpRouteHandler, std::less<>> by_path;

  // A copy of the handler for `path` (null when there is none), called outside the lock.
  HttpRouteHandler Find(std::string_view path) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = by_path.find(path);
    return it == by_path.end() ? nullptr : it->second;
  }
};

// One connection: read a request, answer, repeat while keep-alive.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, const MetricsRegistry* registry, std::shared_ptr<Routes> routes)
      : stream_(std::move(socket)), registry_(registry), routes_(std::move(routes)) {}

  void Start() { Read(); }

 private:
  void Read() {
    parser_.emplace();
    parser_->header_limit(kMaxRequestBytes);
    parser_->body_limit(kMaxRequestBytes);
    stream_.expires_after(kRequestTimeout);
    http::async_read(
        stream_, buffer_, *parser_,
        [self = shared_from_this()](beast::error_code ec, size_t) { self->OnRead(ec); });
  }

  void OnRead(beast::error_code ec) {
    if (ec) {
      beast::error_code ignored;
      stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
      return;
    }
    const auto& req = parser_->get();
    auto res = std::make_shared<http::response<http::string_body>>();
    res->version(req.version());
    res->keep_alive(req.keep_alive());
    res->set(http::field::server, "expertmesh");
    const std::string_view target(req.target().data(), req.target().size());
    const std::string_view path = target.substr(0, target.find('?'));
    const bool get_or_head = req.method() == http::verb::get || req.method() == http::verb::head;
    HttpRouteHandler route = path == "/metrics" ? nullptr : routes_->Find(path);
    if (route && get_or_head) {
      HttpReply reply = route();
      res->result(http::status::ok);
      res->set(http::field::content_type, reply.content_type);
      res->set(http::field::cache_control, "no-store");
      if (req.method() == http::verb::get) res->body() = std::move(reply.body);
    } else if (route) {
      res->result(http::status::method_not_allowed);
      res->set(http::field::allow, "GET, HEAD");
    } else if (path == "/metrics" && get_or_head) {
      res->result(http::status::ok);
      res->set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
      if (req.method() == http::verb::get) res->body() = registry_->RenderText();
    } else if (path == "/metrics") {
      res->result(http::status::method_not_allowed);
      res->set(http::field::allow, "GET, HEAD");
    } else {
      res->result(http::status::not_found);
      res->set(http::field::content_type, "text/plain");
      res->body() = "not found\n";
    }
    res->prepare_payload();
    http::async_write(stream_, *res,
                      [self = shared_from_this(), res](beast::error_code ec, size_t) {
                        if (ec || !res->keep_alive()) {
                          beast::error_code ignored;
                          self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
                          return;
                        }
                        self->Read();
                      });
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  const MetricsRegistry* registry_;
  std::shared_ptr<Routes> routes_;
};

}  // namespace

class MetricsHttpServer::Impl {
 public:
  explicit Impl(const MetricsRegistry* registry)
      : registry_(registry), routes_(std::make_shared<Routes>()), acceptor_(io_) {}

  absl::Status Listen(const std::string& host, int port) {
    beast::error_code ec;
    const auto address = asio::ip::make_address(host, ec);
    if (ec) return absl::InvalidArgumentError(absl::StrCat("metrics: bad address '", host, "'"));
    const tcp::endpoint endpoint(address, static_cast<unsigned short>(port));
    acceptor_.open(endpoint.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(endpoint, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      return absl::UnavailableError(
          absl::StrCat("metrics: cannot listen on ", host, ":", port, ": ", ec.message()));
    }
    port_ = acceptor_.local_endpoint().port();
    Accept();
    thread_ = std::thread([this] { io_.run(); });
    return absl::OkStatus();
  }

  void Accept() {
    acceptor_.async_accept([this](beast::error_code ec, tcp::socket socket) {
      if (ec) {
        if (ec == asio::error::operation_aborted) return;
        spdlog::warn("metrics: accept failed: {}", ec.message());
      } else {
        std::make_shared<Session>(std::move(socket), registry_, routes_)->Start();
      }
      Accept();
    });
  }

  ~Impl() {
    io_.stop();  // pending handlers (and the sessions they hold) die with io_
    if (thread_.joinable()) thread_.join();
  }

  int port() const { return port_; }
  Routes& routes() { return *routes_; }

 private:
  const MetricsRegistry* registry_;
  std::shared_ptr<Routes> routes_;
  asio::io_context io_;
  tcp::acceptor acceptor_;
  std::thread thread_;
  int port_ = 0;
};

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const MetricsRegistry* registry, const std::string& host, int port) {
  auto impl = std::make_unique<Impl>(registry);
  if (absl::Status s = impl->Listen(host, port); !s.ok()) return s;
  spdlog::info("metrics: serving http://{}:{}/metrics", host, impl->port());
  return std::unique_ptr<MetricsHttpServer>(new MetricsHttpServer(std::move(impl)));
}

MetricsHttpServer::MetricsHttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MetricsHttpServer::~MetricsHttpServer() = default;
int MetricsHttpServer::port() const { return impl_->port(); }

void MetricsHttpServer::AddRoute(const std::string& path, HttpRouteHandler handler) {
  EM_CHECK(!path.empty() && path[0] == '/' && path != "/metrics" && handler != nullptr,
           "MetricsHttpServer::AddRoute: a path starting with '/', not /metrics, and a handler");
  Routes& routes = impl_->routes();
  std::lock_guard<std::mutex> lock(routes.mu);
  routes.by_path[path] = std::move(handler);
}

absl::StatusOr<std::string> HttpGet(const std::string& host, int port, const std::string& path,
                                    int timeout_ms) {
  asio::io_context io;
  beast::tcp_stream stream(io);
  beast::error_code ec;
  const auto address = asio::ip::make_address(host, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("bad address '", host, "'"));
  stream.expires_after(std::chrono::milliseconds(timeout_ms));
  stream.async_connect(tcp::endpoint(address, static_cast<unsigned short>(port)),
                       [&](beast::error_code e) { ec = e; });
  io.run();
  if (ec) return absl::UnavailableError(absl::StrCat("GET ", path, ": ", ec.message()));
  http::request<http::empty_body> req{http::verb::get, path, 11};
  req.set(http::field::host, host);
  req.keep_alive(false);
  http::response<http::string_body> res;
  beast::flat_buffer buffer;
  io.restart();
  stream.expires_after(std::chrono::milliseconds(timeout_ms));
  http::async_write(stream, req, [&](beast::error_code e, size_t) {
    ec = e;
    if (!e) http::async_read(stream, buffer, res, [&](beast::error_code e2, size_t) { ec = e2; });
  });
  io.run();
  if (ec) return absl::UnavailableError(absl::StrCat("GET ", path, ": ", ec.message()));
  if (res.result() != http::status::ok) {
    return absl::UnknownError(absl::StrCat("GET ", path, ": HTTP ", res.result_int()));
  }
  return std::move(res.body());
}

}  // namespace expertmesh
