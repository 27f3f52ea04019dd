#include "gateway/attention_pool.h"

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <netdb.h>
#include <netinet/in.h>
#include <resolv.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>

#include "absl/strings/numbers.h"
#include "gateway/strings.h"
#include "service-common/bootstrap.h"
#include "service-common/grpc_util.h"
#include "service-common/handshake.h"
#include "service-common/tls.h"
#include "spdlog/spdlog.h"

namespace expertmesh::gateway {
namespace {

constexpr int kMaxSubmitAttempts = 3;

// "host:port" -> (host, port); brackets of "[v6]:port" removed.
absl::Status SplitHostPort(const std::string& text, std::string* host, int* port) {
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(Cat("'", text, "' is not host:port"));
  }
  *host = text.substr(0, colon);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  if (!absl::SimpleAtoi(text.substr(colon + 1), port) || *port < 1 || *port > 65535) {
    return absl::InvalidArgumentError(Cat("'", text, "': the port must be in [1, 65535]"));
  }
  return absl::OkStatus();
}

// A member found under a DNS name is dialed by its address, and its certificate (under
// --tls-*) names the Service, not the pod IP: the name is checked instead. Otherwise the
// channel is MakeChannel's.
std::shared_ptr<grpc::Channel> MemberChannel(const std::string& address,
                                             const std::string& tls_name) {
  if (tls_name.empty()) return MakeChannel(address);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kDefaultMaxMessageBytes);
  args.SetMaxSendMessageSize(kDefaultMaxMessageBytes);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetSslTargetNameOverride(tls_name);
  return grpc::CreateCustomChannel(address, ProcessChannelCredentials(), args);
}

std::string JoinHostPort(const std::string& ip, int port) {
  return ip.find(':') != std::string::npos ? Cat("[", ip, "]:", port) : Cat(ip, ":", port);
}

// The system resolver (getaddrinfo: /etc/hosts, then the DNS of resolv.conf).
absl::StatusOr<std::vector<std::string>> ResolveSystem(const AttentionTarget& t) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* result = nullptr;
  const int rc = getaddrinfo(t.host.c_str(), nullptr, &hints, &result);
  if (rc == EAI_NONAME || rc == EAI_NODATA) {
    return absl::NotFoundError(Cat(t.host, ": ", gai_strerror(rc)));
  }
  if (rc != 0) return absl::UnavailableError(Cat(t.host, ": ", gai_strerror(rc)));
  std::set<std::string> out;
  for (addrinfo* a = result; a != nullptr; a = a->ai_next) {
    char buf[INET6_ADDRSTRLEN] = {};
    if (a->ai_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, buf, sizeof buf);
    } else if (a->ai_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr, buf, sizeof buf);
    } else {
      continue;
    }
    out.insert(JoinHostPort(buf, t.port));
  }
  freeaddrinfo(result);
  if (out.empty()) return absl::NotFoundError(Cat(t.host, ": no address"));
  return std::vector<std::string>(out.begin(), out.end());
}

