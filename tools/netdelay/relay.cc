#include "tools/netdelay/relay.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <deque>
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace expertmesh::netdelay {
namespace {

using Clock = std::chrono::steady_clock;       // CLOCK_MONOTONIC on Linux
constexpr size_t kChunkBytes = 64 << 10;       // one read()
constexpr size_t kInlineSendBytes = 64 << 10;  // PingPong: fits the socket buffers

absl::Status Errno(const std::string& what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", strerror(errno)));
}

void SetNoDelay(int fd) {
  int one = 1;
  (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// Timer slack is per thread: 1 ns instead of the default 50 us, so a delayed chunk leaves
// close to its stamp.
void TightTimers() { (void)prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL); }

absl::StatusOr<sockaddr_in> Resolve(const std::string& address) {
  std::string host;
  uint16_t port = 0;
  if (absl::Status s = ParseAddress(address, &host, &port); !s.ok()) return s;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  if (inet_pton(AF_INET, host.c_str(), &sa.sin_addr) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("not an IPv4 address: ", host));
  }
  return sa;
}

absl::StatusOr<int> Listen(const std::string& address, uint16_t* bound_port) {
  absl::StatusOr<sockaddr_in> sa = Resolve(address);
  if (!sa.ok()) return sa.status();
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Errno("socket");
  int one = 1;
  (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, reinterpret_cast<const sockaddr*>(&*sa), sizeof *sa) != 0 || listen(fd, 64) != 0) {
    absl::Status s = Errno(absl::StrCat("bind/listen ", address));
    close(fd);
    return s;
  }
  sockaddr_in got{};
  socklen_t len = sizeof got;
  getsockname(fd, reinterpret_cast<sockaddr*>(&got), &len);
  *bound_port = ntohs(got.sin_port);
  return fd;
}

absl::StatusOr<int> Connect(const std::string& address) {
  absl::StatusOr<sockaddr_in> sa = Resolve(address);
  if (!sa.ok()) return sa.status();
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Errno("socket");
  if (connect(fd, reinterpret_cast<const sockaddr*>(&*sa), sizeof *sa) != 0) {
    absl::Status s = Errno(absl::StrCat("connect ", address));
    close(fd);
    return s;
  }
  SetNoDelay(fd);
  return fd;
}

bool WriteAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool ReadAll(int fd, char* p, size_t n) {
  while (n > 0) {
    const ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// Accepts with a 100 ms poll so the loop notices `stopping`. -1: nothing (yet).
int AcceptOrTimeout(int listen_fd) {
  pollfd p{listen_fd, POLLIN, 0};
  if (poll(&p, 1, 100) <= 0) return -1;
  return accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
}

// A chunk read from one side, due on the other side at `due`; empty data: end of stream.
struct Chunk {
  Clock::time_point due;
  std::vector<char> data;
};

}  // namespace

absl::Status ParseAddress(const std::string& address, std::string* host, uint16_t* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(absl::StrCat("address '", address, "' is not host:port"));
  }
  int p = -1;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &p) || p < 0 || p > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("bad port in '", address, "'"));
  }
  *host = address.substr(0, colon);
  if (*host == "localhost") *host = "127.0.0.1";
  *port = static_cast<uint16_t>(p);
  return absl::OkStatus();
}

// Two sockets and one thread per direction. The thread owns that direction's FIFO: it
// ppoll()s the source socket with a timeout at the head chunk's due time, reads into the FIFO
// (not while the FIFO holds max_queue_bytes: back-pressure) and writes each chunk once due. One
// thread per direction and no hand-off between threads keeps the relay's own cost to a wake-up
// and two syscalls per chunk.
struct Relay::Connection {
  int fd[2] = {-1, -1};  // 0: accepted client, 1: upstream
  std::vector<std::thread> threads;
  std::atomic<int> running{0};

