#include "dispatcher/dispatcher.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <optional>
#include <set>
#include <utility>

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/base/check.h"
#include "core/base/status.h"
#include "core/format/wire.h"
#include "dataplane/frame.h"
#include "expertmesh/v1/expert.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "service-common/handshake.h"
#include "service-common/tls.h"
#include "spdlog/spdlog.h"

namespace expertmesh {

// ---- A step's rendezvous -----------------------------------------------------------------

// What Run() waits on: one slot per shard group, filled by stream reader threads. A slot only
// accepts the answer of its current attempt (token), so late answers of abandoned attempts
// are dropped.
struct StepWaiter {
  struct Slot {
    uint64_t token = 0;
    bool filled = false;
    absl::Status status;  // transport-level outcome
    v1::ExpertResponse response;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Slot> slots;
  // A step that waits on data-plane connections too polls this eventfd for its stream answers
  // (created by EventFd(), under mu; -1 until then).
  int efd = -1;

  ~StepWaiter() {
    if (efd >= 0) ::close(efd);
  }

  void Deliver(size_t group, uint64_t token, absl::Status status, v1::ExpertResponse response) {
    std::lock_guard<std::mutex> lock(mu);
    Slot& s = slots[group];
    if (s.token != token || s.filled) return;
    s.filled = true;
    s.status = std::move(status);
    s.response = std::move(response);
    cv.notify_all();
    if (efd >= 0) {
      const uint64_t one = 1;
      [[maybe_unused]] ssize_t n = ::write(efd, &one, sizeof one);
    }
  }

  // Under mu.
  int EventFd() {
    if (efd < 0) efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return efd;
  }
};

struct Pending {
  std::shared_ptr<StepWaiter> waiter;
  size_t group = 0;
  uint64_t token = 0;
  int64_t rows = 0;
};

// ---- One long-lived Compute stream to one shard replica ------------------------------------

// The channel of one replica's stream: MakeChannel's settings (service-common/grpc_util.h) with
// a subchannel pool of its own. A stream reopened after a failure gets a new channel, which
// connects at once instead of inheriting the reconnect backoff a shared subchannel kept from the
// failure (a replica restarted on its address would fail its handshakes until it ended).
std::shared_ptr<grpc::Channel> ReplicaChannel(const std::string& target, int max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(target, ProcessChannelCredentials(), args);
}

// The stream runs on the gRPC callback API: Send() starts the write from the caller's thread
// when no other write is outstanding (else the request waits in the queue and OnWriteDone
// starts it), and the answer is delivered to the step's waiter from the gRPC thread whose
// read completed. No thread of our own sits between Run() and the socket.
class ReplicaStream {
 public:
  ReplicaStream(std::string replica_id, std::string address, std::string data_address,
                int32_t shard, const DispatcherOptions& options)
      : replica_id_(std::move(replica_id)),
        address_(std::move(address)),
        data_address_(std::move(data_address)),
        shard_(shard),
        options_(options) {}
  ~ReplicaStream() { Close(); }

  const std::string& replica_id() const { return replica_id_; }
  const std::string& address() const { return address_; }
  int64_t outstanding_rows() const { return outstanding_rows_.load(); }
  // When this replica was last chosen (the dispatcher's pick clock; 0 = never).
  uint64_t last_pick() const { return last_pick_.load(); }
  void MarkPicked(uint64_t clock) { last_pick_.store(clock); }
  bool healthy() const { return open_.load() && !broken_.load() && !data_failed_.load(); }
  // Its stream or data plane failed (and has not been opened again since, nor been listed by a
  // newer map); a never-opened one has not. Failed replicas are chosen last.
  bool failed() const { return (broken_.load() || data_failed_.load()) && !forgiven_.load(); }
  // A newer map lists it: it ranks with the open replicas again (it may have been restarted on
  // its address and registered again; else it fails again at its next try) until it fails anew.
  // Without this a replica restarted on its address would never get work while another replica
  // of its shard lives.
  void Forgive() { forgiven_.store(true); }

  // Opens the stream (handshake first, bounded by `deadline` and connect_timeout) unless it
  // is open and healthy. A broken stream is torn down and opened afresh. Serialized per
  // replica.
  absl::Status EnsureOpen(absl::Time deadline) {
    std::lock_guard<std::mutex> open_lock(open_mu_);
    if (closed_) return absl::UnavailableError(absl::StrCat(address_, ": closed"));
    if (open_ && !broken_ && StreamUp()) return absl::OkStatus();
    TearDown();
    // A new channel each time: this is the first open or a reopen after a failure.
    channel_ = ReplicaChannel(address_, options_.max_message_bytes);
    auto stub = v1::ExpertService::NewStub(channel_);
    {
      grpc::ClientContext ctx;
      ctx.set_deadline(
          absl::ToChronoTime(std::min(deadline, absl::Now() + options_.connect_timeout)));
      v1::HandshakeRequest req;
      *req.mutable_client() = options_.identity;
      v1::HandshakeResponse resp;
      if (grpc::Status s = stub->Handshake(&ctx, req, &resp); !s.ok()) {
        forgiven_ = false;
        return absl::Status(FromGrpcStatus(s).code(),
                            absl::StrCat(address_, ": handshake: ", s.error_message()));
      }
      if (absl::Status s = CheckPeer(options_.identity, resp.server()); !s.ok()) {
        forgiven_ = false;
        return s;
      }
    }
    stub_ = std::move(stub);
    // The stream lives as long as the replica is in the map: no call deadline here; every
    // request on it is bounded by the dispatcher's attempt and step deadlines instead.
    auto call = std::make_unique<Call>(this);
    {
      std::lock_guard<std::mutex> lock(mu_);
      call_ = call.get();
      broken_ = false;
      writing_ = false;
      starting_ = 0;
      release_hold_ = false;
      holding_ = true;
      open_ = true;
    }
    stub_->async()->Compute(&call->ctx, call.get());
    // The stream's hold keeps the call (and OnDone) from completing while a Send() outside
    // any reaction may still start a write on it; released once the call ended (ReleaseHold).
    call->AddHold();
    call->StartRead(&call->response);
    call->StartCall();
    owned_call_ = std::move(call);
    spdlog::info("dispatcher: stream to {} ({}) open", replica_id_, address_);
    return absl::OkStatus();
  }

  // The Compute call is up (a data-plane replica is open without one until a request falls
  // back to its stream).
  bool StreamUp() {
    std::lock_guard<std::mutex> lock(mu_);
    return call_ != nullptr && holding_;
  }

  // Queues a request (its request_id is assigned here) and starts its write unless another is
  // outstanding. The answer, or the failure of the stream, lands in pending.waiter.
  absl::StatusOr<uint64_t> Send(const v1::ExpertRequest& request, Pending pending) {
    const v1::ExpertRequest* start = nullptr;
    Call* call = nullptr;
    uint64_t id = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!open_ || broken_ || !holding_) {
        return absl::UnavailableError(absl::StrCat(address_, ": not open"));
      }
      if (static_cast<int>(pending_.size()) >= options_.max_in_flight_per_replica) {
        return absl::ResourceExhaustedError(
            absl::StrCat(address_, ": ", pending_.size(), " requests in flight"));
      }
      id = next_request_id_++;
      outstanding_rows_ += pending.rows;
      pending_.emplace(id, std::move(pending));
      queue_.push_back(request);
      queue_.back().set_request_id(id);
      if (!writing_) {
        writing_ = true;
        start = &queue_.front();
        call = call_;
        ++starting_;  // the stream's hold stays until this write is started
      }
    }
    // Outside mu_ (no lock is held across a gRPC call). The queue's front stays put (a deque
    // keeps its elements in place on push_back) until its OnWriteDone pops it.
    if (start) {
      call->StartWrite(start);
      std::unique_lock<std::mutex> lock(mu_);
      --starting_;
      MaybeReleaseHold(lock);
    }
    return id;
  }

