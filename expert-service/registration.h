// A shard replica's membership with the router: registers (the first attempt is synchronous
// so a refusal -- another model, a placement mismatch -- fails start-up loudly), then
// heartbeats on a background thread at the interval the router asked for, registering
// again when the router no longer knows it (router restart, expiry). A router that cannot be
// reached at start-up is retried in the background with bounded backoff (up to 2 s between
// attempts). After a call that could not reach the router the channel is made anew: the
// router's name (a Kubernetes Service) is resolved again and the next attempt connects at
// once instead of waiting out gRPC's reconnect backoff (1 s growing to 120 s), so a
// restarted router sees the replica again within about one heartbeat interval.
// Deregister() on drain.
// Live placement (LiveHooks, optional): every target in a Register or Heartbeat answer goes to
// on_target (on this thread: it must hand it over and return), each heartbeat carries
// held_generation() and load_error(), and a registration made again offers held().
#pragma once

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/model/local_experts.h"
#include "expertmesh/v1/router.grpc.pb.h"

namespace expertmesh {

class RouterRegistration {
 public:
  struct LiveHooks {
    std::function<void(const v1::ExpertTarget&)> on_target;
    std::function<uint64_t()> held_generation;
    std::function<std::string()> load_error;
    std::function<std::vector<LayerExpert>()> held;
  };
  // outstanding_rows: sampled for every heartbeat. on_registered (optional): called with true
  // when a registration succeeds and with false when the router forgot this replica and
  // registering again failed (the shard's readiness follows it); never under a lock of ours.
  static absl::StatusOr<std::unique_ptr<RouterRegistration>> Start(
      const std::string& router_address, v1::RegisterRequest request,
      std::function<uint32_t()> outstanding_rows, absl::Duration rpc_timeout,
      std::function<void(bool registered)> on_registered = nullptr, LiveHooks live = {});
  ~RouterRegistration();  // stops heartbeats (without deregistering)

  // Stops heartbeats and deregisters (one RPC, bounded by the rpc timeout).
  void Deregister();
  std::string replica_id() const;

 private:
  RouterRegistration() = default;
  absl::Status RegisterOnce();  // under no lock
  absl::Duration interval() const;
  void Loop();
  void Stop();
  void Reconnect();  // a fresh channel; only the loop thread (or before/after it) calls it

  std::string router_address_;
  std::unique_ptr<v1::RouterService::Stub> stub_;
  v1::RegisterRequest request_;
  std::function<uint32_t()> outstanding_rows_;
  std::function<void(bool)> on_registered_;
  LiveHooks live_;
  absl::Duration rpc_timeout_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::string replica_id_;
  absl::Duration interval_ = absl::Milliseconds(500);
  std::thread thread_;
};

}  // namespace expertmesh
