// libFuzzer target: the gateway's HTTP request path (gateway/http_server.cc) on untrusted bytes
// from a connection, without sockets or a cluster.
// Input: the bytes a client sends on one connection (one or more pipelined requests). They are
// read the way HttpServer::Impl::Serve reads them: Beast's http::read_header + http::read into
// a request_parser<string_body> with the server's header and body limits, from a stream that
// hands them over in uneven pieces; then each parsed request goes through the server's checks
// (URL length, Host on HTTP/1.1), routing, the API-key check and, for the two generation
// endpoints, ParseCompletionRequest / ParseChatCompletionRequest; every answer is built as the
// server builds it (ToApiError, ApiErrorJson, a Beast response) and serialized.
// The routing lives in HttpServer::Impl (private, tied to a socket and a RequestRunner), so it
// is mirrored here rather than called: keep the two in step when the server's routes change.
// Promises checked (a broken one traps): every answer is a well-formed JSON error or success,
// with a 4xx status for a request the client got wrong; no parse outcome leaves the parser in a
// state the server's error handling reads wrongly (e.g. target() after header_limit).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include <boost/asio/error.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>

#include "gateway/api_error.h"
#include "gateway/api_keys.h"
#include "gateway/openai_parse.h"
#include "gateway/strings.h"

namespace {

namespace gw = expertmesh::gateway;
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;

void Check(bool condition) {
  if (!condition) __builtin_trap();
}

// HttpServer::Options' defaults (gateway/http_server.h).
constexpr uint32_t kMaxBodyBytes = 8u << 20;
constexpr uint32_t kMaxHeaderBytes = 64u << 10;
constexpr uint32_t kMaxUrlBytes = 16u << 10;
constexpr std::string_view kApiKey = "sk-fuzz";

// The client's bytes as Beast's synchronous read stream: each read_some returns the next piece
// (sizes cycle through 1, 7, 64 and 4096 bytes, so that every parser state meets a split), then
// end of stream.
class MemoryStream {
 public:
  using executor_type = net::io_context::executor_type;
  MemoryStream(net::io_context& io, std::string_view data) : io_(io), data_(data) {}
  executor_type get_executor() { return io_.get_executor(); }

  template <class MutableBuffers>
  size_t read_some(const MutableBuffers& buffers, boost::system::error_code& ec) {
    static constexpr size_t kPieces[] = {1, 7, 64, 4096};
    if (data_.empty()) {
      ec = net::error::eof;
      return 0;
    }
    ec = {};
    size_t n = std::min({data_.size(), kPieces[piece_++ % 4], beast::buffer_bytes(buffers)});
    n = net::buffer_copy(buffers, net::buffer(data_.data(), n));
    data_.remove_prefix(n);
    return n;
  }
  template <class MutableBuffers>
  size_t read_some(const MutableBuffers& buffers) {
    boost::system::error_code ec;
    const size_t n = read_some(buffers, ec);
    if (ec) throw boost::system::system_error(ec);
    return n;
  }

