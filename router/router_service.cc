#include "router/router_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/base/status.h"
#include "service-common/handshake.h"
#include "spdlog/spdlog.h"

namespace expertmesh {

RouterServiceImpl::RouterServiceImpl(Placement placement, RouterServerOptions options)
    : initial_placement_(placement),
      next_check_(absl::Now() + options.rebalance.check_every),
      options_(std::move(options)),
      membership_(std::move(placement), options_.membership),
      load_window_(membership_.placement().n_layers, membership_.placement().n_routed_experts,
                   absl::Now(), options_.load_window),
      settle_until_(absl::Now() + 2 * options_.membership.heartbeat_interval),
      settle_cap_(settle_until_ + options_.membership.expiry) {}

bool RouterServiceImpl::Settling(absl::Time now) {
  if (settled_) return false;
  if (now < settle_until_) return true;
  if (now < settle_cap_) {
    const v1::PlacementMap map = membership_.Map(now);
    for (const v1::ShardGroup& g : map.shards()) {
      if (g.replicas_size() == 0) return true;
    }
  }
  settled_ = true;
  spdlog::info("publishing placement maps ({} replica(s) registered)", membership_.replica_count());
  return false;
}

RouterServiceImpl::~RouterServiceImpl() { Stop(); }

uint64_t RouterServiceImpl::version() const {
  std::lock_guard<std::mutex> lock(mu_);
  return membership_.version();
}

void RouterServiceImpl::Changed() {
  if (options_.metrics) {
    options_.metrics->GetGauge("expertmesh_router_placement_version", "Current placement version")
        .Set(static_cast<double>(membership_.version()));
    options_.metrics->GetGauge("expertmesh_router_replicas", "Registered shard replicas")
        .Set(static_cast<double>(membership_.replica_count()));
    const v1::PlacementMap map = membership_.Map(absl::Now());
    for (const v1::ShardGroup& g : map.shards()) {
      options_.metrics
          ->GetGauge("expertmesh_router_shard_replicas", "Registered replicas per shard group",
                     {{"shard", std::to_string(g.shard_id())}})
          .Set(g.replicas_size());
    }
  }
  changed_.notify_all();
}

grpc::Status RouterServiceImpl::Handshake(grpc::ServerContext*, const v1::HandshakeRequest* req,
                                          v1::HandshakeResponse* resp) {
  if (absl::Status s = CheckPeer(options_.identity, req->client()); !s.ok()) {
    return ToGrpcStatus(s);
  }
  *resp->mutable_server() = options_.identity;
  return grpc::Status::OK;
}

grpc::Status RouterServiceImpl::Register(grpc::ServerContext*, const v1::RegisterRequest* req,
                                         v1::RegisterResponse* resp) {
  if (absl::Status s = CheckPeer(options_.identity, req->identity()); !s.ok()) {
    spdlog::warn("register from {} refused: {}", req->address(), std::string(s.message()));
    return ToGrpcStatus(s);
  }
  std::lock_guard<std::mutex> lock(mu_);
  absl::StatusOr<v1::RegisterResponse> r = membership_.Register(*req, absl::Now());
  if (!r.ok()) {
    spdlog::warn("register from {} refused: {}", req->address(), std::string(r.status().message()));
    return ToGrpcStatus(r.status());
  }
  *resp = *std::move(r);
  spdlog::info("registered {} at {} for shard {} (placement v{})", resp->replica_id(),
               req->address(), req->shard_id(), membership_.version());
  Changed();
  return grpc::Status::OK;
}

grpc::Status RouterServiceImpl::Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* req,
                                          v1::HeartbeatResponse* resp) {
  std::lock_guard<std::mutex> lock(mu_);
  Membership::HeartbeatResult r = membership_.Heartbeat(*req, absl::Now());
  resp->set_known(r.known);
  if (r.target) *resp->mutable_target() = *std::move(r.target);
  if (r.map_changed) {
    spdlog::info("placement v{}: {}", membership_.version(), membership_.last_change());
    Changed();
  }
  return grpc::Status::OK;
}

grpc::Status RouterServiceImpl::Deregister(grpc::ServerContext*, const v1::DeregisterRequest* req,
                                           v1::DeregisterResponse*) {
  std::lock_guard<std::mutex> lock(mu_);
  if (membership_.Deregister(req->replica_id())) {
    spdlog::info("deregistered {} (placement v{})", req->replica_id(), membership_.version());
    Changed();
  }
  return grpc::Status::OK;
}

void RouterServiceImpl::Sweep() {
  std::lock_guard<std::mutex> lock(mu_);
  const absl::Time now = absl::Now();
  const bool was_pending = membership_.ChangePending();
  const uint64_t commits = membership_.commits();
  const size_t replicas = membership_.replica_count();
  if (membership_.Expire(now)) {
    if (membership_.replica_count() < replicas) {
      spdlog::warn("expired replicas without heartbeat (placement v{})", membership_.version());
    }
    Changed();
  }
  if (was_pending && !membership_.ChangePending()) {
    if (membership_.commits() > commits) {
      Changed();
    } else {
      spdlog::warn("placement change {}", membership_.last_change());
    }
  }
  MaybeRebalance(now);
}

