// The attention-service replicas the gateway sends sequences to. Each replica has one gRPC
// channel; a background poller checks its health (grpc.health.v1), its handshake (same model
// and protocol) and its load (GetLoad). A new sequence goes to the ready replica with the least
// work: outstanding streams from this gateway plus the running and waiting sequences it last
// reported. A SubmitCall is one sequence's Submit stream: Read() its events, Cancel() it
// (client gone, stop string, deadline): the stream is cancelled and Cancel is sent so the
// replica frees its KV blocks at once.
//
// Membership. Each target of Options::addresses is either
//  - "host:port": one replica, always a member (gRPC resolves the host itself);
//  - "dns:///name:port" (the system resolver, e.g. a Kubernetes headless Service, which has
//    one A record per ready pod) or "dns://server[:port]/name:port" (that DNS server asked
//    directly): the name is resolved again every resolve_interval; each address it gives is a
//    replica. An address that appears becomes a member (ready after its first successful
//    poll); one that disappears is taken out of the choice at once, while the streams already
//    open on it run to their end. A failed lookup (timeout, server failure) keeps the last
//    members; a name that does not exist (NXDOMAIN, no records) has none. Under mTLS
//    (--tls-*) such a member's certificate must name the DNS name (e.g. the headless
//    Service's), not its address.
// A Submit refused with UNAVAILABLE before its first event (a replica draining, gone, or not
// yet seen down) is opened again on another ready replica, up to 3 attempts in all.
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
  std::string target;  // the --attention entry it came from
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::AttentionService::Stub> stub;
  std::atomic<int> outstanding{0};  // this gateway's open Submit streams
  // From the last poll:
  std::atomic<bool> ready{false};
  std::atomic<uint32_t> reported_load{0};  // running + waiting
  std::atomic<uint32_t> max_context{0};
  std::string last_error;  // guarded by AttentionPool::mu_
};

// A parsed --attention entry.
struct AttentionTarget {
  bool dns = false;       // re-resolved by the pool
  std::string authority;  // dns://authority/...: the DNS server (host[:port]); empty: system
  std::string host;       // the name (dns) or the whole host:port (static)
  int port = 0;           // dns only
};
absl::StatusOr<AttentionTarget> ParseAttentionTarget(const std::string& text);

// The addresses (as "ip:port" / "[ip6]:port", sorted) `target` resolves to now. NotFound when
// the name does not exist or has no address records; Unavailable for a failed lookup.
absl::StatusOr<std::vector<std::string>> ResolveAttentionTarget(const AttentionTarget& target,
                                                                std::chrono::milliseconds timeout);

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
  std::string replica_address() const;
  int attempts() const { return attempts_; }

 private:
  friend class AttentionPool;
  SubmitCall(AttentionPool* pool, v1::SubmitRequest request,
             std::chrono::system_clock::time_point deadline);
  void Open(std::shared_ptr<AttentionReplica> replica);  // a new attempt on `replica`
  void Release();                                        // the current attempt's replica

  AttentionPool* pool_;
  const v1::SubmitRequest request_;
  const std::chrono::system_clock::time_point deadline_;
  mutable std::mutex mu_;  // replica_ and context_ (Cancel may come from another thread)
  std::shared_ptr<AttentionReplica> replica_;
  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<grpc::ClientReader<v1::TokenEvent>> reader_;
  std::atomic<bool> cancelled_{false};
  bool finished_ = false;
  bool got_event_ = false;
  int attempts_ = 0;
  std::optional<grpc::Status> status_;  // an attempt that ended before its first event
};

class AttentionPool {
 public:
  struct Options {
    // host:port, dns:///name:port or dns://server/name:port (see above).
    std::vector<std::string> addresses;
    // When set, replicas must answer Handshake with the same model and protocol.
    std::optional<v1::PeerIdentity> identity;
    std::chrono::milliseconds poll_interval{500};
    std::chrono::milliseconds rpc_timeout{2000};
    std::chrono::milliseconds resolve_interval{1000};  // dns targets
  };
  static absl::StatusOr<std::unique_ptr<AttentionPool>> Create(Options options);
  ~AttentionPool();  // stops the poller and the resolver

  // Polls every replica once now (also done by the background poller).
  void PollOnce();
  // Resolves the dns targets once now (also done by the background resolver).
  void ResolveOnce();
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
  friend class SubmitCall;
  explicit AttentionPool(Options options);
  void PollReplica(AttentionReplica& replica);
  void PollLoop();
  void ResolveLoop();
  // tls_name: the name the member was found under (its certificate is checked against it).
  std::shared_ptr<AttentionReplica> MakeReplica(const std::string& address,
                                                const std::string& target,
                                                const std::string& tls_name) const;
  // The least loaded ready member other than `exclude`; null when none.
  std::shared_ptr<AttentionReplica> Pick(const AttentionReplica* exclude) const;
  std::vector<std::shared_ptr<AttentionReplica>> Members() const;
  bool AnyReadyLocked() const;

  const Options options_;
  std::vector<AttentionTarget> targets_;
  mutable std::mutex mu_;
  std::vector<std::shared_ptr<AttentionReplica>> replicas_;  // guarded by mu_
  std::condition_variable cv_;  // poller/resolver wake-up and WaitReady
  bool stopping_ = false;
  std::thread poller_;
  std::thread resolver_;
};

}  // namespace expertmesh::gateway
