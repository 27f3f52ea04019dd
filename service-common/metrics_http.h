// A tiny HTTP server (Boost.Beast on Asio, one thread) that serves a MetricsRegistry at
// GET /metrics in the Prometheus text format, on its own port, apart from the gRPC port.
// Anything else gets 404; requests are read with a size limit and a timeout.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "service-common/metrics.h"

namespace expertmesh {

class MetricsHttpServer {
 public:
  // Binds host:port (port 0 = any free port) and starts serving on a background thread.
  // The registry must outlive the server.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const MetricsRegistry* registry,
                                                                  const std::string& host,
                                                                  int port);
  ~MetricsHttpServer();  // stops the thread and closes the socket
  int port() const;

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