  // ---- The framed TCP data plane (used instead of the stream when data_address is set) ----
  bool data_plane() const { return !data_address_.empty(); }
  const std::string& data_address() const { return data_address_; }

  // A connection for one request: an idle one that is still quiet, else a new one (connect
  // and hello, bounded by `deadline` and connect_timeout). Every failure sets *no_connection;
  // one of the connect or the hello (the replica's data plane down, or refusing connections
  // over its own bound) also marks the replica failed; RESOURCE_EXHAUSTED for
  // max_data_connections_per_replica in use does not.
  // `fresh`: open a new connection even when an idle one is pooled. *reused: the connection
  // came from the pool (it may have been closed by the replica since it went quiet).
  absl::StatusOr<std::unique_ptr<dataplane::FrameConnection>> Lease(absl::Time deadline,
                                                                    bool* no_connection, bool fresh,
                                                                    bool* reused) {
    *reused = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (data_closed_) {
        *no_connection = true;
        return absl::UnavailableError(absl::StrCat(data_address_, ": closed"));
      }
      while (!fresh && !idle_.empty()) {
        std::unique_ptr<dataplane::FrameConnection> c = std::move(idle_.back());
        idle_.pop_back();
        if (c->QuietAndOpen()) {
          ++leased_;
          *reused = true;
          return c;
        }
      }
      if (leased_ >= options_.max_data_connections_per_replica) {
        *no_connection = true;
        return absl::ResourceExhaustedError(absl::StrCat(
            data_address_, ": ", leased_, " data-plane connections in use from this dispatcher"));
      }
      ++leased_;  // reserved while connecting
    }
    const absl::Time by = std::min(deadline, absl::Now() + options_.connect_timeout);
    absl::StatusOr<std::unique_ptr<dataplane::FrameConnection>> c =
        dataplane::FrameConnection::Connect(data_address_, by,
                                            static_cast<uint32_t>(options_.max_message_bytes));
    absl::Status s = c.status();
    if (s.ok()) {
      v1::HandshakeRequest req;
      *req.mutable_client() = options_.identity;
      v1::HandshakeResponse resp;
      s = dataplane::Exchange(**c, dataplane::FrameType::kHello, req.SerializeAsString(),
                              dataplane::FrameType::kHelloOk, by);
      if (s.ok() &&
          !resp.ParseFromArray((*c)->payload().data(), static_cast<int>((*c)->payload().size()))) {
        s = absl::InternalError("hello answer is not a HandshakeResponse");
      }
      if (s.ok()) s = CheckPeer(options_.identity, resp.server());
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (!s.ok()) {
      --leased_;
      // Not broken_: that would cut its Compute stream, which requests that found no data
      // connection may be using.
      data_failed_ = true;
      forgiven_ = false;
      *no_connection = true;
      return absl::Status(s.code(), absl::StrCat(data_address_, ": data plane: ", s.message()));
    }
    if (!open_.exchange(true) || broken_ || data_failed_) {
      spdlog::info("dispatcher: data plane to {} ({}) open", replica_id_, data_address_);
    }
    broken_ = false;
    data_failed_ = false;
    return c;
  }

  // A leased connection after a good answer: kept for the next request unless the replica
  // failed meanwhile. `rows`: what AddOutstanding added for it.
  void Return(std::unique_ptr<dataplane::FrameConnection> c, int64_t rows) {
    std::lock_guard<std::mutex> lock(mu_);
    --leased_;
    outstanding_rows_ -= rows;
    if (!data_closed_ && !broken_ && !data_failed_) idle_.push_back(std::move(c));
  }
  // A leased connection that failed, timed out or was abandoned: closed.
  void Drop(std::unique_ptr<dataplane::FrameConnection> c, int64_t rows) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      --leased_;
      outstanding_rows_ -= rows;
    }
    c.reset();
  }
  void AddOutstanding(int64_t rows) { outstanding_rows_ += rows; }
  uint64_t NextRequestId() {
    std::lock_guard<std::mutex> lock(mu_);
    return next_request_id_++;
  }

  // Forgets a request: its answer, if it still comes, is dropped.
  void Abandon(uint64_t request_id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pending_.find(request_id);
    if (it == pending_.end()) return;
    outstanding_rows_ -= it->second.rows;
    pending_.erase(it);
  }

  // Marks the stream failed and cancels it; its pending requests fail over.
  void Break(const std::string& why) {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.clear();  // data plane: the idle connections go too
    forgiven_ = false;
    if (!open_ || broken_) return;
    spdlog::warn("dispatcher: breaking {} to {} ({}): {}", data_plane() ? "data plane" : "stream",
                 replica_id_, data_plane() ? data_address_ : address_, why);
    broken_ = true;
    if (call_) call_->ctx.TryCancel();
  }

  void Close() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      data_closed_ = true;
      idle_.clear();
    }
    std::lock_guard<std::mutex> open_lock(open_mu_);
    closed_ = true;
    TearDown();
  }

 private:
  // The reactor of one Compute call. A read is always outstanding (the next answer); at most
  // one write is. gRPC calls OnDone once both have completed after the call ended.
  struct Call final : public grpc::ClientBidiReactor<v1::ExpertRequest, v1::ExpertResponse> {
    explicit Call(ReplicaStream* s) : stream(s) {}
    void OnReadDone(bool ok) override {
      if (!ok) {  // the call ended (or was cancelled); OnDone follows once the hold is gone
        stream->OnEnded();
        return;
      }
      stream->OnAnswer(response);
      response.Clear();
      StartRead(&response);
    }
    void OnWriteDone(bool ok) override {
      if (const v1::ExpertRequest* next = stream->OnWritten(ok)) StartWrite(next);
    }
    void OnDone(const grpc::Status& status) override { stream->OnCallDone(status); }

    ReplicaStream* const stream;
    grpc::ClientContext ctx;
    v1::ExpertResponse response;
    bool done = false;  // under stream->mu_
  };

  // The call's last read failed: no write may start any more, and the stream's hold goes as
  // soon as no Send() is between its check and its StartWrite.
  void OnEnded() {
    std::unique_lock<std::mutex> lock(mu_);
    broken_ = true;
    forgiven_ = false;
    release_hold_ = true;
    MaybeReleaseHold(lock);
  }

  // Under mu_ (`lock`, released on return): drops the stream's hold once it is due.
  void MaybeReleaseHold(std::unique_lock<std::mutex>& lock) {
    if (!release_hold_ || !holding_ || starting_ > 0) return;
    holding_ = false;
    Call* call = call_;
    lock.unlock();
    call->RemoveHold();
  }

  void OnAnswer(v1::ExpertResponse& response) {
    std::optional<Pending> p;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = pending_.find(response.request_id());
      if (it != pending_.end()) {
        outstanding_rows_ -= it->second.rows;
        p = std::move(it->second);
        pending_.erase(it);
      }
    }
    if (p) p->waiter->Deliver(p->group, p->token, absl::OkStatus(), std::move(response));
  }

  // The front of the queue was written (or failed); the next one to write, if any.
  const v1::ExpertRequest* OnWritten(bool ok) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!queue_.empty()) queue_.pop_front();
    if (!ok) {  // the call is broken: no more writes; OnDone fails what is pending
      broken_ = true;
      writing_ = false;
      queue_.clear();
      return nullptr;
    }
    if (queue_.empty() || broken_) {
      writing_ = false;
      return nullptr;
    }
    return &queue_.front();
  }

  void OnCallDone(const grpc::Status& finish) {
    std::map<uint64_t, Pending> failed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      broken_ = true;
      writing_ = false;
      failed.swap(pending_);
      queue_.clear();
      outstanding_rows_ = 0;
    }
    const absl::Status why = absl::UnavailableError(absl::StrCat(
        "stream to ", replica_id_, " (", address_,
        ") ended: ", finish.ok() ? std::string("closed by the replica") : finish.error_message()));
    if (!failed.empty())
      spdlog::warn("dispatcher: {}; {} requests fail over", std::string(why.message()),
                   failed.size());
    for (auto& [id, p] : failed) p.waiter->Deliver(p.group, p.token, why, {});
    // Last: once `done` is set TearDown may free the call (this reaction's object) and the
    // stream itself; nothing of either is touched after the lock is released.
    std::lock_guard<std::mutex> lock(mu_);
    call_->done = true;
    call_ = nullptr;
    done_cv_.notify_all();
  }

  // Under open_mu_: cancels the call and waits until gRPC is done with it.
  void TearDown() {
    std::unique_lock<std::mutex> lock(mu_);
    broken_ = true;
    if (owned_call_) {
      owned_call_->ctx.TryCancel();
      done_cv_.wait(lock, [this] { return owned_call_->done; });
    }
    lock.unlock();
    owned_call_.reset();
    std::lock_guard<std::mutex> relock(mu_);
    open_ = false;
  }

  const std::string replica_id_;
  const std::string address_;
  const std::string data_address_;
  const int32_t shard_;
  const DispatcherOptions& options_;

  std::mutex open_mu_;  // EnsureOpen / Close
  bool closed_ = false;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ExpertService::Stub> stub_;
  std::unique_ptr<Call> owned_call_;  // the open (or last) call; freed by TearDown

  std::mutex mu_;                    // the fields below
  std::condition_variable done_cv_;  // a call's OnDone ran
  Call* call_ = nullptr;             // the call reactions may use, until its OnDone
  std::atomic<bool> open_{false};
  std::atomic<bool> broken_{false};
  std::atomic<bool> data_failed_{false};  // the last data-plane connect or hello failed
  std::atomic<bool> forgiven_{false};     // listed by a newer map since it last failed
  bool writing_ = false;                  // a write is outstanding on call_
  int starting_ = 0;                      // Send()s about to start a write outside a reaction
  bool holding_ = false;                  // call_ has the stream's hold
  bool release_hold_ = false;             // call_ ended: drop the hold once starting_ is 0
  uint64_t next_request_id_ = 1;
  std::deque<v1::ExpertRequest> queue_;  // front: being written; the rest wait
  std::map<uint64_t, Pending> pending_;
  bool data_closed_ = false;                                       // Close() ran
  int leased_ = 0;                                                 // data connections in use
  std::vector<std::unique_ptr<dataplane::FrameConnection>> idle_;  // data connections to reuse
  std::atomic<int64_t> outstanding_rows_{0};
  std::atomic<uint64_t> last_pick_{0};
};

