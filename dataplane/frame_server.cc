#include "dataplane/frame_server.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <span>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace expertmesh::dataplane {

namespace {

// Reads exactly out.size() bytes: the first by first_deadline, the rest by *frame_deadline,
// which is set to now + frame_timeout when the first byte of the frame arrives (InfiniteFuture
// = not begun: this read starts the frame). OK, or why not (the peer closing before the first
// byte of a frame is Cancelled: a clean end).
absl::Status ReadExact(int fd, std::span<char> out, absl::Time first_deadline,
                       absl::Duration frame_timeout, absl::Time* frame_deadline) {
  size_t have = 0;
  while (have < out.size()) {
    const ssize_t n = ::recv(fd, out.data() + have, out.size() - have, 0);
    if (n > 0) {
      if (*frame_deadline == absl::InfiniteFuture()) *frame_deadline = absl::Now() + frame_timeout;
      have += static_cast<size_t>(n);
      continue;
    }
    const bool begun = *frame_deadline != absl::InfiniteFuture();
    if (n == 0) {
      return begun ? absl::UnavailableError("peer closed inside a frame")
                   : absl::CancelledError("closed");
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      return absl::UnavailableError(absl::StrCat("read: ", std::strerror(errno)));
    }
    absl::StatusOr<bool> ready = PollOne(fd, POLLIN, begun ? *frame_deadline : first_deadline);
    if (!ready.ok()) return ready.status();
    if (!*ready) {
      return absl::DeadlineExceededError(begun ? "frame not complete by its deadline"
                                               : "idle for longer than the idle timeout");
    }
  }
  return absl::OkStatus();
}

// After an error frame that refused a frame before its payload was read: the client may still
// be writing that payload. Closing now, with its bytes unread, would send a reset that fails
// the client's write before it reads the error frame; so the write side is closed (the error
// frame, then end of stream) and what arrives is read and dropped until the client closes,
// for at most `linger` and 64 MiB.
void DrainBeforeClose(int fd, absl::Duration linger) {
  ::shutdown(fd, SHUT_WR);
  const absl::Time deadline = absl::Now() + linger;
  char sink[64 << 10];
  size_t dropped = 0;
  while (dropped < (64u << 20)) {
    const ssize_t n = ::recv(fd, sink, sizeof sink, 0);
    if (n > 0) {
      dropped += static_cast<size_t>(n);
      continue;
    }
    if (n == 0) return;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return;
    absl::StatusOr<bool> ready = PollOne(fd, POLLIN, deadline);
    if (!ready.ok() || !*ready) return;
  }
}

}  // namespace

absl::Status FrameServer::ReadPayload(int fd, uint32_t length, std::string* payload,
                                      absl::Time* frame_deadline, uint64_t* reserved) {
  constexpr size_t kFirstChunk = 64u << 10;
  payload->clear();
  size_t have = 0;
  while (have < length) {
    const size_t next = std::min<size_t>(length, std::max(kFirstChunk, 2 * have));
    const uint64_t more = next - have;
    if (buffered_.fetch_add(more) + more > options_.max_buffered_bytes) {
      buffered_.fetch_sub(more);
      return absl::ResourceExhaustedError(
          absl::StrCat("data plane: this replica already holds ", options_.max_buffered_bytes,
                       " bytes of frames being received or answered; try another replica"));
    }
    *reserved += more;
    payload->resize(next);
    if (absl::Status s = ReadExact(fd, std::span<char>(payload->data() + have, next - have),
                                   *frame_deadline, options_.frame_timeout, frame_deadline);
        !s.ok()) {
      return s.code() == absl::StatusCode::kCancelled
                 ? absl::UnavailableError("peer closed inside a frame")
                 : s;
    }
    have = next;
  }
  return absl::OkStatus();
}

bool FrameServer::EvictIdlest() {
  const int64_t latest = absl::ToUnixNanos(absl::Now() - options_.min_idle_to_evict);
  Conn* idlest = nullptr;
  int64_t oldest = 0;
  for (Conn& c : conns_) {
    const int64_t since = c.idle_since_ns.load();
    if (c.fd < 0 || c.done.load() || since == 0 || since > latest) continue;
    if (idlest == nullptr || since < oldest) {
      idlest = &c;
      oldest = since;
    }
  }
  if (idlest == nullptr) return false;
  // Its thread, waiting for a frame, reads the end of the connection and exits.
  ::shutdown(idlest->fd, SHUT_RDWR);
  idlest->idle_since_ns.store(0);  // not chosen twice
  return true;
}

