// netdelay: a userspace TCP relay that adds a fixed one-way delay to each direction of every
// connection it forwards, plus the echo server and ping-pong client that measure it.
//
// Why a relay and not `tc qdisc ... netem delay`: the kernels these benchmarks run on are built
// without sch_netem (tbf and htb are there), so latency cannot come from the qdisc layer. The
// relay sits in front of a service (e.g. inside a shard's network namespace, listening on the
// namespace's veth address and forwarding to the service on the namespace's loopback): every
// chunk read from one side is stamped with (arrival time + delay) and put on a bounded FIFO, and
// the same thread (one per direction, so no hand-off between threads) writes the head chunk to
// the other side once its stamp has passed, sleeping in ppoll() until then or until more data
// comes. So each byte arrives `delay` later than it would have, in the order it was
// sent, and the relay does not limit throughput as long as the queue holds bandwidth x delay
// (25 Gbit/s x 0.5 ms = 1.6 MB; the default bound is 16 MiB per direction; a full queue makes
// the reader wait, which is TCP back-pressure, never a drop).
//
// What it does not model: packet loss, reordering, jitter beyond its own scheduling noise
// (measure it: `netdelay --ping` through the relay at --delay-us 0 against the direct path),
// and per-packet serialization (the bandwidth limit is tbf's job on the veth). Delay is added
// per read() chunk, not per packet: a chunk that arrives as several packets keeps their
// spacing only up to the size of one read.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace expertmesh::netdelay {

struct RelayOptions {
  std::string listen;                  // host:port this relay accepts on (port 0 = any)
  std::string connect;                 // host:port each accepted connection is forwarded to
  std::chrono::microseconds delay{0};  // one-way delay added to each direction
  size_t max_queue_bytes = 16u << 20;  // per direction per connection
  int max_connections = 64;            // further connections are accepted and closed at once
};

// Parses "host:port" (IPv4 dotted quad or "localhost"); port 0..65535.
absl::Status ParseAddress(const std::string& address, std::string* host, uint16_t* port);

class Relay {
 public:
  // Binds and listens, then accepts on a thread of its own until destroyed.
  static absl::StatusOr<std::unique_ptr<Relay>> Create(const RelayOptions& options);
  ~Relay();  // stops accepting, cuts every connection, joins every thread
  Relay(const Relay&) = delete;
  Relay& operator=(const Relay&) = delete;

  uint16_t port() const { return port_; }
  int64_t connections_accepted() const { return accepted_.load(); }

 private:
  struct Connection;
  explicit Relay(RelayOptions options) : options_(std::move(options)) {}
  void AcceptLoop();
  void Reap(bool all);

  RelayOptions options_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> accepted_{0};
  std::thread accept_thread_;
  std::mutex mu_;
  std::vector<std::shared_ptr<Connection>> connections_;  // guarded by mu_
};

// Writes back whatever it reads on each connection (one thread per connection).
class EchoServer {
 public:
  static absl::StatusOr<std::unique_ptr<EchoServer>> Create(const std::string& listen,
                                                            int max_connections = 64);
  ~EchoServer();
  EchoServer(const EchoServer&) = delete;
  EchoServer& operator=(const EchoServer&) = delete;
  uint16_t port() const { return port_; }

 private:
  EchoServer() = default;
  void AcceptLoop(int max_connections);

  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread accept_thread_;
  std::mutex mu_;
  std::vector<int> fds_;              // open connections, guarded by mu_
  std::vector<std::thread> workers_;  // guarded by mu_
};

// Round trips of `bytes` bytes to an echo server at `address` (TCP_NODELAY): `warmup` unmeasured,
// then `count` measured; each reply is compared with what was sent. Returns the round-trip times
// in microseconds, in order.
absl::StatusOr<std::vector<double>> PingPong(const std::string& address, size_t bytes, int count,
                                             int warmup);

}  // namespace expertmesh::netdelay