// ---- Dispatcher ----------------------------------------------------------------------------

namespace {

constexpr char kBadAnswers[] = "expertmesh_dispatch_bad_answers_total";
constexpr char kBadAnswersHelp[] =
    "Replica answers rejected (wrong sizes, non-finite outputs) and failed over";

// Whether every BF16 value of `bf16` (little-endian pairs) is finite: an exponent of all ones
// is Inf or NaN. A branch-free pass over the bytes (vectorized by the compiler), cheap beside
// the unpacking that follows.
bool AllFiniteBf16(std::string_view bf16) {
  const auto* p = reinterpret_cast<const unsigned char*>(bf16.data());
  const size_t n = bf16.size() / 2;
  unsigned bad = 0;
  for (size_t i = 0; i < n; ++i) {
    const unsigned v = static_cast<unsigned>(p[2 * i]) | (static_cast<unsigned>(p[2 * i + 1]) << 8);
    bad |= static_cast<unsigned>((v & 0x7F80u) == 0x7F80u);
  }
  return bad == 0;
}

}  // namespace

// The metric handles of one shard group, looked up in the registry once per placement map.
struct Dispatcher::ShardMetrics {
  Counter* bytes_sent = nullptr;
  Counter* bytes_received = nullptr;
  Counter* failovers = nullptr;
  Counter* bad_size = nullptr;        // answers of the wrong row count or byte size
  Counter* bad_non_finite = nullptr;  // answers holding NaN or Inf
};

struct Dispatcher::Table {
  uint64_t version = 0;
  Placement placement;
  std::vector<std::vector<std::shared_ptr<ReplicaStream>>> replicas;  // [S], map order
  std::vector<ShardMetrics> shard_metrics;                            // [S] with a registry
  const ShardMetrics* metrics(int32_t shard) const {
    return shard_metrics.empty() ? nullptr : &shard_metrics[static_cast<size_t>(shard)];
  }
};

// One request of a step: a shard group's part (or, in exact mode, a slice of its rows).
struct Dispatcher::Group {
  int32_t shard = 0;
  std::vector<int32_t> rows;               // rows of the batch routed here, ascending
  std::vector<int32_t> pairs;              // exact mode: the batch's pair index of each pair
  v1::ExpertRequest request;               // built once, resent on failover
  std::set<const ReplicaStream*> tried;    // replicas that failed this step
  std::shared_ptr<ReplicaStream> replica;  // the current attempt's replica
  // Data plane: the current attempt's connection (the answer is read from it), else null.
  std::unique_ptr<dataplane::FrameConnection> conn;
  // The connection came from the pool, and whether this group already resent once on a fresh
  // connection after a pooled one turned out closed (see ReadDataPlane).
  bool conn_reused = false;
  bool resent_fresh = false;
  uint64_t request_id = 0;
  absl::Time attempt_deadline;
  bool done = false;
  std::vector<std::string> errors;  // why each replica failed, for the final message
  std::string answer;               // BF16 [rows.size(), H] (exact: [pairs.size(), H]) once done
};

// What MicroBatch(i) hands out: Run under micro-batch i's step table.
class Dispatcher::MicroBatchView final : public RoutedExperts {
 public:
  MicroBatchView(Dispatcher* d, int micro_batch) : d_(d), micro_batch_(micro_batch) {}
  absl::Status Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                   std::span<float> out) override {
    return d_->RunStep(micro_batch_, layer, x, routes, out);
  }

 private:
  Dispatcher* const d_;
  const int micro_batch_;
};

absl::StatusOr<CombineMode> ParseCombineMode(std::string_view name) {
  if (name == "exact") return CombineMode::kExact;
  if (name == "partial") return CombineMode::kPartial;
  return absl::InvalidArgumentError(
      absl::StrCat("combine mode \"", std::string(name), "\": expected exact or partial"));
}

const char* CombineModeName(CombineMode mode) {
  return mode == CombineMode::kExact ? "exact" : "partial";
}

Dispatcher::Dispatcher(const ModelConfig& config, DispatcherOptions options)
    : hidden_size_(config.hidden_size),
      n_layers_(static_cast<int32_t>(config.num_hidden_layers + config.num_nextn_predict_layers)),
      n_routed_experts_(static_cast<int32_t>(config.n_routed_experts)),
      options_(std::move(options)),
      first_moe_layer_([&config, n = n_layers_] {
        for (int32_t l = 0; l < n; ++l) {
          if (config.IsMoeLayer(l)) return l;
        }
        return int32_t{-1};
      }()),
      expert_tokens_(static_cast<size_t>(n_layers_) * n_routed_experts_),
      unreported_load_(static_cast<size_t>(n_layers_) * n_routed_experts_) {
  use_data_plane_ = options_.data_plane && !ProcessTls().enabled();
  if (options_.data_plane && !use_data_plane_) {
    spdlog::info(
        "dispatcher: mTLS is on: expert requests go on the gRPC streams (the framed TCP "
        "data plane is plaintext)");
  }
  if (options_.metrics != nullptr) {
    // One latency series per MoE layer (dense layers are never dispatched), looked up once.
    layer_latency_.resize(static_cast<size_t>(n_layers_), nullptr);
    for (int32_t l = 0; l < n_layers_; ++l) {
      if (!config.IsMoeLayer(l)) continue;
      layer_latency_[static_cast<size_t>(l)] = &options_.metrics->GetHistogram(
          "expertmesh_dispatch_latency_seconds", "Time of one MoE layer's dispatch and combine",
          LatencyBucketsSeconds(), {{"layer", std::to_string(l)}});
    }
  }
}

