#include "expert-service/registration.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "service-common/grpc_util.h"
#include "spdlog/spdlog.h"

namespace expertmesh {
namespace {
std::chrono::system_clock::time_point DeadlineIn(absl::Duration d) {
  return std::chrono::system_clock::now() + absl::ToChronoMilliseconds(d);
}
}  // namespace

absl::StatusOr<std::unique_ptr<RouterRegistration>> RouterRegistration::Start(
    const std::string& router_address, v1::RegisterRequest request,
    std::function<uint32_t()> outstanding_rows, absl::Duration rpc_timeout,
    std::function<void(bool registered)> on_registered, LiveHooks live) {
  std::unique_ptr<RouterRegistration> r(new RouterRegistration());
  r->live_ = std::move(live);
  r->on_registered_ = std::move(on_registered);
  r->router_address_ = router_address;
  r->stub_ = v1::RouterService::NewStub(MakeChannel(router_address));
  r->request_ = std::move(request);
  r->outstanding_rows_ = std::move(outstanding_rows);
  r->rpc_timeout_ = rpc_timeout;
  absl::Status first = r->RegisterOnce();
  if (!first.ok()) {
    if (first.code() != absl::StatusCode::kUnavailable &&
        first.code() != absl::StatusCode::kDeadlineExceeded) {
      return absl::Status(first.code(),
                          absl::StrCat("router ", router_address, " refused: ", first.message()));
    }
    spdlog::warn("router {} not reachable yet ({}); retrying in the background", router_address,
                 std::string(first.message()));
  }
  r->thread_ = std::thread([p = r.get()] { p->Loop(); });
  return r;
}

absl::Status RouterRegistration::RegisterOnce() {
  grpc::ClientContext ctx;
  ctx.set_deadline(DeadlineIn(rpc_timeout_));
  if (live_.held) {  // offer what is held now (a rebalance may have changed it)
    request_.clear_experts();
    for (const LayerExpert& le : live_.held()) {
      v1::LayerExpert* p = request_.add_experts();
      p->set_layer(le.layer);
      p->set_expert(le.expert);
    }
  }
  v1::RegisterResponse resp;
  if (grpc::Status s = stub_->Register(&ctx, request_, &resp); !s.ok()) return FromGrpcStatus(s);
  if (resp.has_target() && live_.on_target) live_.on_target(resp.target());
  absl::Duration every;
  {
    std::lock_guard<std::mutex> lock(mu_);
    replica_id_ = resp.replica_id();
    if (resp.heartbeat_interval_ms() > 0) {
      interval_ = absl::Milliseconds(resp.heartbeat_interval_ms());
    }
    every = interval_;
  }
  spdlog::info("registered with the router as {} (shard {}, heartbeat every {})", resp.replica_id(),
               request_.shard_id(), absl::FormatDuration(every));
  if (on_registered_) on_registered_(true);
  return absl::OkStatus();
}

void RouterRegistration::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  // While unregistered (the router not reachable yet, or it refused a registration again) the
  // attempts back off: the heartbeat interval doubling up to 2 s (or the interval if longer).
  absl::Duration retry = interval_;
  while (!cv_.wait_for(lock, absl::ToChronoMilliseconds(replica_id_.empty() ? retry : interval_),
                       [this] { return stop_; })) {
    const std::string id = replica_id_;
    lock.unlock();
    if (id.empty()) {
      if (absl::Status s = RegisterOnce(); !s.ok()) {
        if (s.code() == absl::StatusCode::kUnavailable ||
            s.code() == absl::StatusCode::kDeadlineExceeded) {
          Reconnect();
        }
        retry = std::min(2 * retry, std::max(interval(), absl::Seconds(2)));
        spdlog::warn("register: {} (next attempt in {})", std::string(s.message()),
                     absl::FormatDuration(retry));
      } else {
        retry = interval();
      }
    } else {
      grpc::ClientContext ctx;
      ctx.set_deadline(DeadlineIn(rpc_timeout_));
      v1::HeartbeatRequest req;
      req.set_replica_id(id);
      req.set_outstanding_rows(outstanding_rows_ ? outstanding_rows_() : 0);
      if (live_.held_generation) req.set_held_generation(live_.held_generation());
      if (live_.load_error) req.set_load_error(live_.load_error());
      v1::HeartbeatResponse resp;
      const grpc::Status s = stub_->Heartbeat(&ctx, req, &resp);
      if (s.ok() && resp.known() && resp.has_target() && live_.on_target) {
        live_.on_target(resp.target());
      }
      if (s.ok() && !resp.known()) {
        spdlog::warn("the router forgot {}; registering again", id);
        if (absl::Status r = RegisterOnce(); !r.ok()) {
          spdlog::warn("register: {}", std::string(r.message()));
          {
            std::lock_guard<std::mutex> l(mu_);
            replica_id_.clear();
          }
          if (on_registered_) on_registered_(false);
        }
      } else if (!s.ok()) {
        spdlog::warn("heartbeat: {}", s.error_message());
        if (s.error_code() == grpc::StatusCode::UNAVAILABLE ||
            s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
          Reconnect();
        }
      }
    }
    lock.lock();
  }
}

void RouterRegistration::Reconnect() {
  stub_ = v1::RouterService::NewStub(MakeChannel(router_address_));
}

void RouterRegistration::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void RouterRegistration::Deregister() {
  Stop();
  const std::string id = replica_id();
  if (id.empty()) return;
  grpc::ClientContext ctx;
  ctx.set_deadline(DeadlineIn(rpc_timeout_));
  v1::DeregisterRequest req;
  req.set_replica_id(id);
  v1::DeregisterResponse resp;
  if (grpc::Status s = stub_->Deregister(&ctx, req, &resp); !s.ok()) {
    spdlog::warn("deregister {}: {}", id, s.error_message());
  } else {
    spdlog::info("deregistered {}", id);
  }
  std::lock_guard<std::mutex> lock(mu_);
  replica_id_.clear();
}

absl::Duration RouterRegistration::interval() const {
  std::lock_guard<std::mutex> lock(mu_);
  return interval_;
}

std::string RouterRegistration::replica_id() const {
  std::lock_guard<std::mutex> lock(mu_);
  return replica_id_;
}

RouterRegistration::~RouterRegistration() { Stop(); }

}  // namespace expertmesh
