// The expert data plane's own transport: length-prefixed frames on a plain TCP connection,
// beside gRPC. gRPC stays the control plane (handshake RPC, health, router, placement) and the
// fallback data plane; this one exists because a gRPC round trip costs several thread
// hand-offs more than the bytes do (README "Dispatch over the framed TCP data plane"). The
// client writes a frame and reads the answer on its own thread, so a round trip costs what a
// raw socket ping-pong costs plus the work at both ends.
//
// A frame: a 12-byte header, then `length` payload bytes.
//   bytes 0-3   magic "EMD1" (ExpertMesh data plane, version 1)
//   byte  4     type (FrameType)
//   bytes 5-7   zero
//   bytes 8-11  length, unsigned little-endian (at most the receiver's max_frame_bytes)
// A connection carries one exchange at a time: the client sends a frame and reads exactly one
// answer frame before it sends the next. The first exchange is the handshake (kHello ->
// kHelloOk); any other first frame is refused. A kError frame (4-byte little-endian absl status
// code, then the message) answers what the server refuses; it closes the connection after it.
// The payloads of kHello/kHelloOk/kRequest/kResponse are the serialized protobuf messages
// HandshakeRequest, HandshakeResponse, ExpertRequest, ExpertResponse (protos/expertmesh/v1):
// the data plane itself is payload-agnostic.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace expertmesh::dataplane {

enum class FrameType : uint8_t {
  kHello = 1,     // client -> server, first frame of a connection
  kHelloOk = 2,   // server -> client
  kRequest = 3,   // client -> server
  kResponse = 4,  // server -> client
  kError = 15,    // server -> client, then the server closes
};
const char* FrameTypeName(FrameType type);

inline constexpr size_t kFrameHeaderBytes = 12;
inline constexpr char kFrameMagic[4] = {'E', 'M', 'D', '1'};

struct FrameHeader {
  FrameType type = FrameType::kError;
  uint32_t length = 0;
};
// The 12 header bytes of a frame.
void EncodeFrameHeader(FrameType type, uint32_t length, char out[kFrameHeaderBytes]);
// InvalidArgument for a wrong magic, non-zero reserved bytes or an unknown type;
// ResourceExhausted for a length above max_frame_bytes.
absl::StatusOr<FrameHeader> DecodeFrameHeader(std::string_view header, uint32_t max_frame_bytes);

// kError payloads.
std::string EncodeErrorPayload(const absl::Status& status);
absl::Status DecodeErrorPayload(std::string_view payload);  // never OK (Internal if malformed)

// "host:port" (host an IPv4 address, a name, or [IPv6]) -> host and port; InvalidArgument else.
absl::Status SplitHostPort(const std::string& address, std::string* host, int* port);

// One client connection (not thread-safe: one user at a time). Non-blocking socket with
// TCP_NODELAY; every write and every read is bounded by a deadline.
class FrameConnection {
 public:
  // Connects to "host:port" within `deadline`.
  static absl::StatusOr<std::unique_ptr<FrameConnection>> Connect(const std::string& address,
                                                                  absl::Time deadline,
                                                                  uint32_t max_frame_bytes);
  ~FrameConnection();
  FrameConnection(const FrameConnection&) = delete;
  FrameConnection& operator=(const FrameConnection&) = delete;

  int fd() const { return fd_; }
  const std::string& address() const { return address_; }

  // Writes one whole frame (header and payload in one writev where the socket takes it) by
  // `deadline`; DeadlineExceeded or Unavailable otherwise (the connection is then unusable).
  absl::Status WriteFrame(FrameType type, std::string_view payload, absl::Time deadline);

  // Reads what the socket holds now, without blocking. Returns true once a whole frame is in
  // (then frame_type()/payload() hold it until the next read), false when more bytes are
  // needed; an error when the peer closed, the socket failed or the header is invalid.
  absl::StatusOr<bool> ReadAvailable();
  FrameType frame_type() const { return in_header_.type; }
  std::string_view payload() const { return std::string_view(in_).substr(kFrameHeaderBytes); }

  // Waits (poll) until a whole frame is in, by `deadline`.
  absl::Status ReadFrame(absl::Time deadline);

  // An idle pooled connection that the peer closed (or that holds unexpected bytes) reads
  // as ready: true when the connection is still quiet and usable.
  bool QuietAndOpen() const;
  // Bytes of the frame being read that have arrived (0: nothing of the next frame yet).
  size_t frame_bytes_in() const { return in_complete_ ? 0 : in_have_; }

 private:
  FrameConnection(int fd, std::string address, uint32_t max_frame_bytes)
      : fd_(fd), address_(std::move(address)), max_frame_bytes_(max_frame_bytes) {}
  int fd_;
  const std::string address_;
  const uint32_t max_frame_bytes_;
  std::string in_;      // header + payload of the frame being read
  size_t in_have_ = 0;  // bytes of in_ read so far
  bool in_complete_ = false;
  FrameHeader in_header_;
};

// Sends `payload` as `type` and reads the answer frame, both by `deadline`: a kError answer
// becomes its status; an answer of another type than `expect` is Internal.
absl::Status Exchange(FrameConnection& conn, FrameType type, std::string_view payload,
                      FrameType expect, absl::Time deadline);

// Writes one whole frame on a (non-blocking) socket by `deadline` (header and payload in one
// sendmsg where the socket takes it): what FrameConnection::WriteFrame and the server use.
absl::Status WriteFrameTo(int fd, FrameType type, std::string_view payload, absl::Time deadline);

// poll() on one fd for `events` until `deadline`: true when ready, false on timeout.
absl::StatusOr<bool> PollOne(int fd, short events, absl::Time deadline);

}  // namespace expertmesh::dataplane