absl::StatusOr<std::unique_ptr<Dispatcher>> Dispatcher::Create(const ModelConfig& config,
                                                               DispatcherOptions options) {
  if (config.hidden_size <= 0 || config.n_routed_experts <= 0) {
    return absl::InvalidArgumentError("dispatcher: config without routed experts");
  }
  if (options.attempt_timeout <= absl::ZeroDuration() ||
      options.step_deadline <= absl::ZeroDuration() || options.max_in_flight_per_replica < 1 ||
      options.max_data_connections_per_replica < 1) {
    return absl::InvalidArgumentError("dispatcher: timeouts and queue bound must be positive");
  }
  // Exact mode: one row's pairs must fit one answer, and an answer one message.
  const uint64_t row_answer = OutputBytes(std::max<int64_t>(1, config.num_experts_per_tok),
                                          static_cast<uint64_t>(config.hidden_size));
  if (options.combine == CombineMode::kExact &&
      (options.max_answer_bytes < row_answer ||
       options.max_answer_bytes >= static_cast<uint64_t>(options.max_message_bytes))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dispatcher: max_answer_bytes ", options.max_answer_bytes, " must be at least one row's ",
        row_answer, " and below max_message_bytes ", options.max_message_bytes));
  }
  return std::unique_ptr<Dispatcher>(new Dispatcher(config, std::move(options)));
}

Dispatcher::~Dispatcher() {
  {
    std::lock_guard<std::mutex> lock(watch_mu_);
    stopping_ = true;
    if (watch_ctx_) watch_ctx_->TryCancel();
  }
  watch_cv_.notify_all();
  if (watcher_.joinable()) watcher_.join();
  if (reporter_.joinable()) reporter_.join();
  std::map<std::string, std::shared_ptr<ReplicaStream>> streams;
  {
    std::lock_guard<std::mutex> lock(mu_);
    streams.swap(streams_);
    table_.reset();
  }
  for (auto& [key, s] : streams) s->Close();
}

std::vector<Dispatcher::ReplicaState> Dispatcher::Replicas() const {
  std::shared_ptr<const Table> table;
  {
    std::lock_guard<std::mutex> lock(mu_);
    table = table_;
  }
  std::vector<ReplicaState> out;
  if (!table) return out;
  for (size_t s = 0; s < table->replicas.size(); ++s) {
    for (const auto& r : table->replicas[s]) {
      out.push_back(ReplicaState{static_cast<int32_t>(s), r->replica_id(), r->address(),
                                 r->healthy(), r->outstanding_rows()});
    }
  }
  return out;
}

uint64_t Dispatcher::placement_version() const {
  std::lock_guard<std::mutex> lock(mu_);
  return table_ ? table_->version : 0;
}

bool Dispatcher::Covered() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!table_) return false;
  return std::all_of(table_->replicas.begin(), table_->replicas.end(),
                     [](const auto& r) { return !r.empty(); });
}

absl::Status Dispatcher::WaitCovered(absl::Duration timeout, uint64_t min_version) {
  std::unique_lock<std::mutex> lock(mu_);
  const auto ready = [&] {
    return table_ && table_->version >= min_version &&
           std::all_of(table_->replicas.begin(), table_->replicas.end(),
                       [](const auto& r) { return !r.empty(); });
  };
  if (!table_changed_.wait_for(lock, absl::ToChronoMilliseconds(timeout), ready)) {
    return absl::DeadlineExceededError(
        absl::StrCat("dispatcher: placement v", table_ ? table_->version : 0,
                     " does not cover every shard group within ", absl::FormatDuration(timeout)));
  }
  return absl::OkStatus();
}

absl::Status Dispatcher::ApplyPlacement(const v1::PlacementMap& map, bool any_version) {
  absl::StatusOr<Placement> placement = PlacementFromMap(map);
  if (!placement.ok()) return placement.status();
  if (placement->n_layers != n_layers_ || placement->n_routed_experts != n_routed_experts_) {
    return absl::FailedPreconditionError(
        absl::StrCat("dispatcher: placement map of ", placement->n_layers, " layers x ",
                     placement->n_routed_experts, " experts; this model has ", n_layers_, " x ",
                     n_routed_experts_));
  }
  std::vector<std::shared_ptr<ReplicaStream>> removed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (table_ && !any_version && map.version() <= table_->version) {
      return absl::OkStatus();  // stale
    }
    auto table = std::make_shared<Table>();
    table->version = map.version();
    table->replicas.resize(placement->num_shards);
    if (MetricsRegistry* m = options_.metrics) {
      for (int32_t shard = 0; shard < placement->num_shards; ++shard) {
        const MetricLabels labels = {{"shard", std::to_string(shard)}};
        table->shard_metrics.push_back(ShardMetrics{
            &m->GetCounter("expertmesh_dispatch_bytes_sent_total", "Request bytes sent per shard",
                           labels),
            &m->GetCounter("expertmesh_dispatch_bytes_received_total",
                           "Response bytes received per shard", labels),
            &m->GetCounter("expertmesh_dispatch_replica_failovers_total",
                           "Requests resent to another replica of the same shard", labels),
            &m->GetCounter(kBadAnswers, kBadAnswersHelp,
                           {{"shard", std::to_string(shard)}, {"reason", "size"}}),
            &m->GetCounter(kBadAnswers, kBadAnswersHelp,
                           {{"shard", std::to_string(shard)}, {"reason", "non_finite"}})});
      }
    }
    table->placement = *std::move(placement);
    std::map<std::string, std::shared_ptr<ReplicaStream>> streams;
    for (const v1::ShardGroup& g : map.shards()) {
      for (const v1::ShardReplica& r : g.replicas()) {
        const std::string data = use_data_plane_ ? r.data_address() : std::string();
        const std::string key = absl::StrCat(r.replica_id(), "@", r.address(), "#", data);
        auto it = streams_.find(key);
        std::shared_ptr<ReplicaStream> s =
            it != streams_.end() ? it->second
                                 : std::make_shared<ReplicaStream>(r.replica_id(), r.address(),
                                                                   data, g.shard_id(), options_);
        if (it != streams_.end()) s->Forgive();  // see Forgive()
        streams[key] = s;
        table->replicas[g.shard_id()].push_back(std::move(s));
      }
    }
    for (auto& [key, s] : streams_) {
      if (!streams.contains(key)) removed.push_back(s);
    }
    streams_.swap(streams);
    table_ = std::move(table);
    spdlog::info("dispatcher: placement v{} ({} shard groups)", table_->version,
                 table_->replicas.size());
  }
  table_changed_.notify_all();
  for (auto& s : removed) s->Close();  // its pending requests fail over
  return absl::OkStatus();
}

void Dispatcher::WatchRouter(const std::string& router_address) {
  router_address_ = router_address;
  watcher_ = std::thread([this, router_address] { WatchLoop(router_address); });
  if (options_.load_report_interval > absl::ZeroDuration()) {
    reporter_ = std::thread([this] { ReportLoop(); });
  }
}

absl::Status Dispatcher::ReportLoad() {
  if (router_address_.empty()) return absl::FailedPreconditionError("no router to report to");
  v1::LoadReport report;
  report.set_reporter(options_.identity.instance_id());
  for (int32_t l = 0; l < n_layers_; ++l) {
    for (int32_t e = 0; e < n_routed_experts_; ++e) {
      const uint64_t tokens =
          unreported_load_[static_cast<size_t>(l) * n_routed_experts_ + e].exchange(0);
      if (tokens == 0) continue;
      v1::LayerExpertLoad* load = report.add_loads();
      load->set_layer(l);
      load->set_expert(e);
      load->set_tokens(tokens);
    }
  }
  if (report.loads_size() == 0) return absl::OkStatus();
  auto stub = v1::RouterService::NewStub(MakeChannel(router_address_));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   absl::ToChronoMilliseconds(options_.connect_timeout));
  v1::LoadReportResponse resp;
  const grpc::Status s = stub->ReportLoad(&ctx, report, &resp);
  if (!s.ok()) {  // keep the counts for the next report
    for (const v1::LayerExpertLoad& l : report.loads()) {
      unreported_load_[static_cast<size_t>(l.layer()) * n_routed_experts_ + l.expert()] +=
          l.tokens();
    }
    return FromGrpcStatus(s);
  }
  return absl::OkStatus();
}