absl::Status RouterServiceImpl::BeginPlacementChange(Placement next) {
  std::lock_guard<std::mutex> lock(mu_);
  EM_RETURN_IF_ERROR(membership_.BeginChange(std::move(next), absl::Now()));
  spdlog::info("placement change: {}", membership_.last_change());
  return absl::OkStatus();
}

absl::StatusOr<v1::RebalanceResponse> RouterServiceImpl::RunRebalance(bool dry_run, bool force) {
  std::lock_guard<std::mutex> lock(mu_);
  return RebalanceLocked(dry_run, force, absl::Now());
}

absl::StatusOr<v1::RebalanceResponse> RouterServiceImpl::RebalanceLocked(bool dry_run, bool force,
                                                                         absl::Time now) {
  if (!options_.model) {
    return absl::FailedPreconditionError("this router was started without the model's config");
  }
  if (membership_.ChangePending()) {
    return absl::FailedPreconditionError(
        absl::StrCat("a placement change is in progress (", membership_.last_change(), ")"));
  }
  if (!membership_.AllLive()) {
    return absl::FailedPreconditionError(
        "a registered shard replica cannot change its experts (no live placement: e.g. a CUDA "
        "shard)");
  }
  const LoadWindow::Sums window = load_window_.Sum(now);
  EM_ASSIGN_OR_RETURN(
      RebalancePlan plan,
      PlanRebalance(*options_.model, membership_.placement(), initial_placement_, window,
                    membership_.GroupCapacity(now), options_.rebalance, force));
  last_imbalance_ = plan.before;
  v1::RebalanceResponse resp;
  resp.set_reason(plan.reason);
  resp.set_imbalance_before(plan.before);
  resp.set_imbalance_after(plan.after);
  resp.set_experts_moved(plan.moved);
  resp.set_redundant_copies(plan.redundant);
  if (!plan.change || dry_run) {
    resp.set_target_generation(membership_.target_generation());
    return resp;
  }
  EM_RETURN_IF_ERROR(membership_.BeginChange(std::move(plan.placement), now));
  resp.set_started(true);
  resp.set_target_generation(membership_.target_generation());
  last_rebalance_ = now;
  last_result_ = plan.reason;
  if (options_.metrics) {
    options_.metrics
        ->GetCounter("expertmesh_router_rebalances_total", "Placement changes the rebalancer began")
        .Inc();
  }
  spdlog::info("rebalance: {}; loading target generation {}", plan.reason,
               membership_.target_generation());
  return resp;
}

void RouterServiceImpl::MaybeRebalance(absl::Time now) {
  if (!options_.model || now < next_check_) return;
  next_check_ = now + options_.rebalance.check_every;
  if (options_.metrics) {
    absl::StatusOr<double> imbalance =
        MeanImbalance(*options_.model, membership_.placement(), load_window_.Sum(now),
                      membership_.GroupCapacity(now));
    if (imbalance.ok()) {
      last_imbalance_ = *imbalance;
      options_.metrics
          ->GetGauge("expertmesh_router_expert_imbalance",
                     "Predicted mean over MoE layers of the busiest shard group's load / its "
                     "share, over the load window")
          .Set(*imbalance);
    }
  }
  const RebalancerOptions& o = options_.rebalance;
  if (!o.automatic || membership_.ChangePending() || !membership_.AllLive()) return;
  const bool periodic = o.interval > absl::ZeroDuration() && now - last_rebalance_ >= o.interval;
  if (now - last_rebalance_ < o.cooldown && !periodic) return;
  absl::StatusOr<v1::RebalanceResponse> r =
      RebalanceLocked(/*dry_run=*/false, /*force=*/false, now);
  if (!r.ok()) {
    spdlog::warn("rebalance: {}", r.status());
  } else if (!r->started() && periodic) {
    last_rebalance_ = now;  // the next periodic attempt one interval later
  }
}

grpc::Status RouterServiceImpl::Rebalance(grpc::ServerContext*, const v1::RebalanceRequest* req,
                                          v1::RebalanceResponse* resp) {
  absl::StatusOr<v1::RebalanceResponse> r = RunRebalance(req->dry_run(), req->force());
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = *std::move(r);
  return grpc::Status::OK;
}

void RouterServiceImpl::Stop() {
  std::lock_guard<std::mutex> lock(mu_);
  stopping_ = true;
  changed_.notify_all();
}