 private:
  net::io_context& io_;
  std::string_view data_;
  size_t piece_ = 0;
};

const gw::ModelCard& Card() {
  static const gw::ModelCard* card = [] {
    auto* c = new gw::ModelCard;
    c->id = "expertmesh-tiny";
    c->max_context = 4096;
    return c;
  }();
  return *card;
}

// WriteJson: the response the server would send, serialized.
void Answer(int status, const std::string& body, bool keep_alive, int retry_after_s = 0,
            const std::optional<std::string>& allow = std::nullopt) {
  Check(status >= 200 && status < 600);
  http::response<http::string_body> r{static_cast<http::status>(status), 11};
  r.set(http::field::server, "expertmesh-gateway");
  r.set(http::field::content_type, "application/json");
  if (retry_after_s > 0) r.set(http::field::retry_after, std::to_string(retry_after_s));
  if (allow) r.set(http::field::allow, *allow);
  r.keep_alive(keep_alive);
  r.body() = body;
  r.prepare_payload();
  std::string wire;
  http::serializer<false, http::string_body> sr{r};
  boost::system::error_code ec;
  while (!sr.is_done()) {
    sr.next(ec, [&](boost::system::error_code&, const auto& buffers) {
      for (auto b : beast::buffers_range_ref(buffers)) {
        wire.append(static_cast<const char*>(b.data()), b.size());
      }
      sr.consume(beast::buffer_bytes(buffers));
    });
    Check(!ec);
  }
  Check(wire.size() > body.size());
}

// WriteError, for a request the client got wrong (`expected` is its HTTP status, 0 = any 4xx).
void AnswerError(const absl::Status& status, bool keep_alive, int override_status = 0,
                 int expected = 0) {
  gw::ApiError e = gw::ToApiError(status);
  if (override_status != 0) e.http_status = override_status;
  if (expected != 0) {
    Check(e.http_status == expected);
  } else {
    Check(e.http_status >= 400 && e.http_status < 500);
  }
  const std::string json = gw::ApiErrorJson(e);
  boost::system::error_code ec;
  const boost::json::value v = boost::json::parse(json, ec);
  Check(!ec && v.is_object() && v.as_object().contains("error"));
  Answer(e.http_status, json, keep_alive, e.retry_after_s, e.allow);
}

absl::Status UrlTooLong() {
  return absl::InvalidArgumentError(gw::Cat("The request URL exceeds ", kMaxUrlBytes, " bytes."));
}

bool Authorized(const gw::ApiKeyChecker& keys, const http::request<http::string_body>& request) {
  if (keys.empty()) return true;
  auto it = request.find(http::field::authorization);
  if (it == request.end()) return false;
  std::string_view value(it->value().data(), it->value().size());
  constexpr std::string_view kBearer = "Bearer ";
  if (value.substr(0, kBearer.size()) != kBearer) return false;
  value.remove_prefix(kBearer.size());
  return keys.Accepts(value);
}

// HttpServer::Impl::Handle up to the point where a running cluster is needed (readiness, the
// metrics registry, RequestRunner::Prepare). Returns whether the connection stays open.
bool Handle(const gw::ApiKeyChecker& keys, http::request<http::string_body>& request) {
  const std::string target(request.target());
  const std::string path = target.substr(0, target.find('?'));
  const bool keep = request.keep_alive();
  const bool get = request.method() == http::verb::get;
  const bool post = request.method() == http::verb::post;
  if (path == "/health" || path == "/metrics") {
    if (path == "/health" && !get) {
      AnswerError(gw::MethodNotAllowed("GET", "Use GET /health."), keep, 0, 405);
    } else {
      Answer(200, R"({"status":"ok"})", keep);
    }
    return keep;
  }
  if (path.rfind("/v1/", 0) != 0) {
    AnswerError(absl::NotFoundError(gw::Cat("Unknown path ", path, ".")), keep, 0, 404);
    return keep;
  }
  if (!Authorized(keys, request)) {
    AnswerError(absl::UnauthenticatedError("Incorrect API key provided."), keep, 0, 401);
    return keep;
  }
  if (path == "/v1/models" || path.rfind("/v1/models/", 0) == 0) {
    if (!get) {
      AnswerError(gw::MethodNotAllowed("GET", "Use GET on /v1/models."), keep, 0, 405);
    } else if (path != "/v1/models" &&
               path.substr(std::string_view("/v1/models/").size()) != Card().id) {
      AnswerError(gw::UnknownModel(path.substr(11)), keep, 0, 404);
    } else {
      Answer(200, R"({"object":"model"})", keep);
    }
    return keep;
  }
  const bool completions = path == "/v1/completions";
  const bool chat = path == "/v1/chat/completions";
  if (!completions && !chat) {
    AnswerError(absl::NotFoundError(gw::Cat("Unknown path ", path, ".")), keep, 0, 404);
    return keep;
  }
  if (!post) {
    AnswerError(gw::MethodNotAllowed("POST", gw::Cat("Use POST ", path, ".")), keep, 0, 405);
    return keep;
  }
  const gw::RequestLimits limits;
  absl::StatusOr<gw::GenerationRequest> parsed =
      chat ? gw::ParseChatCompletionRequest(request.body(), Card(), limits)
           : gw::ParseCompletionRequest(request.body(), Card(), limits);
  if (!parsed.ok()) {
    AnswerError(parsed.status(), keep);
    return keep;
  }
  Check(gw::ValidateGenerationRequest(*parsed, Card(), limits).ok());
  return keep;  // here the server hands the request to RequestRunner::Prepare
}

// HttpServer::Impl::Serve on one connection's bytes.
void Serve(std::string_view bytes, const gw::ApiKeyChecker& keys) {
  net::io_context io;
  MemoryStream stream(io, bytes);
  beast::flat_buffer buffer;
  for (int requests = 0; requests < 64; ++requests) {
    http::request_parser<http::string_body> parser;
    parser.body_limit(kMaxBodyBytes);
    parser.header_limit(kMaxHeaderBytes);
    boost::system::error_code ec;
    http::read_header(stream, buffer, parser, ec);
    if (!ec) {
      (void)(parser.get()[http::field::expect] == "100-continue");
      http::read(stream, buffer, parser, ec);
    }
    if (ec == http::error::body_limit) {
      AnswerError(absl::InvalidArgumentError(
                      gw::Cat("The request body exceeds ", kMaxBodyBytes, " bytes.")),
                  false, 413, 413);
      return;
    }
    if (ec == http::error::header_limit) {
      const size_t target = parser.get().target().size();
      if (target == 0 || target > kMaxUrlBytes) {
        AnswerError(UrlTooLong(), false, 414, 414);
      } else {
        AnswerError(absl::InvalidArgumentError(
                        gw::Cat("The request header exceeds ", kMaxHeaderBytes, " bytes.")),
                    false, 431, 431);
      }
      return;
    }
    if (ec) return;  // closed, or not HTTP
    Check(parser.is_done());
    http::request<http::string_body> request = parser.release();
    Check(request.body().size() <= kMaxBodyBytes);
    if (request.target().size() > kMaxUrlBytes) {
      AnswerError(UrlTooLong(), false, 414, 414);
      return;
    }
    if (request.version() >= 11 && request.find(http::field::host) == request.end()) {
      AnswerError(absl::InvalidArgumentError("HTTP/1.1 requests must carry a Host header."), false,
                  400, 400);
      return;
    }
    if (!Handle(keys, request) || !request.keep_alive()) return;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const gw::ApiKeyChecker* no_keys = new gw::ApiKeyChecker({});
  static const gw::ApiKeyChecker* keys = new gw::ApiKeyChecker({std::string(kApiKey)});
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  Serve(bytes, *no_keys);
  Serve(bytes, *keys);
  return 0;
}