  // Any failure cuts both sockets: the peers see the connection end, as they would if a
  // middlebox died; both threads wake up from ppoll/read/send and leave.
  void Cut() {
    for (int f : fd) shutdown(f, SHUT_RDWR);
  }
  // Copies fd[i] to fd[1 - i], each chunk `delay` after it was read.
  void Pump(int i, std::chrono::microseconds delay, size_t max_queue_bytes) {
    TightTimers();
    const int in = fd[i], out = fd[1 - i];
    std::deque<Chunk> fifo;
    size_t queued = 0;
    bool read_eof = false;
    std::vector<char> buf(kChunkBytes);
    for (;;) {
      Clock::time_point now = Clock::now();
      bool done = false, failed = false;
      while (!fifo.empty() && fifo.front().due <= now) {
        Chunk& c = fifo.front();
        if (c.data.empty()) {
          shutdown(out, SHUT_WR);  // the end of the stream, after its delay too
          done = true;
          break;
        }
        if (!WriteAll(out, c.data.data(), c.data.size())) {
          failed = true;
          break;
        }
        queued -= c.data.size();
        fifo.pop_front();
        now = Clock::now();
      }
      if (failed) Cut();
      if (done || failed) break;
      const bool can_read = !read_eof && (queued == 0 || queued + kChunkBytes <= max_queue_bytes);
      pollfd p{in, static_cast<short>(can_read ? POLLIN : 0), 0};
      timespec ts{};
      if (!fifo.empty()) {
        const auto ns =
            std::chrono::duration_cast<std::chrono::nanoseconds>(fifo.front().due - now).count();
        ts.tv_sec = static_cast<time_t>(ns / 1000000000);
        ts.tv_nsec = static_cast<long>(ns % 1000000000);
      }
      const int n = ppoll(&p, 1, fifo.empty() ? nullptr : &ts, nullptr);
      if (n < 0 && errno != EINTR) {
        Cut();
        break;
      }
      if (n <= 0 || !can_read || p.revents == 0) continue;
      const ssize_t r = read(in, buf.data(), buf.size());
      if (r < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        Cut();
        break;
      }
      if (r == 0) read_eof = true;
      fifo.push_back(Chunk{Clock::now() + delay, std::vector<char>(buf.data(), buf.data() + r)});
      queued += static_cast<size_t>(r);
    }
    running.fetch_sub(1);
  }
  ~Connection() {
    for (std::thread& t : threads) t.join();
    for (int f : fd) {
      if (f >= 0) close(f);
    }
  }
};

absl::StatusOr<std::unique_ptr<Relay>> Relay::Create(const RelayOptions& options) {
  if (options.delay.count() < 0 || options.delay > std::chrono::seconds(10)) {
    return absl::InvalidArgumentError("delay must be in [0, 10 s]");
  }
  if (options.max_queue_bytes < kChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_queue_bytes must be at least one chunk (", kChunkBytes, ")"));
  }
  if (options.max_connections < 1) {
    return absl::InvalidArgumentError("max_connections must be >= 1");
  }
  std::string host;
  uint16_t port = 0;
  if (absl::Status s = ParseAddress(options.connect, &host, &port); !s.ok()) return s;
  std::unique_ptr<Relay> relay(new Relay(options));
  absl::StatusOr<int> fd = Listen(options.listen, &relay->port_);
  if (!fd.ok()) return fd.status();
  relay->listen_fd_ = *fd;
  relay->accept_thread_ = std::thread([r = relay.get()] { r->AcceptLoop(); });
  return relay;
}

void Relay::Reap(bool all) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = connections_.begin(); it != connections_.end();) {
    if (all) (*it)->Cut();
    if (all || (*it)->running.load() == 0) {
      it = connections_.erase(it);  // ~Connection joins and closes
    } else {
      ++it;
    }
  }
}

void Relay::AcceptLoop() {
  TightTimers();
  while (!stopping_.load()) {
    Reap(false);
    const int client = AcceptOrTimeout(listen_fd_);
    if (client < 0) continue;
    accepted_.fetch_add(1);
    SetNoDelay(client);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (static_cast<int>(connections_.size()) >= options_.max_connections) {
        close(client);
        continue;
      }
    }
    absl::StatusOr<int> upstream = Connect(options_.connect);
    if (!upstream.ok()) {  // the client sees its connection closed, as with a dead service
      close(client);
      continue;
    }
    auto c = std::make_shared<Connection>();
    c->fd[0] = client;
    c->fd[1] = *upstream;
    c->running.store(2);
    for (int i = 0; i < 2; ++i) {
      c->threads.emplace_back(
          [c = c.get(), i, d = options_.delay, m = options_.max_queue_bytes] { c->Pump(i, d, m); });
    }
    std::lock_guard<std::mutex> lock(mu_);
    connections_.push_back(std::move(c));
  }
}