void Dispatcher::ReportLoop() {
  std::unique_lock<std::mutex> lock(watch_mu_);
  while (!watch_cv_.wait_for(lock, absl::ToChronoMilliseconds(options_.load_report_interval),
                             [this] { return stopping_; })) {
    lock.unlock();
    if (absl::Status s = ReportLoad(); !s.ok()) {
      spdlog::warn("dispatcher: load report: {}", std::string(s.message()));
    }
    lock.lock();
  }
}

void Dispatcher::WatchLoop(std::string router_address) {
  auto channel = MakeChannel(router_address, options_.max_message_bytes);
  auto stub = v1::RouterService::NewStub(channel);
  // Reconnection backoff while the router is unreachable (not started yet, restarting):
  // 200 ms doubling up to 2 s, back to 200 ms once a map arrives.
  constexpr absl::Duration kMinBackoff = absl::Milliseconds(200);
  constexpr absl::Duration kMaxBackoff = absl::Seconds(2);
  absl::Duration backoff = kMinBackoff;
  while (true) {
    grpc::ClientContext ctx;  // long-lived watch: no deadline; cancelled on stop
    {
      std::lock_guard<std::mutex> lock(watch_mu_);
      if (stopping_) return;
      watch_ctx_ = &ctx;
    }
    v1::WatchPlacementRequest req;
    *req.mutable_identity() = options_.identity;
    req.set_known_version(0);  // always send the current map: the router may have restarted
    auto reader = stub->WatchPlacement(&ctx, req);
    v1::PlacementMap map;
    bool first = true;
    while (reader->Read(&map)) {
      backoff = kMinBackoff;
      if (absl::Status s = ApplyPlacement(map, /*any_version=*/std::exchange(first, false));
          !s.ok()) {
        spdlog::error("dispatcher: placement v{} refused: {}", map.version(),
                      std::string(s.message()));
      }
    }
    const grpc::Status status = reader->Finish();
    std::unique_lock<std::mutex> lock(watch_mu_);
    watch_ctx_ = nullptr;
    if (stopping_) return;
    spdlog::warn("dispatcher: placement watch on {} ended ({}); reconnecting in {}", router_address,
                 status.error_message(), absl::FormatDuration(backoff));
    watch_cv_.wait_for(lock, absl::ToChronoMilliseconds(backoff), [this] { return stopping_; });
    backoff = std::min(2 * backoff, kMaxBackoff);
  }
}

Counter* Dispatcher::ExpertTokens(int layer, int expert) {
  std::atomic<Counter*>& slot =
      expert_tokens_[static_cast<size_t>(layer) * n_routed_experts_ + expert];
  Counter* c = slot.load(std::memory_order_acquire);
  if (!c) {
    c = &options_.metrics->GetCounter(
        "expertmesh_dispatch_expert_tokens_total", "Tokens (rows) sent to each routed expert",
        {{"layer", std::to_string(layer)}, {"expert", std::to_string(expert)}});
    slot.store(c, std::memory_order_release);
  }
  return c;
}

namespace {

bool Retryable(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return false;  // the request itself is wrong: every replica would say so
    default:
      return true;
  }
}

}  // namespace

// One Run(): the batch split by shard group, each group sent to a replica, answers awaited
// with failover, then combined. Phases: Partition -> Launch -> Await -> Combine.
class Dispatcher::StepRun {
 public:
  StepRun(Dispatcher& d, int micro_batch, int layer, const QuantizedActivations& x,
          const ExpertRoutes& routes, std::shared_ptr<const Table> table, absl::Time start)
      : d_(d),
        micro_batch_(micro_batch),
        layer_(layer),
        x_(x),
        routes_(routes),
        table_(std::move(table)),
        H_(d.hidden_size_),
        step_deadline_(start + d.options_.step_deadline),
        waiter_(std::make_shared<StepWaiter>()) {}

  // Rows -> shard groups, each with its own CSR of (expert, weight) pairs, packed as requests.
  absl::Status Partition();
  // Sends every non-empty group to its best replica.
  absl::Status Launch();
  // Until every group answered: takes answers, fails over on errors and on timeouts.
  absl::Status Await();
  // partial: out[r] = sum over shards s (ascending) of answer_s[r]. exact: the per-pair
  // answers back in the batch's pair order, then CombinePerExpert.
  absl::Status Combine(std::span<float> out) const;

 private:
  // Sends group i to the best untried replica; false when none is left.
  bool Attempt(size_t i);
  absl::Status FailOver(size_t i, const std::string& why);
  void AbandonAll();
  // Checks one answer; OK when group i is done.
  absl::Status Accept(size_t i, StepWaiter::Slot& slot);
  // Groups whose attempt timed out move to another replica.
  absl::Status HandleTimeouts();
  // Sends group i's request on a data-plane connection of replica r (the caller's thread);
  // *no_connection when it got no connection (see ReplicaStream::Lease), nothing was sent.
  absl::Status SendOnDataPlane(size_t i, const std::shared_ptr<ReplicaStream>& r,
                               bool* no_connection);
  // Sends group i's request on replica r's gRPC stream (opened if needed); false (the reason in
  // g.errors) when it cannot.
  bool SendOnStream(size_t i, const std::shared_ptr<ReplicaStream>& r);
  // Forgets group i's current attempt (its connection is closed, or its stream request dropped).
  void AbandonAttempt(Group& g);
  // Waits until `wake` for answers: on the stream waiter alone, or, with data-plane requests
  // out, by polling their connections (and the waiter's eventfd) on this thread.
  void WaitAnswers(absl::Time wake, std::vector<std::pair<size_t, StepWaiter::Slot>>* filled);
  // A data-plane connection of group i is readable: a whole answer frame into `filled`, or
  // nothing yet.
  void ReadDataPlane(size_t i, std::vector<std::pair<size_t, StepWaiter::Slot>>* filled);

  Dispatcher& d_;
  const int micro_batch_;
  const int layer_;
  const QuantizedActivations& x_;
  const ExpertRoutes& routes_;
  const std::shared_ptr<const Table> table_;
  const int64_t H_;
  const absl::Time step_deadline_;
  std::shared_ptr<StepWaiter> waiter_;
  std::vector<Group> groups_;
  std::vector<size_t> active_;  // groups with rows
  std::string frame_;           // a request serialized for the data plane
  size_t remaining_ = 0;
  uint64_t next_token_ = 1;
};