grpc::Status RouterServiceImpl::WatchPlacement(grpc::ServerContext* ctx,
                                               const v1::WatchPlacementRequest* req,
                                               grpc::ServerWriter<v1::PlacementMap>* writer) {
  if (absl::Status s = CheckPeer(options_.identity, req->identity()); !s.ok()) {
    return ToGrpcStatus(s);
  }
  std::unique_lock<std::mutex> lock(mu_);
  if (watchers_ >= options_.max_watchers) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("router: ", options_.max_watchers, " watchers already"));
  }
  ++watchers_;
  uint64_t known = req->known_version();
  grpc::Status result = grpc::Status::OK;
  while (!stopping_ && !ctx->IsCancelled()) {
    if (const absl::Time now = absl::Now(); Settling(now)) {
      // Wakes on registrations (changed_), at the latest every 50 ms.
      changed_.wait_for(lock, std::chrono::milliseconds(50));
      continue;
    }
    if (membership_.version() > known) {
      const v1::PlacementMap map = membership_.Map(absl::Now());
      known = map.version();
      lock.unlock();
      const bool ok = writer->Write(map);
      lock.lock();
      if (!ok) break;  // the watcher went away
      continue;
    }
    // Wake on a change; also every 200 ms to notice a cancelled watcher.
    changed_.wait_for(lock, std::chrono::milliseconds(200));
  }
  if (stopping_) result = grpc::Status(grpc::StatusCode::UNAVAILABLE, "router shutting down");
  --watchers_;
  return result;
}

grpc::Status RouterServiceImpl::ReportLoad(grpc::ServerContext*, const v1::LoadReport* req,
                                           v1::LoadReportResponse*) {
  std::lock_guard<std::mutex> lock(mu_);
  membership_.AddLoad(*req);
  load_window_.Add(*req, absl::Now());
  return grpc::Status::OK;
}

grpc::Status RouterServiceImpl::GetStatus(grpc::ServerContext*, const v1::StatusRequest*,
                                          v1::StatusResponse* resp) {
  std::lock_guard<std::mutex> lock(mu_);
  FillStatus(resp);
  return grpc::Status::OK;
}

void RouterServiceImpl::FillStatus(v1::StatusResponse* resp) const {
  const absl::Time now = absl::Now();
  *resp->mutable_placement() = membership_.Map(now, /*include_loading=*/true);
  v1::RebalanceState* r = resp->mutable_rebalance();
  r->set_automatic(options_.model.has_value() && options_.rebalance.automatic);
  r->set_threshold(options_.rebalance.threshold);
  r->set_window_s(static_cast<uint32_t>(absl::ToInt64Seconds(load_window_.length())));
  r->set_imbalance(last_imbalance_);
  r->set_pending(membership_.ChangePending());
  r->set_rebalances(membership_.commits());
  r->set_last_result(membership_.last_change().empty() ? last_result_ : membership_.last_change());
  if (membership_.last_commit() != absl::InfinitePast()) {
    r->set_last_change_ms_ago(static_cast<uint64_t>(
        std::max<int64_t>(1, absl::ToInt64Milliseconds(now - membership_.last_commit()))));
  }
  r->set_redundant_copies(RedundantCopies(membership_.placement()));
  for (v1::LayerExpertLoad& l : membership_.Load()) *resp->add_expert_load() = std::move(l);
  resp->set_model_name(options_.identity.model_name());
}

void RouterServiceImpl::Snapshot(v1::StatusResponse* status, LoadWindow::Sums* window) const {
  std::lock_guard<std::mutex> lock(mu_);
  FillStatus(status);
  *window = load_window_.Sum(absl::Now());
}

absl::StatusOr<std::unique_ptr<RouterServer>> RouterServer::Start(Placement placement,
                                                                  RouterServerOptions options) {
  std::unique_ptr<RouterServer> rs(new RouterServer());
  const absl::Duration sweep = options.membership.heartbeat_interval / 2;
  rs->service_ = std::make_unique<RouterServiceImpl>(std::move(placement), options);
  ServerOptions server = options.server;
  server.health_service_names.push_back(v1::RouterService::service_full_name());
  // Each watch stream holds a sync-server thread: room for all of them plus unary calls.
  server.max_sync_threads = std::max(server.max_sync_threads, options.max_watchers + 32);
  EM_ASSIGN_OR_RETURN(RunningServer running, StartGrpcServer(server, {rs->service_.get()}));
  rs->server_ = std::move(running.server);
  rs->port_ = running.port;
  rs->sweeper_ = std::thread([r = rs.get(), sweep] {
    std::unique_lock<std::mutex> lock(r->stop_mu_);
    while (
        !r->stop_cv_.wait_for(lock, absl::ToChronoMilliseconds(sweep), [r] { return r->stop_; })) {
      lock.unlock();
      r->service_->Sweep();
      lock.lock();
    }
  });
  SetServing(*rs->server_, true);
  spdlog::info("router listening on {}", rs->address());
  return rs;
}

void RouterServer::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(stop_mu_);
    if (stop_) return;
    stop_ = true;
  }
  stop_cv_.notify_all();
  if (sweeper_.joinable()) sweeper_.join();
  if (server_) {
    SetServing(*server_, false);
    service_->Stop();
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  }
}

RouterServer::~RouterServer() { Shutdown(); }

}  // namespace expertmesh
