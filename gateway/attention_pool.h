// The attention-service replicas the gateway sends sequences to. Each replica has one gRPC
// channel; a background poller checks its health (grpc.health.v1), its handshake (same model
// and protocol) and its load (GetLoad). A new sequence goes to the ready replica with the least
// work: outstanding streams from this gateway plus the running and waiting sequences it last
// reported. A SubmitCall is one sequence's Submit stream: Read() its events, Cancel() it
// (client gone, stop string, deadline): the stream is cancelled and Cancel is sent so the
// replica frees its KV blocks at once.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "expertmesh/v1/attention.grpc.pb.h"
#include "expertmesh/v1/common.pb.h"

namespace expertmesh::gateway {

class AttentionPool;

struct AttentionReplica {
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::AttentionService::Stub> stub;
  std::atomic<int> outstanding{0};  // this gateway's open Submit streams
  // From the last poll:
  std::atomic<bool> ready{false};
  std::atomic<uint32_t> reported_load{0};  // running + waiting
  std::atomic<uint32_t> max_context{0};
  std::string last_error;  // guarded by AttentionPool::mu_
};

// One sequence's Submit stream on one replica.
class SubmitCall {
 public:
  ~SubmitCall();  // cancels the stream when it is still open
  // Blocks for the next event; false at the end of the stream (then Finish() tells why).
  bool Read(v1::TokenEvent* event);
  // The stream's final status (call after Read() returned false).
  absl::Status Finish();
  // Cancels the sequence: the stream, and a Cancel RPC so the replica frees it at once.
  void Cancel();
  const std::string& replica_address() const { return replica_->address; }

 private:
  friend class AttentionPool;
  SubmitCall(AttentionReplica* replica, std::string request_id,
             std::chrono::system_clock::time_point deadline);
  AttentionReplica* replica_;
  std::string request_id_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReader<v1::TokenEvent>> reader_;
  std::atomic<bool> cancelled_{false};
  bool finished_ = false;
};

class AttentionPool {
 public:
  struct Options {
    std::vector<std::string> addresses;
    // When set, replicas must answer Handshake with the same model and protocol.
    std::optional<v1::PeerIdentity> identity;
    std::chrono::milliseconds poll_interval{500};
    std::chrono::milliseconds rpc_timeout{2000};
  };
  static absl::StatusOr<std::unique_ptr<AttentionPool>> Create(Options options);
  ~AttentionPool();  // stops the poller

  // Polls every replica once now (also done by the background poller).
  void PollOnce();
  // Waits until some replica is ready or `timeout` passes; true when one is.
  bool WaitReady(std::chrono::milliseconds timeout);
  bool AnyReady() const;
  // The smallest max_context the ready replicas reported (0 when none did).
  uint32_t max_context() const;

  // Opens a Submit stream on the least loaded ready replica. UNAVAILABLE when none is ready.
  absl::StatusOr<std::unique_ptr<SubmitCall>> Submit(
      const v1::SubmitRequest& request, std::chrono::system_clock::time_point deadline);

  // Per replica: address, ready, outstanding, reported load (for logs and tests).
  struct ReplicaState {
    std::string address;
    bool ready;
    int outstanding;
    uint32_t reported_load;
    std::string last_error;
  };
  std::vector<ReplicaState> Snapshot() const;

 private:
  explicit AttentionPool(Options options);
  void PollReplica(AttentionReplica& replica);
  void PollLoop();

  const Options options_;
  std::vector<std::unique_ptr<AttentionReplica>> replicas_;
  mutable std::mutex mu_;
  std::condition_variable cv_;  // poller wake-up and WaitReady
  bool stopping_ = false;
  std::thread poller_;
};

}  // namespace expertmesh::gateway