absl::Status Dispatcher::StepRun::Partition() {
  const Placement& placement = table_->placement;
  const bool exact = d_.options_.combine == CombineMode::kExact;
  // Per shard group, in CSR form: the rows that route there and their pairs (batch indices).
  struct ShardPart {
    std::vector<int32_t> rows;
    std::vector<int32_t> row_end;  // [rows.size()]: end of each row's pairs in `pairs`
    std::vector<int32_t> pairs;
  };
  std::vector<ShardPart> parts(static_cast<size_t>(placement.num_shards));
  const size_t base = static_cast<size_t>(layer_) * d_.n_routed_experts_;
  // Rows keyed by a running count: experts with copies take turns over them (ChooseShards).
  const uint64_t row_key0 = d_.rows_dispatched_.fetch_add(static_cast<uint64_t>(x_.n_rows));
  std::vector<int32_t> chosen;
  for (int32_t r = 0; r < x_.n_rows; ++r) {
    const int32_t p0 = routes_.offsets[r];
    const int32_t p1 = routes_.offsets[r + 1];
    chosen.assign(static_cast<size_t>(p1 - p0), -1);
    ChooseShards(
        placement, layer_,
        std::span<const int32_t>(routes_.experts.data() + p0, static_cast<size_t>(p1 - p0)),
        row_key0 + static_cast<uint64_t>(r), chosen);
    for (int32_t p = p0; p < p1; ++p) {
      const int32_t e = routes_.experts[p];
      const int32_t s = chosen[static_cast<size_t>(p - p0)];
      if (s < 0 || s >= placement.num_shards) {
        return absl::FailedPreconditionError(
            absl::StrCat("dispatcher: placement v", table_->version, " has no shard for layer ",
                         layer_, " expert ", e));
      }
      ShardPart& part = parts[static_cast<size_t>(s)];
      if (part.rows.empty() || part.rows.back() != r) {
        part.rows.push_back(r);
        part.row_end.push_back(static_cast<int32_t>(part.pairs.size()));
      }
      part.pairs.push_back(p);
      ++part.row_end.back();
      d_.unreported_load_[base + e].fetch_add(1, std::memory_order_relaxed);
      if (d_.options_.metrics) d_.ExpertTokens(layer_, e)->Inc();
    }
  }
  // One request per shard group; in exact mode as many as keep each answer (pairs x H BF16)
  // within max_answer_bytes. Groups are in ascending shard order (the partial combine's order).
  const uint64_t max_pairs =
      exact ? std::max<uint64_t>(1, d_.options_.max_answer_bytes / OutputBytes(1, H_)) : 0;
  const uint64_t batch_id = d_.next_batch_id_.fetch_add(1);
  for (int32_t s = 0; s < placement.num_shards; ++s) {
    const ShardPart& part = parts[static_cast<size_t>(s)];
    size_t i = 0;
    while (i < part.rows.size()) {
      Group& g = groups_.emplace_back();
      g.shard = s;
      g.request.add_row_offsets(0);
      const int32_t first_pair = i == 0 ? 0 : part.row_end[i - 1];
      for (; i < part.rows.size(); ++i) {
        const int32_t begin = i == 0 ? 0 : part.row_end[i - 1];
        const int32_t end = part.row_end[i];
        if (exact && !g.rows.empty() && static_cast<uint64_t>(end - first_pair) > max_pairs) {
          break;  // the next request takes this row
        }
        g.rows.push_back(part.rows[i]);
        for (int32_t k = begin; k < end; ++k) {
          const int32_t p = part.pairs[static_cast<size_t>(k)];
          g.request.add_experts(routes_.experts[p]);
          g.request.add_weights(routes_.weights[p]);
          if (exact) g.pairs.push_back(p);
        }
        g.request.add_row_offsets(static_cast<uint32_t>(g.request.experts_size()));
      }
      g.request.set_batch_id(batch_id);
      g.request.set_layer(layer_);
      g.request.set_micro_batch(micro_batch_);
      g.request.set_n_rows(static_cast<uint32_t>(g.rows.size()));
      g.request.set_hidden_size(static_cast<uint32_t>(H_));
      g.request.set_combine(exact ? v1::COMBINE_PER_EXPERT : v1::COMBINE_PARTIAL_SUM);
      PackActivationRows(x_, g.rows, g.request.mutable_activations(), g.request.mutable_scales());
    }
  }
  waiter_->slots.resize(groups_.size());
  for (size_t i = 0; i < groups_.size(); ++i) active_.push_back(i);
  remaining_ = active_.size();
  return absl::OkStatus();
}

bool Dispatcher::StepRun::Attempt(size_t i) {
  Group& g = groups_[i];
  std::vector<std::shared_ptr<ReplicaStream>> candidates;
  for (const auto& r : table_->replicas[g.shard]) {
    if (!g.tried.contains(r.get())) candidates.push_back(r);
  }
  // Failed streams last, then the least outstanding work, then the one chosen longest ago:
  // with one step in flight every replica has 0 rows outstanding when the next is chosen, and
  // without the last tie-break the first replica of the map would get all the work. A stream
  // never opened yet (a replica added by scaling out) ranks with the open ones, so it gets
  // work on its first turn instead of only on failover.
  std::stable_sort(candidates.begin(), candidates.end(), [](const auto& a, const auto& b) {
    if (a->failed() != b->failed()) return b->failed();
    if (a->outstanding_rows() != b->outstanding_rows()) {
      return a->outstanding_rows() < b->outstanding_rows();
    }
    return a->last_pick() < b->last_pick();
  });
  std::vector<std::shared_ptr<ReplicaStream>> no_connection;  // data planes that gave none
  for (const auto& r : candidates) {
    g.tried.insert(r.get());
    if (r->data_plane()) {
      bool none = false;
      if (absl::Status s = SendOnDataPlane(i, r, &none); !s.ok()) {
        g.errors.push_back(absl::StrCat(r->replica_id(), ": ", s.message()));
        if (none) no_connection.push_back(r);
        continue;
      }
      return true;
    }
    if (SendOnStream(i, r)) return true;
  }
  // gRPC is the fallback data plane: when no data plane of the shard gave a connection (every
  // one at max_data_connections_per_replica from this dispatcher, as with overlapping
  // micro-batches or a group split into many requests; or refusing connections over the
  // replica's own bound; or down), the request goes on one of those replicas' Compute streams
  // rather than failing the step. A replica that is down fails there too.
  for (const auto& r : no_connection) {
    if (SendOnStream(i, r)) return true;
  }
  g.replica.reset();
  return false;
}

bool Dispatcher::StepRun::SendOnStream(size_t i, const std::shared_ptr<ReplicaStream>& r) {
  Group& g = groups_[i];
  if (absl::Status s = r->EnsureOpen(step_deadline_); !s.ok()) {
    g.errors.push_back(absl::StrCat(r->replica_id(), ": ", s.message()));
    return false;
  }
  const uint64_t token = next_token_++;
  {
    std::lock_guard<std::mutex> lock(waiter_->mu);
    waiter_->slots[i] = StepWaiter::Slot{token};
  }
  absl::StatusOr<uint64_t> id =
      r->Send(g.request, Pending{waiter_, i, token, static_cast<int64_t>(g.rows.size())});
  if (!id.ok()) {
    g.errors.push_back(absl::StrCat(r->replica_id(), ": ", id.status().message()));
    return false;
  }
  r->MarkPicked(d_.pick_clock_.fetch_add(1) + 1);
  g.replica = r;
  g.request_id = *id;
  g.attempt_deadline = std::min(absl::Now() + d_.options_.attempt_timeout, step_deadline_);
  if (const ShardMetrics* m = table_->metrics(g.shard)) {
    m->bytes_sent->Inc(static_cast<double>(g.request.ByteSizeLong()));
  }
  return true;
}

absl::Status Dispatcher::StepRun::SendOnDataPlane(size_t i, const std::shared_ptr<ReplicaStream>& r,
                                                  bool* no_connection) {
  Group& g = groups_[i];
  {
    std::lock_guard<std::mutex> lock(waiter_->mu);
    waiter_->slots[i] = StepWaiter::Slot{};  // token 0: no stream answer is taken for it
  }
  const uint64_t id = r->NextRequestId();
  g.request.set_request_id(id);
  frame_.clear();
  if (!g.request.SerializeToString(&frame_)) {
    return absl::InternalError("request not serializable");
  }
  const absl::Time attempt_deadline =
      std::min(absl::Now() + d_.options_.attempt_timeout, step_deadline_);
  std::unique_ptr<dataplane::FrameConnection> conn;
  bool reused = false;
  // A pooled connection the replica closed while it sat idle (its idle timeout, an eviction,
  // a restart) fails the write: once, the request goes on a fresh connection instead.
  for (bool fresh = g.resent_fresh;; fresh = true) {
    EM_ASSIGN_OR_RETURN(conn, r->Lease(step_deadline_, no_connection, fresh, &reused));
    const absl::Status s =
        conn->WriteFrame(dataplane::FrameType::kRequest, frame_, attempt_deadline);
    if (s.ok()) break;
    r->Drop(std::move(conn), 0);
    if (reused && !fresh) continue;
    r->Break(std::string(s.message()));
    return s;
  }
  const int64_t rows = static_cast<int64_t>(g.rows.size());
  r->AddOutstanding(rows);
  r->MarkPicked(d_.pick_clock_.fetch_add(1) + 1);
  g.replica = r;
  g.conn = std::move(conn);
  g.conn_reused = reused;
  g.request_id = id;
  g.attempt_deadline = attempt_deadline;
  if (const ShardMetrics* m = table_->metrics(g.shard)) {
    m->bytes_sent->Inc(static_cast<double>(frame_.size()));
  }
  return absl::OkStatus();
}

