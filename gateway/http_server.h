// The OpenAI-compatible HTTP API on Boost.Beast: POST /v1/completions, POST
// /v1/chat/completions (JSON or SSE with stream: true), GET /v1/models[/{id}], GET /health
// (503 with an OpenAI-style error until an attention replica is ready, and while draining),
// GET /metrics (Prometheus text). Optional API keys (Authorization: Bearer) guard /v1/*.
//
// An Asio acceptor hands each connection to its own thread, which reads requests with a size
// limit and deadlines (the whole header within header_timeout, the body within body_timeout,
// the next request on a keep-alive connection within idle_timeout; past one the connection is
// closed) and runs generations synchronously; the number of connections is bounded, admission
// (admission.h) bounds the generations. Between token
// events a connection checks whether its client hung up, and cancels the sequence if so.
// Drain(): stop accepting, close idle connections, let open requests finish within a grace
// period, then cancel what is left.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gateway/generation.h"
#include "service-common/metrics.h"

namespace expertmesh::gateway {

class HttpServer {
 public:
  struct Options {
    std::string host = "0.0.0.0";
    int port = 0;                       // 0 = any free port
    std::vector<std::string> api_keys;  // empty = no authentication
    uint32_t max_body_bytes = 8u << 20;
    uint32_t max_header_bytes = 64u << 10;  // request line + fields; beyond: 431 (or 414)
    uint32_t max_url_bytes = 16u << 10;     // the request target; beyond: 414
    int max_connections = 1024;
    // From the connection's start (or the first byte of a later request) to the header's end.
    std::chrono::milliseconds header_timeout{std::chrono::seconds(10)};
    // From the header's end to the body's end.
    std::chrono::milliseconds body_timeout{std::chrono::seconds(30)};
    // Keep-alive: from the end of a response to the first byte of the next request.
    std::chrono::milliseconds idle_timeout{std::chrono::seconds(60)};
  };
  // Readiness for /health: OK, or the reason the gateway cannot serve yet.
  using ReadinessFn = std::function<absl::Status()>;

  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(Options options,
                                                           const RequestRunner* runner,
                                                           GatewayMetrics* metrics,
                                                           ReadinessFn readiness);
  ~HttpServer();  // Drain(0)

  int port() const;
  // Stops accepting, lets open requests finish for up to `grace`, cancels the rest, joins.
  void Drain(std::chrono::milliseconds grace);
  int open_connections() const;

  class Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace expertmesh::gateway
