// The OpenAI-compatible HTTP API on Boost.Beast: POST /v1/completions, POST
// /v1/chat/completions (JSON or SSE with stream: true), GET /v1/models[/{id}], GET /health
// (503 with an OpenAI-style error until an attention replica is ready, and while draining),
// GET /metrics (Prometheus text). Optional API keys (Authorization: Bearer) guard /v1/*.
//
// Asynchronous: every connection is an Asio C++20 coroutine on its own strand, run by a small
// fixed pool of I/O threads (`io_threads`), so an idle or slow connection costs memory (a few
// KiB) and no thread. Each connection reads its requests one after another (pipelined requests
// are answered in order) with a size limit and deadlines (the whole header within
// header_timeout, the body within body_timeout, the next request on a keep-alive connection
// within idle_timeout, every response write within send_timeout; past one the connection is
// closed, after a 408 when a request had begun). The number of connections is bounded (beyond:
// 503 and close).
//
// Generations (RequestRunner::Run) are synchronous: a completion request runs on a generation
// worker (a pool that grows on demand to `max_generations` threads and shrinks when idle), and
// its connection's coroutine waits without a thread. The worker writes the response (SSE
// chunks one by one) through the connection's strand and waits for each write, so a slow
// reader slows its own generation only. Admission (admission.h) bounds what the workers do:
// a worker either generates (at most --max-running) or waits in the admission queue; the
// gateway sizes max_generations as max_running + max_waiting, and a request beyond it gets
// 429. Between token events a generation checks whether its client hung up, and cancels the
// sequence if so.
// Drain(): stop accepting, close idle connections, let open requests finish within a grace
// period, then cancel what is left.
//
// Optional TLS (HttpTls; https): every connection is an Asio SSL stream over its socket. The
// handshake must finish within header_timeout; a client that does not speak TLS (plain HTTP
// to the TLS port) or fails verification is closed without an answer and costs nothing else.
// The certificate, key and optional client CA are read again when one of the files changes
// (checked at most every reload_check, when a connection is accepted): new connections get
// the new files, open ones keep theirs; a file that does not load keeps the previous ones
// (with a warning). The plain path is unchanged.
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

// Server-side TLS for the HTTP port (gateway --http-tls-cert/--http-tls-key/--http-tls-ca).
struct HttpTls {
  std::string cert;       // PEM certificate chain served to clients
  std::string key;        // PEM private key of cert
  std::string client_ca;  // optional: clients must present a certificate chaining to it
  std::chrono::milliseconds reload_check{std::chrono::seconds(1)};

  bool enabled() const { return !cert.empty() || !key.empty() || !client_ca.empty(); }
};
// InvalidArgument when only one of cert/key is given, or a client CA without them.
absl::Status ValidateHttpTls(const HttpTls& tls);

class HttpServer {
 public:
  struct Options {
    std::string host = "0.0.0.0";
    int port = 0;                       // 0 = any free port
    std::vector<std::string> api_keys;  // empty = no authentication
    uint32_t max_body_bytes = 8u << 20;
    uint32_t max_header_bytes = 64u << 10;  // request line + fields; beyond: 431 (or 414)
    uint32_t max_url_bytes = 16u << 10;     // the request target; beyond: 414
    // Open connections at most (also lowered to what RLIMIT_NOFILE allows, with a warning).
    int max_connections = 32768;
    int io_threads = 2;         // the Asio threads running every connection
    int max_generations = 256;  // generation worker threads at most (see above)
    // From the connection's start (or the first byte of a later request) to the header's end.
    std::chrono::milliseconds header_timeout{std::chrono::seconds(10)};
    // From the header's end to the body's end.
    std::chrono::milliseconds body_timeout{std::chrono::seconds(30)};
    // Keep-alive: from the end of a response to the first byte of the next request.
    std::chrono::milliseconds idle_timeout{std::chrono::seconds(60)};
    // Each response write (a whole response, or one SSE chunk) must be taken by the client
    // within this; else the connection closes (and its generation is cancelled).
    std::chrono::milliseconds send_timeout{std::chrono::seconds(30)};
    HttpTls tls;  // none: plain HTTP
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
  // Generation worker threads now alive (busy or idle).
  int generation_threads() const;

  class Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace expertmesh::gateway