// The A and AAAA records of t.host asked of the DNS server t.authority (IPv4, port 53 unless
// given), bypassing resolv.conf: gRPC's dns://authority/name form.
absl::StatusOr<std::vector<std::string>> ResolveWithServer(const AttentionTarget& t,
                                                           std::chrono::milliseconds timeout) {
  std::string server = t.authority;
  int server_port = 53;
  if (server.find(':') != std::string::npos) {
    if (absl::Status s = SplitHostPort(t.authority, &server, &server_port); !s.ok()) return s;
  }
  in_addr server_ip{};
  if (inet_pton(AF_INET, server.c_str(), &server_ip) != 1) {
    return absl::InvalidArgumentError(
        Cat("DNS server '", t.authority, "' must be an IPv4 address[:port]"));
  }
  struct __res_state state;
  std::memset(&state, 0, sizeof state);
  if (res_ninit(&state) != 0) return absl::UnavailableError("res_ninit failed");
  state.nscount = 1;
  state.nsaddr_list[0].sin_family = AF_INET;
  state.nsaddr_list[0].sin_addr = server_ip;
  state.nsaddr_list[0].sin_port = htons(static_cast<uint16_t>(server_port));
  state.retrans = std::max<int>(1, static_cast<int>((timeout.count() + 999) / 1000));
  state.retry = 1;
  std::set<std::string> out;
  bool not_found = true;
  std::string failure;
  for (const int type : {ns_t_a, ns_t_aaaa}) {
    unsigned char answer[4096];
    const int n = res_nquery(&state, t.host.c_str(), ns_c_in, type, answer, sizeof answer);
    if (n < 0) {
      if (state.res_h_errno != HOST_NOT_FOUND && state.res_h_errno != NO_DATA) {
        not_found = false;
        failure = Cat("DNS server ", t.authority, " did not answer for ", t.host, " (",
                      hstrerror(state.res_h_errno), ")");
      }
      continue;
    }
    not_found = false;
    ns_msg msg;
    if (ns_initparse(answer, n, &msg) != 0) {
      failure = Cat("DNS server ", t.authority, ": an answer that does not parse");
      continue;
    }
    for (int i = 0; i < ns_msg_count(msg, ns_s_an); ++i) {
      ns_rr rr;
      if (ns_parserr(&msg, ns_s_an, i, &rr) != 0) break;
      char buf[INET6_ADDRSTRLEN] = {};
      if (ns_rr_type(rr) == ns_t_a && ns_rr_rdlen(rr) == 4) {
        inet_ntop(AF_INET, ns_rr_rdata(rr), buf, sizeof buf);
      } else if (ns_rr_type(rr) == ns_t_aaaa && ns_rr_rdlen(rr) == 16) {
        inet_ntop(AF_INET6, ns_rr_rdata(rr), buf, sizeof buf);
      } else {
        continue;
      }
      out.insert(JoinHostPort(buf, t.port));
    }
  }
  res_nclose(&state);
  if (!failure.empty()) return absl::UnavailableError(failure);
  if (not_found || out.empty()) return absl::NotFoundError(Cat(t.host, ": no address records"));
  return std::vector<std::string>(out.begin(), out.end());
}

}  // namespace

absl::StatusOr<AttentionTarget> ParseAttentionTarget(const std::string& text) {
  AttentionTarget t;
  constexpr std::string_view kDns = "dns://";
  if (text.rfind(kDns, 0) != 0) {
    if (text.find("://") != std::string::npos) {
      return absl::InvalidArgumentError(
          Cat("'", text, "': only host:port and dns:///name:port targets are supported"));
    }
    std::string host;
    int port = 0;
    if (absl::Status s = SplitHostPort(text, &host, &port); !s.ok()) return s;
    t.host = text;
    return t;
  }
  const std::string rest = text.substr(kDns.size());
  const size_t slash = rest.find('/');
  if (slash == std::string::npos) {
    return absl::InvalidArgumentError(
        Cat("'", text, "': write dns:///name:port (system resolver) or dns://server/name:port"));
  }
  t.dns = true;
  t.authority = rest.substr(0, slash);
  if (absl::Status s = SplitHostPort(rest.substr(slash + 1), &t.host, &t.port); !s.ok()) return s;
  return t;
}

absl::StatusOr<std::vector<std::string>> ResolveAttentionTarget(const AttentionTarget& target,
                                                                std::chrono::milliseconds timeout) {
  if (!target.dns) return std::vector<std::string>{target.host};
  return target.authority.empty() ? ResolveSystem(target) : ResolveWithServer(target, timeout);
}

SubmitCall::SubmitCall(AttentionPool* pool, v1::SubmitRequest request,
                       std::chrono::system_clock::time_point deadline)
    : pool_(pool), request_(std::move(request)), deadline_(deadline) {}

void SubmitCall::Open(std::shared_ptr<AttentionReplica> replica) {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(deadline_);
  replica->outstanding.fetch_add(1);
  std::unique_ptr<grpc::ClientReader<v1::TokenEvent>> reader =
      replica->stub->Submit(context.get(), request_);
  std::lock_guard lock(mu_);
  reader_ = std::move(reader);  // the previous attempt's reader goes before its context
  context_ = std::move(context);
  replica_ = std::move(replica);
  ++attempts_;
  if (cancelled_.load()) context_->TryCancel();
}

void SubmitCall::Release() {
  if (replica_ != nullptr) replica_->outstanding.fetch_sub(1);
}

SubmitCall::~SubmitCall() {
  if (!finished_) {
    Cancel();
    v1::TokenEvent drain;
    while (!status_.has_value() && reader_ != nullptr && reader_->Read(&drain)) {
    }
    Finish().IgnoreError();
  }
  Release();
}