absl::StatusOr<std::unique_ptr<FrameServer>> FrameServer::Start(FrameServerOptions options,
                                                                SessionFactory sessions) {
  std::string host;
  int port = 0;
  if (absl::Status s = SplitHostPort(options.listen, &host, &port); !s.ok()) return s;
  if (options.max_connections < 1 || options.max_frame_bytes < kFrameHeaderBytes ||
      options.max_first_frame_bytes < 1 || options.max_buffered_bytes < options.max_frame_bytes ||
      options.hello_timeout <= absl::ZeroDuration() ||
      options.idle_timeout <= absl::ZeroDuration() ||
      options.frame_timeout <= absl::ZeroDuration() ||
      options.min_idle_to_evict < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "data plane: connection bound, frame limits and timeouts must be positive, and the "
        "buffer budget at least one frame");
  }
  std::unique_ptr<FrameServer> server(new FrameServer(std::move(options), std::move(sessions)));
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const char* node = (host == "0.0.0.0" || host == "*") ? "0.0.0.0" : host.c_str();
  if (const int rc = ::getaddrinfo(node, std::to_string(port).c_str(), &hints, &res); rc != 0) {
    return absl::InvalidArgumentError(absl::StrCat("data plane: cannot resolve listen address ",
                                                   server->options_.listen, ": ",
                                                   ::gai_strerror(rc)));
  }
  std::string error = "no address";
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    // Non-blocking: a connection reset between poll() and accept4() must not block the loop.
    const int fd =
        ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      error = std::strerror(errno);
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd, 64) != 0) {
      error = std::strerror(errno);
      ::close(fd);
      continue;
    }
    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
    server->port_ = bound.ss_family == AF_INET6
                        ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                        : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    server->listen_fd_ = fd;
    break;
  }
  ::freeaddrinfo(res);
  if (server->listen_fd_ < 0) {
    return absl::UnavailableError(
        absl::StrCat("data plane: cannot listen on ", server->options_.listen, ": ", error));
  }
  server->wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (server->wake_fd_ < 0) {
    return absl::InternalError(absl::StrCat("data plane: eventfd: ", std::strerror(errno)));
  }
  FrameServer* s = server.get();
  server->acceptor_ = std::thread([s] { s->AcceptLoop(); });
  return server;
}

FrameServer::~FrameServer() {
  Stop();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

void FrameServer::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return;
    stopped_ = true;
    // Every connection's poll wakes (reads 0): its thread ends after the frame it is on.
    for (Conn& c : conns_) {
      if (c.fd >= 0) ::shutdown(c.fd, SHUT_RDWR);
    }
  }
  if (wake_fd_ >= 0) {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd_, &one, sizeof one);
  }
  if (acceptor_.joinable()) acceptor_.join();
  // No more connections: a client connecting now is refused at once (it fails over) instead
  // of waiting in the backlog of a listener nobody accepts from.
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    listen_fd_ = -1;
  }
  std::list<Conn> conns;
  {
    std::lock_guard<std::mutex> lock(mu_);
    conns.swap(conns_);
  }
  for (Conn& c : conns) {
    if (c.thread.joinable()) c.thread.join();
  }
}

void FrameServer::ReapDone() {
  for (auto it = conns_.begin(); it != conns_.end();) {
    if (it->done.load()) {
      it->thread.join();
      it = conns_.erase(it);
    } else {
      ++it;
    }
  }
}

