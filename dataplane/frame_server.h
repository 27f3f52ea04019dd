// The server side of the framed TCP data plane (dataplane/frame.h): a listener and one thread
// per connection. Each connection reads a frame, hands it to its session, writes the session's
// answer, then reads the next; its thread computes the answer itself (no hand-off).
//
// What a careless or hostile client can hold is bounded:
//  - connections: at most max_connections. At the limit a new connection takes the place of
//    the one that has waited longest for its next frame (idle for at least min_idle_to_evict),
//    so idle or silent clients cannot lock out working ones; with none idle it gets a kError
//    RESOURCE_EXHAUSTED frame and is closed.
//  - time: a connection's first frame must begin within hello_timeout of its accept, later ones
//    within idle_timeout of the previous answer; once a frame has begun, all of it must arrive
//    within frame_timeout of its first byte (however it trickles in); every write is bounded
//    by frame_timeout.
//  - memory: a connection's first frame may declare at most max_first_frame_bytes (a hello is
//    small), later ones max_frame_bytes. A payload's buffer grows as its bytes arrive, so a
//    header announcing max_frame_bytes costs only what the client really sent, and the payload
//    bytes being received or answered, all connections together, stay within
//    max_buffered_bytes (a frame that would pass it gets RESOURCE_EXHAUSTED and its connection
//    closes).
// A refused header (bad magic, over the limit) is answered by its error frame and end of
// stream, then what the client still writes is dropped for up to 2 s before the close, so a
// client in the middle of writing that frame reads the error instead of a connection reset.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dataplane/frame.h"

namespace expertmesh::dataplane {

// What one connection's frames go to (one per connection, used by its thread only).
class FrameSession {
 public:
  virtual ~FrameSession() = default;
  // The answer to one frame: its type and payload (reply_payload is reused from frame to
  // frame). A non-OK status is sent as a kError frame and the connection is closed.
  virtual absl::Status OnFrame(FrameType type, std::string_view payload, FrameType* reply_type,
                               std::string* reply_payload) = 0;
};

struct FrameServerOptions {
  std::string listen;  // host:port; port 0 = any free port
  uint32_t max_connections = 128;
  uint32_t max_frame_bytes = 64u << 20;
  uint32_t max_first_frame_bytes = 64u << 10;
  uint64_t max_buffered_bytes = 1ull << 30;
  absl::Duration hello_timeout = absl::Seconds(10);  // accept -> first byte of the first frame
  absl::Duration idle_timeout = absl::Minutes(10);   // between frames
  absl::Duration frame_timeout = absl::Seconds(10);  // all of a frame once begun; a write
  absl::Duration min_idle_to_evict = absl::Seconds(1);
  // Called when the number of open connections changes (a gauge), when one is refused (limit
  // reached, none idle) and when an idle one is closed to make room.
  std::function<void(uint32_t open)> on_connections;
  std::function<void()> on_refused;
  std::function<void()> on_evicted;
};

class FrameServer {
 public:
  using SessionFactory = std::function<std::unique_ptr<FrameSession>()>;
  static absl::StatusOr<std::unique_ptr<FrameServer>> Start(FrameServerOptions options,
                                                            SessionFactory sessions);
  ~FrameServer();  // Stop()

  int port() const { return port_; }
  uint32_t open_connections() const { return open_.load(); }
  // Closes the listener and every connection (a session computing an answer finishes it; its
  // write then fails), and joins their threads. Idempotent.
  void Stop();

 private:
  struct Conn {
    int fd = -1;  // under mu_ (-1 once closed)
    std::thread thread;
    std::atomic<bool> done{false};
    // absl::ToUnixNanos of when it began waiting for its next frame; 0 while a frame is being
    // read or answered.
    std::atomic<int64_t> idle_since_ns{0};
  };
  FrameServer(FrameServerOptions options, SessionFactory sessions)
      : options_(std::move(options)), sessions_(std::move(sessions)) {}
  void AcceptLoop();
  void Serve(Conn* conn);
  void ReapDone();  // under mu_
  // Under mu_: shuts down the connection idle longest (at least min_idle_to_evict); false when
  // none is.
  bool EvictIdlest();
  // Reads a payload of `length` bytes into *payload by *frame_deadline, growing the buffer as
  // the bytes arrive and reserving each growth in buffered_ (added to *reserved).
  absl::Status ReadPayload(int fd, uint32_t length, std::string* payload,
                           absl::Time* frame_deadline, uint64_t* reserved);

  const FrameServerOptions options_;
  const SessionFactory sessions_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;  // eventfd: Stop() wakes the accept loop
  int port_ = 0;
  std::thread acceptor_;
  std::mutex mu_;
  bool stopped_ = false;
  std::list<Conn> conns_;  // under mu_
  std::atomic<uint32_t> open_{0};
  std::atomic<uint64_t> buffered_{0};  // payload buffer bytes of the frames in progress
};

}  // namespace expertmesh::dataplane
