// RawClient: a plain TCP client on 127.0.0.1 for the HTTP tests, for requests no HTTP library
// would send (half-sent headers, pipelined requests, bytes one at a time) and for watching what
// the server does with the connection (answers, closes, resets).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

namespace expertmesh::testing {

class RawClient {
 public:
  using Clock = std::chrono::steady_clock;

  explicit RawClient(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd_ >= 0 && ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~RawClient() {
    if (fd_ >= 0) ::close(fd_);
  }
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;

  bool connected() const { return fd_ >= 0; }
  // Whether the server has sent something (or closed) by now, without reading it.
  bool Readable() const {
    pollfd p{fd_, POLLIN, 0};
    return ::poll(&p, 1, 0) > 0;
  }
  // Sends all of `data` within 10 s.
  bool Send(std::string_view data) {
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    while (!data.empty() && Clock::now() < deadline) {
      pollfd p{fd_, POLLOUT, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      const ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      data.remove_prefix(static_cast<size_t>(n));
    }
    return data.empty();
  }
  // Reads until `done(received)` holds, the server closes (end of stream or reset) or
  // `timeout` passes; returns whether the connection was closed.
  template <typename Done>
  bool Read(std::chrono::milliseconds timeout, Done done) {
    const auto deadline = Clock::now() + timeout;
    char buf[16384];
    while (!done(received_)) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd_, POLLIN, 0};
      const int r = ::poll(&p, 1, static_cast<int>(left.count()));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) continue;
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return true;  // end of stream, or reset
      received_.append(buf, static_cast<size_t>(n));
    }
    return false;
  }
  bool ReadUntilClosed(std::chrono::milliseconds timeout) {
    return Read(timeout, [](const std::string&) { return false; });
  }
  // Whether the server has closed the connection by now (without waiting).
  bool ClosedByServer() { return ReadUntilClosed(std::chrono::milliseconds(1)); }
  const std::string& received() const { return received_; }

 private:
  int fd_ = -1;
  std::string received_;
};

}  // namespace expertmesh::testing