bool SubmitCall::Read(v1::TokenEvent* event) {
  while (!finished_ && !status_.has_value()) {
    if (reader_->Read(event)) {
      got_event_ = true;
      return true;
    }
    // Nothing sent to the client yet and the replica refused (draining, gone, not yet seen
    // down by the poller): the sequence can start over on another replica. CANCELLED that this
    // side did not ask for is the replica's server shutting down with the call just taken (a
    // drain that finished as the call arrived): the same.
    if (got_event_ || cancelled_.load()) return false;
    grpc::Status status = reader_->Finish();
    const bool replica_went = status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                              status.error_code() == grpc::StatusCode::CANCELLED;
    if (!replica_went || attempts_ >= kMaxSubmitAttempts ||
        std::chrono::system_clock::now() >= deadline_) {
      status_ = status;
      return false;
    }
    replica_->ready = false;  // until the poller finds it serving again
    std::shared_ptr<AttentionReplica> next = pool_->Pick(replica_.get());
    if (next == nullptr) {
      status_ = status;
      return false;
    }
    spdlog::info("request {}: attention replica {} refused it ({}); trying {}",
                 request_.request_id(), replica_->address, status.error_message(), next->address);
    Release();
    Open(std::move(next));
  }
  return false;
}

absl::Status SubmitCall::Finish() {
  if (finished_) return absl::FailedPreconditionError("stream already finished");
  finished_ = true;
  grpc::Status status = status_.has_value() ? *status_ : reader_->Finish();
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

std::string SubmitCall::replica_address() const {
  std::lock_guard lock(mu_);
  return replica_->address;
}

void SubmitCall::Cancel() {
  if (cancelled_.exchange(true)) return;
  std::shared_ptr<AttentionReplica> replica;
  {
    std::lock_guard lock(mu_);
    if (context_ != nullptr) context_->TryCancel();
    replica = replica_;
  }
  if (replica == nullptr) return;
  // The stream's cancellation reaches the replica too; the Cancel RPC makes the release
  // immediate and explicit (and is harmless when the sequence has already finished).
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  v1::CancelRequest request;
  request.set_request_id(request_.request_id());
  v1::CancelResponse response;
  grpc::Status status = replica->stub->Cancel(&ctx, request, &response);
  if (!status.ok()) {
    spdlog::debug("Cancel {} on {}: {}", request_.request_id(), replica->address,
                  status.error_message());
  }
}

AttentionPool::AttentionPool(Options options) : options_(std::move(options)) {}

std::shared_ptr<AttentionReplica> AttentionPool::MakeReplica(const std::string& address,
                                                             const std::string& target,
                                                             const std::string& tls_name) const {
  auto replica = std::make_shared<AttentionReplica>();
  replica->address = address;
  replica->target = target;
  replica->channel = MemberChannel(address, tls_name);
  replica->stub = v1::AttentionService::NewStub(replica->channel);
  return replica;
}

absl::StatusOr<std::unique_ptr<AttentionPool>> AttentionPool::Create(Options options) {
  if (options.addresses.empty()) {
    return absl::InvalidArgumentError("no attention-service address given");
  }
  std::vector<AttentionTarget> targets;
  for (const std::string& address : options.addresses) {
    absl::StatusOr<AttentionTarget> t = ParseAttentionTarget(address);
    if (!t.ok()) return t.status();
    targets.push_back(*std::move(t));
  }
  std::unique_ptr<AttentionPool> pool(new AttentionPool(std::move(options)));
  pool->targets_ = std::move(targets);
  bool dynamic = false;
  for (size_t i = 0; i < pool->targets_.size(); ++i) {
    if (pool->targets_[i].dns) {
      dynamic = true;
      continue;
    }
    pool->replicas_.push_back(
        pool->MakeReplica(pool->options_.addresses[i], pool->options_.addresses[i], ""));
  }
  if (dynamic) {
    pool->ResolveOnce();
    pool->resolver_ = std::thread([p = pool.get()] { p->ResolveLoop(); });
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
  if (resolver_.joinable()) resolver_.join();
}

void AttentionPool::ResolveOnce() {
  for (size_t i = 0; i < targets_.size(); ++i) {
    const AttentionTarget& t = targets_[i];
    if (!t.dns) continue;
    const std::string& name = options_.addresses[i];
    absl::StatusOr<std::vector<std::string>> addresses =
        ResolveAttentionTarget(t, options_.rpc_timeout);
    if (!addresses.ok() && addresses.status().code() != absl::StatusCode::kNotFound) {
      spdlog::warn("attention replicas of {}: {} (keeping the last ones)", name,
                   std::string(addresses.status().message()));
      continue;
    }
    const std::set<std::string> now =
        addresses.ok() ? std::set<std::string>(addresses->begin(), addresses->end())
                       : std::set<std::string>();
    std::vector<std::shared_ptr<AttentionReplica>> added;
    {
      std::lock_guard lock(mu_);
      std::set<std::string> known;
      std::erase_if(replicas_, [&](const std::shared_ptr<AttentionReplica>& r) {
        if (r->target != name) return false;
        if (now.count(r->address) > 0) {
          known.insert(r->address);
          return false;
        }
        // Out of the choice now; its open streams hold it until they end.
        spdlog::info("attention replica {} left {} ({} open streams finish there)", r->address,
                     name, r->outstanding.load());
        return true;
      });
      for (const std::string& address : now) {
        if (known.count(address) > 0) continue;
        added.push_back(MakeReplica(address, name, t.host));
        replicas_.push_back(added.back());
        spdlog::info("attention replica {} joined {}", address, name);
      }
    }
    // A new member is polled at once, so it can take requests without waiting for the poller.
    for (const auto& r : added) PollReplica(*r);
  }
}

void AttentionPool::ResolveLoop() {
  std::unique_lock lock(mu_);
  while (!cv_.wait_for(lock, options_.resolve_interval, [&] { return stopping_; })) {
    lock.unlock();
    ResolveOnce();
    lock.lock();
  }
}

void AttentionPool::PollReplica(AttentionReplica& r) {
  auto fail = [&](const std::string& why) {
    if (r.ready.exchange(false)) spdlog::warn("attention replica {} not ready: {}", r.address, why);
    std::lock_guard lock(mu_);
    r.last_error = why;
  };
  const auto timeout = absl::Milliseconds(options_.rpc_timeout.count());
  absl::StatusOr<bool> serving =
      CheckReady(*r.channel, v1::AttentionService::service_full_name(), timeout);
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

std::vector<std::shared_ptr<AttentionReplica>> AttentionPool::Members() const {
  std::lock_guard lock(mu_);
  return replicas_;
}

void AttentionPool::PollOnce() {
  for (const auto& r : Members()) PollReplica(*r);
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

bool AttentionPool::AnyReadyLocked() const {
  return std::any_of(replicas_.begin(), replicas_.end(),
                     [](const auto& r) { return r->ready.load(); });
}

bool AttentionPool::AnyReady() const {
  std::lock_guard lock(mu_);
  return AnyReadyLocked();
}

bool AttentionPool::WaitReady(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, timeout, [&] { return stopping_ || AnyReadyLocked(); }) &&
         AnyReadyLocked();
}

uint32_t AttentionPool::max_context() const {
  uint32_t best = 0;
  for (const auto& r : Members()) {
    if (!r->ready.load()) continue;
    uint32_t c = r->max_context.load();
    if (c != 0 && (best == 0 || c < best)) best = c;
  }
  return best;
}

std::shared_ptr<AttentionReplica> AttentionPool::Pick(const AttentionReplica* exclude) const {
  // Least work first: this gateway's open streams (exact, immediate) plus what the replica
  // last reported (covers other gateways). Ties go to the replica with fewer own streams.
  std::lock_guard lock(mu_);
  std::shared_ptr<AttentionReplica> best;
  int64_t best_work = std::numeric_limits<int64_t>::max();
  for (const auto& r : replicas_) {
    if (!r->ready.load() || r.get() == exclude) continue;
    int64_t work = static_cast<int64_t>(r->outstanding.load()) + r->reported_load.load();
    if (work < best_work || (work == best_work && r->outstanding < best->outstanding)) {
      best = r;
      best_work = work;
    }
  }
  return best;
}

absl::StatusOr<std::unique_ptr<SubmitCall>> AttentionPool::Submit(
    const v1::SubmitRequest& request, std::chrono::system_clock::time_point deadline) {
  std::shared_ptr<AttentionReplica> best = Pick(nullptr);
  if (best == nullptr) {
    return absl::UnavailableError("No attention-service replica is ready.");
  }
  std::unique_ptr<SubmitCall> call(new SubmitCall(this, request, deadline));
  call->Open(std::move(best));
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
