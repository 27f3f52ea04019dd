// The server side of the framed TCP data plane (dataplane/frame.h): a listener and one thread
// per connection, at most max_connections at once (one more is answered with a kError
// RESOURCE_EXHAUSTED frame and closed). Each connection reads a frame, hands it to its session,
// writes the session's answer, then reads the next; its thread computes the answer itself (no
// hand-off). Every read is bounded: the first byte of a frame by idle_timeout (an idle client
// is closed), the rest of the frame by frame_timeout from that first byte (however it
// trickles in); every write by frame_timeout. A payload's buffer grows as its bytes arrive, so
// a header announcing max_frame_bytes costs the server only what the client really sent. A
// refused header (bad magic, over the limit) is answered by its error frame and end of stream,
// then what the client still writes is dropped for up to 2 s before the close, so a client in
// the middle of writing that frame reads the error instead of a connection reset.
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
  absl::Duration idle_timeout = absl::Minutes(10);   // between frames
  absl::Duration frame_timeout = absl::Seconds(10);  // the rest of a frame once begun; a write
  // Called when the number of open connections changes (a gauge), and when one is refused.
  std::function<void(uint32_t open)> on_connections;
  std::function<void()> on_refused;
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
    int fd = -1;
    std::thread thread;
    std::atomic<bool> done{false};
  };
  FrameServer(FrameServerOptions options, SessionFactory sessions)
      : options_(std::move(options)), sessions_(std::move(sessions)) {}
  void AcceptLoop();
  void Serve(Conn* conn);
  void ReapDone();  // under mu_

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
};

}  // namespace expertmesh::dataplane
