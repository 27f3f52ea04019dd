// The router's control plane as a gRPC service: shard membership (Register / Heartbeat with
// expiry / Deregister), versioned placement maps streamed to watchers (a new version on
// every membership change), load reports and a status view. RouterServer owns the service,
// its gRPC server (with health, reflection) and the expiry sweeper; main.cc only parses flags.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "router/load_window.h"
#include "router/membership.h"
#include "router/rebalancer.h"
#include "service-common/grpc_util.h"
#include "service-common/metrics.h"

namespace expertmesh {

struct RouterServerOptions {
  ServerOptions server;       // listen address, limits
  v1::PeerIdentity identity;  // model fingerprint + protocol version peers must match
  MembershipOptions membership;
  LoadWindowOptions load_window;  // the recent expert load (the operator page shows it)
  // The model, for the rebalancer (expert groups, MoE layers); without it no rebalancing.
  std::optional<ModelConfig> model;
  RebalancerOptions rebalance;
  int max_watchers = 256;              // concurrent WatchPlacement streams
  MetricsRegistry* metrics = nullptr;  // optional
};

class RouterServiceImpl final : public v1::RouterService::Service {
 public:
  RouterServiceImpl(Placement placement, RouterServerOptions options);
  ~RouterServiceImpl() override;

  grpc::Status Handshake(grpc::ServerContext* ctx, const v1::HandshakeRequest* req,
                         v1::HandshakeResponse* resp) override;
  grpc::Status Register(grpc::ServerContext* ctx, const v1::RegisterRequest* req,
                        v1::RegisterResponse* resp) override;
  grpc::Status Heartbeat(grpc::ServerContext* ctx, const v1::HeartbeatRequest* req,
                         v1::HeartbeatResponse* resp) override;
  grpc::Status Deregister(grpc::ServerContext* ctx, const v1::DeregisterRequest* req,
                          v1::DeregisterResponse* resp) override;
  grpc::Status WatchPlacement(grpc::ServerContext* ctx, const v1::WatchPlacementRequest* req,
                              grpc::ServerWriter<v1::PlacementMap>* writer) override;
  grpc::Status ReportLoad(grpc::ServerContext* ctx, const v1::LoadReport* req,
                          v1::LoadReportResponse* resp) override;
  grpc::Status GetStatus(grpc::ServerContext* ctx, const v1::StatusRequest* req,
                         v1::StatusResponse* resp) override;
  grpc::Status Rebalance(grpc::ServerContext* ctx, const v1::RebalanceRequest* req,
                         v1::RebalanceResponse* resp) override;

  // Starts a live change to `next` (Membership::BeginChange); the tests and the Rebalance RPC.
  absl::Status BeginPlacementChange(Placement next);
  // Computes a placement from the load window and, unless dry_run, starts applying it.
  absl::StatusOr<v1::RebalanceResponse> RunRebalance(bool dry_run, bool force);

  // Removes expired replicas, commits or times out placement changes and runs the automatic
  // rebalancer when due (the sweeper calls this periodically).
  void Sweep();
  // Ends every watch stream (before server shutdown).
  void Stop();
  uint64_t version() const;
  // What GetStatus answers and the load window's sums, taken together (the operator page,
  // router/cluster_view.h).
  void Snapshot(v1::StatusResponse* status, LoadWindow::Sums* window) const;

 private:
  void FillStatus(v1::StatusResponse* resp) const;  // under mu_
  void Changed();  // after a membership change, under mu_: metrics + wake watchers
  // Under mu_: the rebalancer's plan and, with apply, BeginChange.
  absl::StatusOr<v1::RebalanceResponse> RebalanceLocked(bool dry_run, bool force, absl::Time now);
  void MaybeRebalance(absl::Time now);  // under mu_: the automatic triggers
  Placement initial_placement_;         // the slots of each group come from it
  absl::Time next_check_;
  absl::Time last_rebalance_ = absl::InfinitePast();
  std::string last_result_;
  double last_imbalance_ = 1.0;
  RouterServerOptions options_;
  mutable std::mutex mu_;
  std::condition_variable changed_;
  Membership membership_;
  LoadWindow load_window_;  // ReportLoad adds to it beside membership_'s totals
  bool stopping_ = false;
  int watchers_ = 0;
  // Watchers get no map before settle_until_: a freshly (re)started router knows none of the
  // live replicas until their next heartbeat tells them to register again, and its first maps
  // would take every replica away from the dispatchers for that long. Two heartbeat
  // intervals after the start; then, until every shard group has a replica again, at most
  // until settle_cap_ (one expiry later: a replica silent that long would be expired anyway).
  // Meanwhile the dispatchers keep the previous router's map. Once a map went out, never again.
  absl::Time settle_until_;
  absl::Time settle_cap_;
  bool settled_ = false;
  bool Settling(absl::Time now);  // under mu_
};

class RouterServer {
 public:
  static absl::StatusOr<std::unique_ptr<RouterServer>> Start(Placement placement,
                                                             RouterServerOptions options);
  ~RouterServer();  // Shutdown()
  int port() const { return port_; }
  std::string address() const { return LoopbackAddress(port_); }
  RouterServiceImpl& service() { return *service_; }
  void Shutdown();

 private:
  RouterServer() = default;
  std::unique_ptr<RouterServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stop_ = false;
  std::thread sweeper_;
};

}  // namespace expertmesh