Relay::~Relay() {
  stopping_.store(true);
  if (accept_thread_.joinable()) accept_thread_.join();
  Reap(true);
  if (listen_fd_ >= 0) close(listen_fd_);
}

absl::StatusOr<std::unique_ptr<EchoServer>> EchoServer::Create(const std::string& listen,
                                                               int max_connections) {
  std::unique_ptr<EchoServer> server(new EchoServer());
  absl::StatusOr<int> fd = Listen(listen, &server->port_);
  if (!fd.ok()) return fd.status();
  server->listen_fd_ = *fd;
  server->accept_thread_ =
      std::thread([s = server.get(), max_connections] { s->AcceptLoop(max_connections); });
  return server;
}

void EchoServer::AcceptLoop(int max_connections) {
  while (!stopping_.load()) {
    const int fd = AcceptOrTimeout(listen_fd_);
    if (fd < 0) continue;
    std::lock_guard<std::mutex> lock(mu_);
    if (static_cast<int>(fds_.size()) >= max_connections) {
      close(fd);
      continue;
    }
    SetNoDelay(fd);
    fds_.push_back(fd);
    workers_.emplace_back([fd] {
      std::vector<char> buf(kChunkBytes);
      for (;;) {
        const ssize_t r = read(fd, buf.data(), buf.size());
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0 || !WriteAll(fd, buf.data(), static_cast<size_t>(r))) break;
      }
      shutdown(fd, SHUT_WR);
    });
  }
}

EchoServer::~EchoServer() {
  stopping_.store(true);
  if (accept_thread_.joinable()) accept_thread_.join();
  std::lock_guard<std::mutex> lock(mu_);
  for (int fd : fds_) shutdown(fd, SHUT_RDWR);
  for (std::thread& t : workers_) t.join();
  for (int fd : fds_) close(fd);
  if (listen_fd_ >= 0) close(listen_fd_);
}

absl::StatusOr<std::vector<double>> PingPong(const std::string& address, size_t bytes, int count,
                                             int warmup) {
  if (bytes == 0 || bytes > (size_t{1} << 30) || count < 1 || warmup < 0) {
    return absl::InvalidArgumentError("bytes must be in [1, 1 GiB], count >= 1, warmup >= 0");
  }
  absl::StatusOr<int> fd = Connect(address);
  if (!fd.ok()) return fd.status();
  std::vector<char> out(bytes), in(bytes);
  std::vector<double> rtt_us;
  rtt_us.reserve(count);
  absl::Status status;
  for (int i = 0; i < warmup + count && status.ok(); ++i) {
    for (size_t j = 0; j < bytes; ++j) out[j] = static_cast<char>((i * 131 + j * 7) & 0xff);
    const auto start = Clock::now();
    // A large send runs beside the receive so that a reply larger than the socket buffers
    // cannot deadlock the echo (a small one is sent inline: a thread would add its start-up
    // to the round trip).
    bool sent = true;
    bool got = false;
    if (bytes <= kInlineSendBytes) {
      sent = WriteAll(*fd, out.data(), bytes);
      got = sent && ReadAll(*fd, in.data(), bytes);
    } else {
      std::thread sender([&] { sent = WriteAll(*fd, out.data(), bytes); });
      got = ReadAll(*fd, in.data(), bytes);
      sender.join();
    }
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
    if (!sent || !got) {
      status = absl::UnavailableError(absl::StrCat("round trip ", i, " to ", address, " cut"));
    } else if (in != out) {
      status = absl::DataLossError(absl::StrCat("round trip ", i, ": reply differs from request"));
    } else if (i >= warmup) {
      rtt_us.push_back(us);
    }
  }
  close(*fd);
  if (!status.ok()) return status;
  return rtt_us;
}

}  // namespace expertmesh::netdelay
