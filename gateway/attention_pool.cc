#include "gateway/attention_pool.h"

#include <algorithm>
#include <limits>

#include "gateway/strings.h"
#include "service-common/grpc_util.h"
#include "service-common/handshake.h"
#include "spdlog/spdlog.h"

namespace expertmesh::gateway {

SubmitCall::SubmitCall(AttentionReplica* replica, std::string request_id,
                       std::chrono::system_clock::time_point deadline)
    : replica_(replica), request_id_(std::move(request_id)) {
  context_.set_deadline(deadline);
  replica_->outstanding.fetch_add(1);
}

SubmitCall::~SubmitCall() {
  if (!finished_) {
    Cancel();
    v1::TokenEvent drain;
    while (reader_ != nullptr && reader_->Read(&drain)) {
    }
    Finish().IgnoreError();
  }
  replica_->outstanding.fetch_sub(1);
}

bool SubmitCall::Read(v1::TokenEvent* event) { return !finished_ && reader_->Read(event); }

absl::Status SubmitCall::Finish() {
  if (finished_) return absl::FailedPreconditionError("stream already finished");
  finished_ = true;
  grpc::Status status = reader_->Finish();
  if (cancelled_.load() && status.error_code() == grpc::StatusCode::CANCELLED) {
    return absl::CancelledError("cancelled by the gateway");
  }
  if (!status.ok()) {
    // The gateway validated the request; a replica refusing it now is the cluster's fault
    // (HTTP 500), not the client's. Capacity, availability and deadlines keep their codes.
    grpc::StatusCode code = status.error_code();
    if (code == grpc::StatusCode::INVALID_ARGUMENT ||
        code == grpc::StatusCode::FAILED_PRECONDITION || code == grpc::StatusCode::OUT_OF_RANGE ||
        code == grpc::StatusCode::NOT_FOUND) {
      code = grpc::StatusCode::INTERNAL;
    }
    return FromGrpcStatus(grpc::Status(
        code, Cat("attention service ", replica_->address, ": ", status.error_message())));
  }
  return absl::OkStatus();
}

void SubmitCall::Cancel() {
  if (cancelled_.exchange(true)) return;
  context_.TryCancel();
  // The stream's cancellation reaches the replica too; the Cancel RPC makes the release
  // immediate and explicit (and is harmless when the sequence has already finished).
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  v1::CancelRequest request;
  request.set_request_id(request_id_);
  v1::CancelResponse response;
  grpc::Status status = replica_->stub->Cancel(&ctx, request, &response);
  if (!status.ok()) {
    spdlog::debug("Cancel {} on {}: {}", request_id_, replica_->address, status.error_message());
  }
}

AttentionPool::AttentionPool(Options options) : options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<AttentionPool>> AttentionPool::Create(Options options) {
  if (options.addresses.empty()) {
    return absl::InvalidArgumentError("no attention-service address given");
  }
  std::unique_ptr<AttentionPool> pool(new AttentionPool(std::move(options)));
  for (const std::string& address : pool->options_.addresses) {
    auto replica = std::make_unique<AttentionReplica>();
    replica->address = address;
    replica->channel = MakeChannel(address);
    replica->stub = v1::AttentionService::NewStub(replica->channel);
    pool->replicas_.push_back(std::move(replica));
  }
  pool->poller_ = std::thread([p = pool.get()] { p->PollLoop(); });
  return pool;
}

AttentionPool::~AttentionPool() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (poller_.joinable()) poller_.join();
}

void AttentionPool::PollReplica(AttentionReplica& r) {
  auto fail = [&](const std::string& why) {
    if (r.ready.exchange(false)) spdlog::warn("attention replica {} not ready: {}", r.address, why);
    std::lock_guard lock(mu_);
    r.last_error = why;
  };
  const auto timeout = absl::Milliseconds(options_.rpc_timeout.count());
  absl::StatusOr<bool> serving = CheckHealth(*r.channel, "", timeout);
  if (!serving.ok()) return fail(std::string(serving.status().message()));
  if (!*serving) return fail("NOT_SERVING");
  if (options_.identity.has_value() && !r.ready.load()) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
    v1::HandshakeRequest request;
    *request.mutable_client() = *options_.identity;
    v1::HandshakeResponse response;
    grpc::Status status = r.stub->Handshake(&ctx, request, &response);
    if (!status.ok()) return fail(Cat("handshake: ", status.error_message()));
    absl::Status peer = CheckPeer(*options_.identity, response.server());
    if (!peer.ok()) return fail(std::string(peer.message()));
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
  v1::LoadResponse load;
  grpc::Status status = r.stub->GetLoad(&ctx, v1::LoadRequest(), &load);
  if (!status.ok()) return fail(Cat("GetLoad: ", status.error_message()));
  r.reported_load = load.running() + load.waiting();
  r.max_context = load.max_context();
  if (!r.ready.exchange(true)) spdlog::info("attention replica {} ready", r.address);
  {
    std::lock_guard lock(mu_);
    r.last_error.clear();
  }
  cv_.notify_all();
}

void AttentionPool::PollOnce() {
  for (auto& r : replicas_) PollReplica(*r);
}

void AttentionPool::PollLoop() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    lock.unlock();
    PollOnce();
    lock.lock();
    cv_.wait_for(lock, options_.poll_interval, [&] { return stopping_; });
  }
}

bool AttentionPool::AnyReady() const {
  return std::any_of(replicas_.begin(), replicas_.end(),
                     [](const auto& r) { return r->ready.load(); });
}

bool AttentionPool::WaitReady(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, timeout, [&] { return stopping_ || AnyReady(); }) && AnyReady();
}

uint32_t AttentionPool::max_context() const {
  uint32_t best = 0;
  for (const auto& r : replicas_) {
    if (!r->ready.load()) continue;
    uint32_t c = r->max_context.load();
    if (c != 0 && (best == 0 || c < best)) best = c;
  }
  return best;
}

absl::StatusOr<std::unique_ptr<SubmitCall>> AttentionPool::Submit(
    const v1::SubmitRequest& request, std::chrono::system_clock::time_point deadline) {
  // Least work first: this gateway's open streams (exact, immediate) plus what the replica
  // last reported (covers other gateways). Ties go to the replica with fewer own streams.
  AttentionReplica* best = nullptr;
  int64_t best_work = std::numeric_limits<int64_t>::max();
  for (auto& r : replicas_) {
    if (!r->ready.load()) continue;
    int64_t work = static_cast<int64_t>(r->outstanding.load()) + r->reported_load.load();
    if (work < best_work || (work == best_work && r->outstanding < best->outstanding)) {
      best = r.get();
      best_work = work;
    }
  }
  if (best == nullptr) {
    return absl::UnavailableError("No attention-service replica is ready.");
  }
  std::unique_ptr<SubmitCall> call(new SubmitCall(best, request.request_id(), deadline));
  call->reader_ = best->stub->Submit(&call->context_, request);
  return call;
}

std::vector<AttentionPool::ReplicaState> AttentionPool::Snapshot() const {
  std::lock_guard lock(mu_);
  std::vector<ReplicaState> out;
  for (const auto& r : replicas_) {
    out.push_back({r->address, r->ready.load(), r->outstanding.load(), r->reported_load.load(),
                   r->last_error});
  }
  return out;
}

}  // namespace expertmesh::gateway