void Dispatcher::StepRun::AbandonAttempt(Group& g) {
  if (!g.replica) return;
  if (g.conn) {
    g.replica->Drop(std::move(g.conn), static_cast<int64_t>(g.rows.size()));
  } else {
    g.replica->Abandon(g.request_id);
  }
}

void Dispatcher::StepRun::ReadDataPlane(size_t i,
                                        std::vector<std::pair<size_t, StepWaiter::Slot>>* filled) {
  Group& g = groups_[i];
  dataplane::FrameConnection& c = *g.conn;
  absl::StatusOr<bool> got = c.ReadAvailable();
  if (got.ok() && !*got) return;  // more bytes to come
  if (!got.ok() && g.conn_reused && !g.resent_fresh && c.frame_bytes_in() == 0 &&
      absl::Now() < g.attempt_deadline) {
    // A pooled connection that ended before any byte of its answer: the replica had closed it
    // while it sat idle (or in the moment it was taken). Once per group, the request goes to
    // the same replica again on a fresh connection; not a failover, the replica is not failed.
    std::shared_ptr<ReplicaStream> r = g.replica;
    r->Drop(std::move(g.conn), static_cast<int64_t>(g.rows.size()));
    g.resent_fresh = true;
    bool none = false;
    const absl::Status again = SendOnDataPlane(i, r, &none);
    if (again.ok()) return;
    got = absl::UnavailableError(
        absl::StrCat(got.status().message(), "; again on a new connection: ", again.message()));
    g.replica = r;  // the slot below fails this attempt over
    StepWaiter::Slot slot;
    slot.filled = true;
    slot.status = got.status();
    filled->emplace_back(i, std::move(slot));
    return;
  }
  StepWaiter::Slot slot;
  slot.filled = true;
  if (!got.ok()) {
    slot.status = absl::UnavailableError(got.status().message());
  } else if (c.frame_type() == dataplane::FrameType::kError) {
    slot.status = dataplane::DecodeErrorPayload(c.payload());
  } else if (c.frame_type() != dataplane::FrameType::kResponse ||
             !slot.response.ParseFromArray(c.payload().data(),
                                           static_cast<int>(c.payload().size()))) {
    slot.status = absl::InternalError("data plane: the answer is not an ExpertResponse");
  } else if (slot.response.request_id() != g.request_id) {
    slot.status = absl::InternalError(absl::StrCat(
        "data plane: answer to request ", slot.response.request_id(), ", expected ", g.request_id));
  }
  if (!slot.status.ok()) {
    // The connection is finished (closed, refused, out of step): it goes, and the replica is
    // marked failed so that its idle connections go too and the next step reconnects.
    g.replica->Break(std::string(slot.status.message()));
  }
  filled->emplace_back(i, std::move(slot));
}

void Dispatcher::StepRun::WaitAnswers(absl::Time wake,
                                      std::vector<std::pair<size_t, StepWaiter::Slot>>* filled) {
  std::vector<pollfd> fds;
  std::vector<size_t> fd_group;
  bool stream_pending = false;
  for (size_t i : active_) {
    const Group& g = groups_[i];
    if (g.done) continue;
    if (g.conn) {
      fds.push_back(pollfd{g.conn->fd(), POLLIN, 0});
      fd_group.push_back(i);
    } else {
      stream_pending = true;
    }
  }
  const auto take_stream_answers = [&] {  // under waiter_->mu
    for (size_t i : active_) {
      if (!groups_[i].done && !groups_[i].conn && waiter_->slots[i].filled) {
        filled->emplace_back(i, std::move(waiter_->slots[i]));
        waiter_->slots[i] = StepWaiter::Slot{};  // token 0: nothing more accepted
      }
    }
  };
  if (fds.empty()) {
    std::unique_lock<std::mutex> lock(waiter_->mu);
    const auto any_filled = [&] {
      for (size_t i : active_) {
        if (!groups_[i].done && waiter_->slots[i].filled) return true;
      }
      return false;
    };
    waiter_->cv.wait_until(lock, absl::ToChronoTime(wake), any_filled);
    take_stream_answers();
    return;
  }
  absl::Duration left = std::max(wake - absl::Now(), absl::ZeroDuration());
  if (stream_pending) {
    std::lock_guard<std::mutex> lock(waiter_->mu);
    const int efd = waiter_->EventFd();
    for (size_t i : active_) {  // answers that came before the eventfd existed
      if (!groups_[i].done && !groups_[i].conn && waiter_->slots[i].filled) {
        left = absl::ZeroDuration();
      }
    }
    if (efd >= 0) fds.push_back(pollfd{efd, POLLIN, 0});
  }
  timespec ts = absl::ToTimespec(left);
  const int n = ::ppoll(fds.data(), fds.size(), &ts, nullptr);
  if (n < 0 && errno != EINTR) {
    spdlog::warn("dispatcher: poll: {}", std::strerror(errno));
    absl::SleepFor(absl::Milliseconds(1));
  }
  for (size_t k = 0; k < fd_group.size(); ++k) {
    if (n > 0 && fds[k].revents != 0) ReadDataPlane(fd_group[k], filled);
  }
  if (stream_pending) {
    std::lock_guard<std::mutex> lock(waiter_->mu);
    if (waiter_->efd >= 0) {
      uint64_t count = 0;
      [[maybe_unused]] ssize_t r = ::read(waiter_->efd, &count, sizeof count);
    }
    take_stream_answers();
  }
}

absl::Status Dispatcher::StepRun::FailOver(size_t i, const std::string& why) {
  Group& g = groups_[i];
  g.errors.push_back(absl::StrCat(g.replica ? g.replica->replica_id() : "?", ": ", why));
  d_.failovers_.fetch_add(1);
  if (const ShardMetrics* m = table_->metrics(g.shard)) m->failovers->Inc();
  if (Attempt(i)) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat("shard ", g.shard, ": no live replica left for layer ",
                                             layer_, " (", absl::StrJoin(g.errors, "; "), ")"));
}

void Dispatcher::StepRun::AbandonAll() {
  for (size_t i : active_) {
    if (!groups_[i].done) AbandonAttempt(groups_[i]);
  }
}

absl::Status Dispatcher::StepRun::Launch() {
  for (size_t i : active_) {
    if (Attempt(i)) continue;
    AbandonAll();
    const Group& g = groups_[i];
    return absl::UnavailableError(
        absl::StrCat("shard ", g.shard, ": no live replica for layer ", layer_,
                     g.errors.empty() ? std::string(" (none registered)")
                                      : absl::StrCat(" (", absl::StrJoin(g.errors, "; "), ")")));
  }
  return absl::OkStatus();
}

