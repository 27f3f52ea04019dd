// A tiny HTTP server (Boost.Beast on Asio, one thread) that serves a MetricsRegistry at
// GET /metrics in the Prometheus text format, on its own port, apart from the gRPC port.
// A service may add a few more GET routes (the router's operator page); any other path gets
// 404; requests are read with a size limit and a timeout.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "service-common/metrics.h"

namespace expertmesh {

// What an extra route answers: 200 with this body and Content-Type.
struct HttpReply {
  std::string content_type;
  std::string body;
};
// Runs on the server's one thread, once per GET (HEAD too: the body is then dropped); must
// not block for long, and must stay callable until the server is destroyed or the route
// replaced.
using HttpRouteHandler = std::function<HttpReply()>;

class MetricsHttpServer {
 public:
  // Binds host:port (port 0 = any free port) and starts serving on a background thread.
  // The registry must outlive the server.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const MetricsRegistry* registry,
                                                                  const std::string& host,
                                                                  int port);
  ~MetricsHttpServer();  // stops the thread and closes the socket
  int port() const;
  // Serves GET/HEAD `path` (an exact match; the query string is ignored) with `handler`;
  // other methods on it get 405. `path` must start with '/' and must not be /metrics.
  // Thread-safe: routes may be added while serving.
  void AddRoute(const std::string& path, HttpRouteHandler handler);

  class Impl;

 private:
  explicit MetricsHttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Fetches http://host:port/path with a plain GET (used by tests and the launcher).
// Returns the body of a 200 response; other statuses are errors naming the status.
absl::StatusOr<std::string> HttpGet(const std::string& host, int port, const std::string& path,
                                    int timeout_ms = 5000);

}  // namespace expertmesh
