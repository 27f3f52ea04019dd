#include "dataplane/frame.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace expertmesh::dataplane {

namespace {

uint32_t LoadLe32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return static_cast<uint32_t>(u[0]) | (static_cast<uint32_t>(u[1]) << 8) |
         (static_cast<uint32_t>(u[2]) << 16) | (static_cast<uint32_t>(u[3]) << 24);
}

void StoreLe32(uint32_t v, char* p) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xFF);
}

bool KnownType(uint8_t t) {
  switch (static_cast<FrameType>(t)) {
    case FrameType::kHello:
    case FrameType::kHelloOk:
    case FrameType::kRequest:
    case FrameType::kResponse:
    case FrameType::kError:
      return true;
  }
  return false;
}

int MillisUntil(absl::Time deadline) {
  const absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(std::min<int64_t>(
      absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1))), 1 << 30));
}

}  // namespace

const char* FrameTypeName(FrameType type) {
  switch (type) {
    case FrameType::kHello:
      return "hello";
    case FrameType::kHelloOk:
      return "hello-ok";
    case FrameType::kRequest:
      return "request";
    case FrameType::kResponse:
      return "response";
    case FrameType::kError:
      return "error";
  }
  return "unknown";
}

void EncodeFrameHeader(FrameType type, uint32_t length, char out[kFrameHeaderBytes]) {
  std::memcpy(out, kFrameMagic, 4);
  out[4] = static_cast<char>(type);
  out[5] = out[6] = out[7] = 0;
  StoreLe32(length, out + 8);
}

absl::StatusOr<FrameHeader> DecodeFrameHeader(std::string_view header, uint32_t max_frame_bytes) {
  if (header.size() != kFrameHeaderBytes) {
    return absl::InvalidArgumentError("data plane: short frame header");
  }
  if (std::memcmp(header.data(), kFrameMagic, 4) != 0) {
    return absl::InvalidArgumentError(
        "data plane: not an ExpertMesh data-plane frame (wrong magic; expected \"EMD1\")");
  }
  const uint8_t type = static_cast<uint8_t>(header[4]);
  if (header[5] != 0 || header[6] != 0 || header[7] != 0) {
    return absl::InvalidArgumentError("data plane: non-zero reserved header bytes");
  }
  if (!KnownType(type)) {
    return absl::InvalidArgumentError(absl::StrCat("data plane: unknown frame type ", type));
  }
  FrameHeader h{static_cast<FrameType>(type), LoadLe32(header.data() + 8)};
  if (h.length > max_frame_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "data plane: frame of ", h.length, " bytes exceeds the limit of ", max_frame_bytes));
  }
  return h;
}

std::string EncodeErrorPayload(const absl::Status& status) {
  std::string out(4, '\0');
  StoreLe32(static_cast<uint32_t>(status.code()), out.data());
  out.append(status.message().data(), status.message().size());
  return out;
}

absl::Status DecodeErrorPayload(std::string_view payload) {
  if (payload.size() < 4) return absl::InternalError("data plane: malformed error frame");
  const uint32_t code = LoadLe32(payload.data());
  if (code == 0 || code > static_cast<uint32_t>(absl::StatusCode::kUnauthenticated)) {
    return absl::InternalError("data plane: malformed error frame");
  }
  return absl::Status(static_cast<absl::StatusCode>(code), std::string(payload.substr(4)));
}

absl::Status SplitHostPort(const std::string& address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("address \"", address, "\": expected host:port"));
  }
  std::string h = address.substr(0, colon);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') {
    h = h.substr(1, h.size() - 2);
  } else if (h.find_first_of(":[]") != std::string::npos) {
    // "::1:80" could be ::1 port 80 or ::1:80 with the port missing; "[::1:80" is unclosed.
    return absl::InvalidArgumentError(
        absl::StrCat("address \"", address, "\": an IPv6 host goes in brackets ([host]:port)"));
  }
  const std::string_view p = std::string_view(address).substr(colon + 1);
  int value = -1;
  const auto r = std::from_chars(p.data(), p.data() + p.size(), value);
  if (r.ec != std::errc() || r.ptr != p.data() + p.size() || value < 0 || value > 65535 ||
      h.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("address \"", address, "\": expected host:port with a port in 0-65535"));
  }
  *host = std::move(h);
  *port = value;
  return absl::OkStatus();
}

absl::StatusOr<bool> PollOne(int fd, short events, absl::Time deadline) {
  while (true) {
    pollfd p{fd, events, 0};
    const int n = ::poll(&p, 1, MillisUntil(deadline));
    if (n > 0) return true;
    if (n == 0) {
      if (absl::Now() >= deadline) return false;
      continue;
    }
    if (errno == EINTR) continue;
    return absl::InternalError(absl::StrCat("data plane: poll: ", std::strerror(errno)));
  }
}