void FrameServer::AcceptLoop() {
  while (true) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    const int n = ::poll(fds, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      spdlog::error("data plane: poll on the listener: {}", std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;  // Stop()
    if (fds[0].revents == 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      const int err = errno;  // (before the log can change it)
      if (err == EINTR || err == EAGAIN || err == EWOULDBLOCK || err == ECONNABORTED) continue;
      spdlog::warn("data plane: accept: {}", std::strerror(err));
      if (err == EMFILE || err == ENFILE) absl::SleepFor(absl::Milliseconds(50));
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    std::lock_guard<std::mutex> lock(mu_);
    ReapDone();
    if (stopped_) {
      ::close(fd);
      return;
    }
    if (open_.load() >= options_.max_connections && EvictIdlest()) {
      spdlog::info("data plane: {} connections open; closed the one idle longest for a new one",
                   options_.max_connections);
      if (options_.on_evicted) options_.on_evicted();
    } else if (open_.load() >= options_.max_connections) {
      // Answered inline: the error frame is small and the socket's buffer takes it at once.
      const absl::Status why = absl::ResourceExhaustedError(absl::StrCat(
          "data plane: this replica already serves ", options_.max_connections, " connections"));
      spdlog::warn("{}; refusing another", std::string(why.message()));
      if (options_.on_refused) options_.on_refused();  // counted before the client sees it
      [[maybe_unused]] absl::Status w = WriteFrameTo(fd, FrameType::kError, EncodeErrorPayload(why),
                                                     absl::Now() + absl::Milliseconds(100));
      ::close(fd);
      continue;
    }
    Conn& c = conns_.emplace_back();
    c.fd = fd;
    // Counted under mu_ (as the closes are), so the gauge sees the changes in their order, and
    // before the thread starts, so a client it has answered finds itself counted.
    uint32_t open = open_.fetch_add(1) + 1;
    if (options_.on_connections) options_.on_connections(open);
    try {
      c.thread = std::thread([this, &c] { Serve(&c); });
    } catch (const std::system_error& e) {  // no thread to be had: refused like one too many
      spdlog::warn("data plane: no thread for a connection ({}); refusing it", e.what());
      open = open_.fetch_sub(1) - 1;
      if (options_.on_connections) options_.on_connections(open);
      if (options_.on_refused) options_.on_refused();
      [[maybe_unused]] absl::Status w = WriteFrameTo(
          fd, FrameType::kError,
          EncodeErrorPayload(absl::ResourceExhaustedError("data plane: no thread for it")),
          absl::Now() + absl::Milliseconds(100));
      ::close(fd);
      conns_.pop_back();
    }
  }
}

void FrameServer::Serve(Conn* conn) {
  const int fd = conn->fd;
  std::unique_ptr<FrameSession> session = sessions_();
  std::string payload, reply;
  char header[kFrameHeaderBytes];
  absl::Status end;
  uint64_t reserved = 0;  // of buffered_, by the frame in progress
  bool first = true;
  while (true) {
    absl::Time frame_deadline = absl::InfiniteFuture();  // set by the frame's first byte
    conn->idle_since_ns.store(absl::ToUnixNanos(absl::Now()));
    end = ReadExact(fd, std::span<char>(header, kFrameHeaderBytes),
                    absl::Now() + (first ? options_.hello_timeout : options_.idle_timeout),
                    options_.frame_timeout, &frame_deadline);
    conn->idle_since_ns.store(0);
    if (!end.ok()) break;
    absl::StatusOr<FrameHeader> h =
        DecodeFrameHeader(std::string_view(header, kFrameHeaderBytes),
                          first ? std::min(options_.max_first_frame_bytes, options_.max_frame_bytes)
                                : options_.max_frame_bytes);
    if (!h.ok()) {
      end = h.status();
      if (WriteFrameTo(fd, FrameType::kError, EncodeErrorPayload(end),
                       absl::Now() + options_.frame_timeout)
              .ok()) {
        DrainBeforeClose(fd, std::min(options_.frame_timeout, absl::Seconds(2)));
      }
      break;
    }
    end = ReadPayload(fd, h->length, &payload, &frame_deadline, &reserved);
    if (!end.ok()) {
      if (end.code() == absl::StatusCode::kResourceExhausted) {
        [[maybe_unused]] absl::Status w = WriteFrameTo(
            fd, FrameType::kError, EncodeErrorPayload(end), absl::Now() + options_.frame_timeout);
      }
      break;
    }
    FrameType reply_type = FrameType::kError;
    reply.clear();
    end = session->OnFrame(h->type, payload, &reply_type, &reply);
    if (!end.ok()) {
      [[maybe_unused]] absl::Status w = WriteFrameTo(fd, FrameType::kError, EncodeErrorPayload(end),
                                                     absl::Now() + options_.frame_timeout);
      break;
    }
    end = WriteFrameTo(fd, reply_type, reply, absl::Now() + options_.frame_timeout);
    if (!end.ok()) break;
    first = false;
    // A large frame's buffer is not kept for an idle connection.
    if (payload.capacity() > (4u << 20)) std::string().swap(payload);
    if (reply.capacity() > (4u << 20)) std::string().swap(reply);
    buffered_.fetch_sub(reserved);
    reserved = 0;
  }
  buffered_.fetch_sub(reserved);
  if (end.code() != absl::StatusCode::kCancelled) {
    spdlog::debug("data plane: connection closed: {}", end.ToString());
  }
  session.reset();
  {
    std::lock_guard<std::mutex> lock(mu_);  // Stop() shuts down only open fds, under mu_
    ::close(fd);
    conn->fd = -1;
    const uint32_t open = open_.fetch_sub(1) - 1;
    if (options_.on_connections) options_.on_connections(open);
  }
  conn->done.store(true);
}

}  // namespace expertmesh::dataplane