absl::Status Dispatcher::StepRun::Accept(size_t i, StepWaiter::Slot& slot) {
  Group& g = groups_[i];
  absl::Status s = slot.status;
  if (s.ok()) s = StatusFromCode(slot.response.error_code(), slot.response.error_message());
  if (!s.ok()) return s;
  // A replica that answers garbage must not reach the residual stream: the answer is refused,
  // counted, the replica's stream is cut (it goes last among the candidates until it is
  // reopened) and the group fails over.
  Counter* bad = nullptr;
  const ShardMetrics* m = table_->metrics(g.shard);
  // Exact mode: one BF16 row per pair, else one per row.
  const bool exact = d_.options_.combine == CombineMode::kExact;
  const uint64_t want_bytes = OutputBytes(exact ? g.pairs.size() : g.rows.size(), H_);
  if (slot.response.n_rows() != g.rows.size() || slot.response.outputs().size() != want_bytes) {
    s = absl::InternalError(absl::StrCat("answer of ", slot.response.n_rows(), " rows / ",
                                         slot.response.outputs().size(), " bytes for ",
                                         g.rows.size(), " rows (", want_bytes, " bytes)"));
    if (m) bad = m->bad_size;
  } else if (!AllFiniteBf16(slot.response.outputs())) {
    s = absl::InternalError("answer with non-finite (NaN or Inf) outputs");
    if (m) bad = m->bad_non_finite;
  }
  if (!s.ok()) {
    if (bad) bad->Inc();
    if (g.replica) g.replica->Break(absl::StrCat("bad answer: ", s.message()));
    return s;
  }
  g.done = true;
  g.answer = std::move(*slot.response.mutable_outputs());
  g.request.Clear();
  --remaining_;
  if (m) m->bytes_received->Inc(static_cast<double>(g.answer.size()));
  return absl::OkStatus();
}

absl::Status Dispatcher::StepRun::HandleTimeouts() {
  const absl::Time now = absl::Now();
  for (size_t i : active_) {
    Group& g = groups_[i];
    if (g.done || now < g.attempt_deadline) continue;
    if (now >= step_deadline_) {
      AbandonAll();
      return absl::DeadlineExceededError(absl::StrCat(
          "shard ", g.shard, ": no answer for layer ", layer_, " within the step deadline of ",
          absl::FormatDuration(d_.options_.step_deadline)));
    }
    AbandonAttempt(g);
    // A replica that does not answer in time is treated as failed: its stream is cut so
    // every request waiting on it moves elsewhere now rather than at its own timeout.
    g.replica->Break("no answer within the attempt timeout");
    if (absl::Status f = FailOver(i, "no answer within the attempt timeout"); !f.ok()) {
      AbandonAll();
      return f;
    }
  }
  return absl::OkStatus();
}

absl::Status Dispatcher::StepRun::Await() {
  while (remaining_ > 0) {
    absl::Time wake = step_deadline_;
    for (size_t i : active_) {
      if (!groups_[i].done) wake = std::min(wake, groups_[i].attempt_deadline);
    }
    std::vector<std::pair<size_t, StepWaiter::Slot>> filled;
    WaitAnswers(wake, &filled);
    for (auto& [i, slot] : filled) {
      const absl::Status s = Accept(i, slot);
      Group& g = groups_[i];
      if (g.conn) {  // a data-plane answer: its connection is kept only after a good one
        const int64_t rows = static_cast<int64_t>(g.rows.size());
        if (s.ok()) {
          g.replica->Return(std::move(g.conn), rows);
        } else {
          g.replica->Drop(std::move(g.conn), rows);
        }
      }
      if (s.ok()) continue;
      if (!Retryable(s.code())) {
        AbandonAll();
        return absl::Status(s.code(), absl::StrCat("shard ", g.shard, " (", g.replica->replica_id(),
                                                   "): ", s.message()));
      }
      if (absl::Status f = FailOver(i, std::string(s.message())); !f.ok()) {
        AbandonAll();
        return f;
      }
    }
    EM_RETURN_IF_ERROR(HandleTimeouts());
  }
  return absl::OkStatus();
}

absl::Status Dispatcher::StepRun::Combine(std::span<float> out) const {
  if (d_.options_.combine == CombineMode::kExact) {
    // Every pair's BF16 output at its batch index (each pair is in exactly one group), then
    // per row in routes' order (ascending expert id): nothing here depends on the placement.
    std::vector<uint16_t> pair_out(routes_.experts.size() * static_cast<size_t>(H_));
    for (const Group& g : groups_) {
      EM_RETURN_IF_ERROR(ScatterPairOutputs(g.answer, g.pairs, H_, pair_out));
    }
    return CombinePerExpert(routes_, pair_out, H_, out);
  }
  std::fill(out.begin(), out.end(), 0.0f);
  for (const Group& g : groups_) {
    if (g.rows.empty()) continue;
    EM_RETURN_IF_ERROR(AccumulateOutputRows(g.answer, g.rows, H_, out));
  }
  return absl::OkStatus();
}

RoutedExperts* Dispatcher::MicroBatch(int micro_batch) {
  EM_CHECK(micro_batch >= 0 && micro_batch < kMaxMicroBatches, "micro-batch index out of range");
  std::lock_guard<std::mutex> lock(mu_);
  std::unique_ptr<MicroBatchView>& view = views_[micro_batch];
  if (!view) view = std::make_unique<MicroBatchView>(this, micro_batch);
  return view.get();
}

uint64_t Dispatcher::step_version(int micro_batch) const {
  EM_CHECK(micro_batch >= 0 && micro_batch < kMaxMicroBatches, "micro-batch index out of range");
  std::lock_guard<std::mutex> lock(mu_);
  const Lane& lane = lanes_[micro_batch];
  return lane.step_table ? lane.step_table->version : 0;
}

absl::Status Dispatcher::Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                             std::span<float> out) {
  return RunStep(0, layer, x, routes, out);
}

absl::Status Dispatcher::RunStep(int micro_batch, int layer, const QuantizedActivations& x,
                                 const ExpertRoutes& routes, std::span<float> out) {
  const absl::Time start = absl::Now();
  const int64_t R = x.n_rows;
  const int64_t H = hidden_size_;
  if (layer < 0 || layer >= n_layers_ || x.dim != H || routes.n_rows() != R ||
      static_cast<int64_t>(out.size()) != R * H || static_cast<int64_t>(x.fp8.size()) != R * H ||
      static_cast<int64_t>(x.scales.size()) != R * x.groups() ||
      routes.offsets.back() != static_cast<int32_t>(routes.experts.size()) ||
      routes.weights.size() != routes.experts.size()) {
    return absl::InvalidArgumentError(absl::StrCat("dispatcher: inconsistent batch of ", R,
                                                   " rows, dim ", x.dim, " (hidden_size ", H,
                                                   ") for layer ", layer));
  }
  std::shared_ptr<const Table> table;
  {
    // A step (one forward of one micro-batch) keeps the table it took at its first MoE layer:
    // a new placement takes effect at a step boundary. A layer not after the last one that
    // micro-batch dispatched also begins a step (callers that run single layers). Each
    // micro-batch has its own step, so overlapping steps never switch each other's table.
    std::lock_guard<std::mutex> lock(mu_);
    Lane& lane = lanes_[micro_batch];
    if (layer == first_moe_layer_ || layer <= lane.last_layer || !lane.step_table) {
      lane.step_table = table_;
    }
    lane.last_layer = layer;
    table = lane.step_table;
  }
  if (!table) return absl::UnavailableError("dispatcher: no placement map from the router yet");
  StepRun run(*this, micro_batch, layer, x, routes, std::move(table), start);
  EM_RETURN_IF_ERROR(run.Partition());
  EM_RETURN_IF_ERROR(run.Launch());
  EM_RETURN_IF_ERROR(run.Await());
  EM_RETURN_IF_ERROR(run.Combine(out));
  if (!layer_latency_.empty() && layer_latency_[static_cast<size_t>(layer)] != nullptr) {
    layer_latency_[static_cast<size_t>(layer)]->Observe(absl::ToDoubleSeconds(absl::Now() - start));
  }
  return absl::OkStatus();
}

}  // namespace expertmesh