absl::StatusOr<std::unique_ptr<FrameConnection>> FrameConnection::Connect(
    const std::string& address, absl::Time deadline, uint32_t max_frame_bytes) {
  std::string host;
  int port = 0;
  if (absl::Status s = SplitHostPort(address, &host, &port); !s.ok()) return s;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
      rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("data plane: ", address, ": cannot resolve: ", ::gai_strerror(rc)));
  }
  std::string last_error = "no address";
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    const int fd =
        ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int rc = ::connect(fd, ai->ai_addr, ai->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      absl::StatusOr<bool> ready = PollOne(fd, POLLOUT, deadline);
      int err = 0;
      socklen_t len = sizeof err;
      if (!ready.ok() || !*ready) {
        last_error = ready.ok() ? "connect timed out" : std::string(ready.status().message());
        ::close(fd);
        continue;
      }
      ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      rc = err == 0 ? 0 : -1;
      errno = err;
    }
    if (rc != 0) {
      last_error = std::strerror(errno);
      ::close(fd);
      continue;
    }
    ::freeaddrinfo(res);
    return std::unique_ptr<FrameConnection>(new FrameConnection(fd, address, max_frame_bytes));
  }
  ::freeaddrinfo(res);
  return absl::UnavailableError(
      absl::StrCat("data plane: cannot connect to ", address, ": ", last_error));
}

FrameConnection::~FrameConnection() {
  if (fd_ >= 0) ::close(fd_);
}

absl::Status WriteFrameTo(int fd, FrameType type, std::string_view payload, absl::Time deadline) {
  if (payload.size() > UINT32_MAX) {
    return absl::ResourceExhaustedError("data plane: payload above 4 GiB");
  }
  char header[kFrameHeaderBytes];
  EncodeFrameHeader(type, static_cast<uint32_t>(payload.size()), header);
  size_t sent = 0;
  const size_t total = kFrameHeaderBytes + payload.size();
  while (sent < total) {
    iovec iov[2];
    int n_iov = 0;
    if (sent < kFrameHeaderBytes) {
      iov[n_iov++] = {header + sent, kFrameHeaderBytes - sent};
      iov[n_iov++] = {const_cast<char*>(payload.data()), payload.size()};
    } else {
      const size_t off = sent - kFrameHeaderBytes;
      iov[n_iov++] = {const_cast<char*>(payload.data()) + off, payload.size() - off};
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(n_iov);
    const ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      absl::StatusOr<bool> ready = PollOne(fd, POLLOUT, deadline);
      if (!ready.ok()) return ready.status();
      if (!*ready) return absl::DeadlineExceededError("write not done by its deadline");
      continue;
    }
    return absl::UnavailableError(absl::StrCat("write: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status FrameConnection::WriteFrame(FrameType type, std::string_view payload,
                                         absl::Time deadline) {
  const absl::Status s = WriteFrameTo(fd_, type, payload, deadline);
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat("data plane: ", address_, ": ", s.message()));
}

absl::StatusOr<bool> FrameConnection::ReadAvailable() {
  if (in_complete_) {  // the last frame was handed out: start the next
    in_complete_ = false;
    in_have_ = 0;
  }
  if (in_have_ == 0 && in_.size() != kFrameHeaderBytes) in_.resize(kFrameHeaderBytes);
  while (true) {
    const size_t want = in_.size() - in_have_;
    if (want > 0) {
      const ssize_t n = ::recv(fd_, in_.data() + in_have_, want, 0);
      if (n == 0) {
        return absl::UnavailableError(
            absl::StrCat("data plane: ", address_, ": connection closed by the peer"));
      }
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
        return absl::UnavailableError(
            absl::StrCat("data plane: ", address_, ": read: ", std::strerror(errno)));
      }
      in_have_ += static_cast<size_t>(n);
      if (in_have_ < in_.size()) continue;
    }
    if (in_.size() == kFrameHeaderBytes && in_have_ == kFrameHeaderBytes) {
      absl::StatusOr<FrameHeader> h =
          DecodeFrameHeader(std::string_view(in_.data(), kFrameHeaderBytes), max_frame_bytes_);
      if (!h.ok()) {
        return absl::Status(h.status().code(), absl::StrCat(address_, ": ", h.status().message()));
      }
      in_header_ = *h;
      if (h->length > 0) {
        in_.resize(kFrameHeaderBytes + h->length);
        continue;
      }
    }
    in_complete_ = true;
    return true;
  }
}

absl::Status FrameConnection::ReadFrame(absl::Time deadline) {
  while (true) {
    absl::StatusOr<bool> got = ReadAvailable();
    if (!got.ok()) return got.status();
    if (*got) return absl::OkStatus();
    absl::StatusOr<bool> ready = PollOne(fd_, POLLIN, deadline);
    if (!ready.ok()) return ready.status();
    if (!*ready) {
      return absl::DeadlineExceededError(
          absl::StrCat("data plane: ", address_, ": no answer by its deadline"));
    }
  }
}

bool FrameConnection::QuietAndOpen() const {
  if (in_have_ != 0 && !in_complete_) return false;  // a frame half read
  pollfd p{fd_, POLLIN, 0};
  return ::poll(&p, 1, 0) == 0;
}

absl::Status Exchange(FrameConnection& conn, FrameType type, std::string_view payload,
                      FrameType expect, absl::Time deadline) {
  if (absl::Status s = conn.WriteFrame(type, payload, deadline); !s.ok()) return s;
  if (absl::Status s = conn.ReadFrame(deadline); !s.ok()) return s;
  if (conn.frame_type() == FrameType::kError) return DecodeErrorPayload(conn.payload());
  if (conn.frame_type() != expect) {
    return absl::InternalError(absl::StrCat("data plane: ", conn.address(), ": answered a ",
                                            FrameTypeName(conn.frame_type()), " frame to a ",
                                            FrameTypeName(type), " frame"));
  }
  return absl::OkStatus();
}

}  // namespace expertmesh::dataplane
