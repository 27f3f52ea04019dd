// expertmesh-bench-dispatch: what one MoE layer's expert round trip costs against what the
// same bytes cost on a raw TCP socket, in one run.
//
//  (a) raw TCP ping-pong on loopback: one connection per shard group to an echo thread that
//      reads exactly the bytes of that shard's serialized ExpertRequest and answers with the
//      bytes of its serialized ExpertResponse (sizes from the wire format: the requests are
//      built the way the dispatcher builds them, for the placement the router hands out);
//      every shard's request is written, then every answer read, as the dispatcher does.
//  (b) the real dispatch: router + `--shards` expert-service processes (tools/launcher, the
//      code `expertmesh up` and the cluster tests run) on loopback, two Dispatchers in this
//      process watching the router, Run() for one MoE layer, repeatedly: "stream" sends on the
//      shards' gRPC Compute streams (DispatcherOptions::data_plane off), "data" on their framed
//      TCP data plane (dataplane/frame.h; the default).
//  (a') gRPC ping-pong of the same bytes: one bidi stream per shard group to an echo server in
//      a child process (generic callback service answering each message with the shard's
//      response size), the client on the callback API driven as the dispatcher drives its
//      streams (writes from the caller, reads completed on gRPC threads, a condition variable).
//      What gRPC alone costs here, without the dispatcher's and the shard's own work.
//  (c) compute alone: LocalExperts::Run in this process on each shard group's part of the
//      batch, the slowest shard per round (what the shards do, in parallel, inside the round
//      trip; the raw ping-pong does none of it), and `together`: every shard's part on its
//      own thread at once, first start to last end (where the shards share this machine's
//      cores, what their computations cost inside one round trip). --shard-threads N gives every
//      shard (its
//      --threads) and this column N kernel threads; 0 = every CPU, so that shards on one
//      machine compete for its cores while the column measures one shard alone.
// (a), (a') and (b) alternate in blocks so drift on a shared machine hits all. Printed per
// batch: p50 / p99 of each, each dispatch's p50 / ping-pong p50, gRPC p50 / ping-pong p50, and
// (data-plane dispatch - shard compute) p50 / ping-pong p50: what the data plane costs beyond
// the bytes and the arithmetic.
// Cluster decode against in-process decode is expertmesh-bench-cluster.
// --combine exact|partial picks the data plane's combine mode (dispatcher/dispatcher.h).
//
// --bytes-only: no cluster and no weights (only --model's config.json, e.g. a reference
// DeepSeek-V3 config): per shard count and batch, the serialized bytes of every shard's
// ExpertRequest and ExpertResponse of one MoE layer (protobuf ByteSizeLong of messages built
// as the dispatcher and the expert service build them, random activations and routes), per
// token, in both combine modes.
//
//   expertmesh-bench-dispatch --model models/expertmesh-tiny --shards 2 --batches 1 32
//   expertmesh-bench-dispatch --bytes-only --model <dir with config.json> --shards 1 4 8
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "core/base/status.h"
#include "core/decode/sampling.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/format/wire.h"
#include "core/kernels/cpu/thread_pool.h"
#include "core/model/local_experts.h"
#include "core/numerics/quant.h"
#include "dispatcher/dispatcher.h"
#include "expertmesh/v1/expert.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "placement/placement.h"
#include "service-common/grpc_util.h"
#include "service-common/handshake.h"
#include "service-common/tls.h"
#include "spdlog/spdlog.h"
#include "tools/launcher/cluster.h"
#include "tools/launcher/tls_flags.h"

namespace expertmesh {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kSocketTimeoutMs = 5000;  // every raw read and write is bounded

double Micros(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())));
  return v[i];
}

// ---- (a) raw TCP -----------------------------------------------------------------------------

// Waits until fd is readable (or writable) within the socket timeout.
absl::Status WaitFd(int fd, short events) {
  pollfd p{fd, events, 0};
  const int n = ::poll(&p, 1, kSocketTimeoutMs);
  if (n == 1) return absl::OkStatus();
  if (n == 0) return absl::DeadlineExceededError("raw socket: no progress within 5 s");
  return absl::InternalError(absl::StrCat("poll: ", std::strerror(errno)));
}

absl::Status ReadExactly(int fd, char* buf, size_t n) {
  while (n > 0) {
    const ssize_t r = ::recv(fd, buf, n, 0);
    if (r > 0) {
      buf += r;
      n -= static_cast<size_t>(r);
    } else if (r == 0) {
      return absl::UnavailableError("raw socket: peer closed");
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      EM_RETURN_IF_ERROR(WaitFd(fd, POLLIN));
    } else if (errno != EINTR) {
      return absl::InternalError(absl::StrCat("recv: ", std::strerror(errno)));
    }
  }
  return absl::OkStatus();
}

absl::Status WriteAll(int fd, const char* buf, size_t n) {
  while (n > 0) {
    const ssize_t w = ::send(fd, buf, n, MSG_NOSIGNAL);
    if (w > 0) {
      buf += w;
      n -= static_cast<size_t>(w);
    } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      EM_RETURN_IF_ERROR(WaitFd(fd, POLLOUT));
    } else if (w < 0 && errno != EINTR) {
      return absl::InternalError(absl::StrCat("send: ", std::strerror(errno)));
    }
  }
  return absl::OkStatus();
}

void SetSocketOptions(int fd) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // as gRPC does
  timeval tv{kSocketTimeoutMs / 1000, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

// One echo peer per shard: a loopback listener and a thread that, per round, reads
// request_bytes and writes response_bytes.
class RawPeer {
 public:
  static absl::StatusOr<std::unique_ptr<RawPeer>> Start() {
    std::unique_ptr<RawPeer> p(new RawPeer());
    p->listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    if (p->listen_fd_ < 0) return absl::InternalError("socket failed");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (::bind(p->listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(p->listen_fd_, 1) != 0 ||
        ::getsockname(p->listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      return absl::InternalError(absl::StrCat("raw listener: ", std::strerror(errno)));
    }
    p->client_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    if (::connect(p->client_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      return absl::InternalError(absl::StrCat("raw connect: ", std::strerror(errno)));
    }
    EM_RETURN_IF_ERROR(WaitFd(p->listen_fd_, POLLIN));
    p->server_fd_ = ::accept(p->listen_fd_, nullptr, nullptr);
    if (p->server_fd_ < 0) return absl::InternalError("accept failed");
    SetSocketOptions(p->client_fd_);
    SetSocketOptions(p->server_fd_);
    return p;
  }
  ~RawPeer() {
    Stop();
    for (int fd : {client_fd_, server_fd_, listen_fd_}) {
      if (fd >= 0) ::close(fd);
    }
  }

  void SetSizes(size_t request_bytes, size_t response_bytes) {
    request_bytes_ = request_bytes;
    response_bytes_ = response_bytes;
  }
  // The echo thread serves `rounds` exchanges of the current sizes.
  void Serve(int rounds) {
    Stop();
    thread_ = std::thread([this, rounds] {
      std::vector<char> in(request_bytes_), out(response_bytes_, 'r');
      for (int i = 0; i < rounds; ++i) {
        if (!ReadExactly(server_fd_, in.data(), in.size()).ok() ||
            !WriteAll(server_fd_, out.data(), out.size()).ok()) {
          failed_ = true;
          return;
        }
      }
    });
  }
  void Stop() {
    if (thread_.joinable()) thread_.join();
  }
  int client_fd() const { return client_fd_; }
  size_t request_bytes() const { return request_bytes_; }
  size_t response_bytes() const { return response_bytes_; }
  bool failed() const { return failed_; }

 private:
  RawPeer() = default;
  int listen_fd_ = -1, client_fd_ = -1, server_fd_ = -1;
  size_t request_bytes_ = 0, response_bytes_ = 0;
  std::thread thread_;
  std::atomic<bool> failed_{false};
};

// `rounds` exchanges over every peer (all requests written, then all answers read); one sample
// (µs) per round appended to `samples`.
absl::Status RawRounds(std::span<const std::unique_ptr<RawPeer>> peers, int rounds,
                       std::vector<double>* samples) {
  for (auto& p : peers) p->Serve(rounds);
  size_t max_bytes = 0;
  for (auto& p : peers) max_bytes = std::max({max_bytes, p->request_bytes(), p->response_bytes()});
  std::vector<char> buf(max_bytes, 'q');
  for (int i = 0; i < rounds; ++i) {
    const auto t0 = Clock::now();
    for (auto& p : peers)
      EM_RETURN_IF_ERROR(WriteAll(p->client_fd(), buf.data(), p->request_bytes()));
    for (auto& p : peers)
      EM_RETURN_IF_ERROR(ReadExactly(p->client_fd(), buf.data(), p->response_bytes()));
    if (samples) samples->push_back(Micros(Clock::now() - t0));
  }
  for (auto& p : peers) {
    p->Stop();
    if (p->failed()) return absl::InternalError("raw echo thread failed");
  }
  return absl::OkStatus();
}

// ---- (a') gRPC ping-pong of the same bytes --------------------------------------------------

// A gRPC server whose generic bidi streams answer every message with a message of the size the
// method name carries ("/bench.Echo/<bytes>"). It runs in a child process (forked before this
// process touches gRPC), as a shard does, with the process's TLS setting.
class EchoService final : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    const std::string& m = ctx->method();
    return new Reactor(std::strtoull(m.c_str() + m.rfind('/') + 1, nullptr, 10));
  }
  class Reactor final : public grpc::ServerGenericBidiReactor {
   public:
    explicit Reactor(size_t bytes) {
      const std::string body(bytes, 'r');
      grpc::Slice slice(body);
      answer_ = grpc::ByteBuffer(&slice, 1);
      StartRead(&in_);
    }
    void OnReadDone(bool ok) override {
      if (!ok) return Finish(grpc::Status::OK);
      in_.Clear();
      StartWrite(&answer_);
    }
    void OnWriteDone(bool ok) override {
      if (!ok) return Finish(grpc::Status::OK);
      StartRead(&in_);
    }
    void OnDone() override { delete this; }

   private:
    grpc::ByteBuffer in_, answer_;
  };
};

// Forks the echo server; returns its port (0 on failure). The child serves until this
// process exits (its end of the pipe closes) and never returns.
int ForkEchoServer() {
  int to_parent[2], from_parent[2];
  if (::pipe(to_parent) != 0 || ::pipe(from_parent) != 0) return 0;
  const pid_t pid = ::fork();
  if (pid < 0) return 0;
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::close(to_parent[0]);
    ::close(from_parent[1]);
    EchoService service;
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", ProcessServerCredentials(), &port);
    builder.RegisterCallbackGenericService(&service);
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    if (!server) port = 0;
    (void)!::write(to_parent[1], &port, sizeof port);
    char c;
    while (::read(from_parent[0], &c, 1) < 0 && errno == EINTR) {
    }
    ::_exit(0);  // no orderly shutdown needed: the parent is gone
  }
  ::close(to_parent[1]);
  ::close(from_parent[0]);  // from_parent[1] stays open (unused) until this process exits
  int port = 0;
  if (::read(to_parent[0], &port, sizeof port) != sizeof port) port = 0;
  ::close(to_parent[0]);
  return port;
}

// One client stream per shard group to the echo server, on the callback API, driven as the
// dispatcher drives its streams: the caller starts every write, gRPC threads complete the
// reads and wake the caller through a condition variable. What gRPC costs for the same bytes,
// without the dispatcher's and the shard's own work.
class GrpcEcho {
 public:
  explicit GrpcEcho(int port)
      : stub_(std::make_unique<grpc::GenericStub>(MakeChannel(LoopbackAddress(port)))) {}
  ~GrpcEcho() { peers_.clear(); }

  // One stream per (request bytes, response bytes), all opened anew.
  void SetSizes(const std::vector<std::pair<size_t, size_t>>& sizes) {
    peers_.clear();  // each waits for its OnDone: no callback of an old stream runs after this
    {
      std::lock_guard<std::mutex> lock(mu_);
      failed_ = false;
    }
    for (const auto& [q, a] : sizes) {
      auto p = std::make_unique<Peer>(this, q);
      stub_->PrepareBidiStreamingCall(&p->ctx, absl::StrCat("/bench.Echo/", a), {}, p.get());
      p->AddHold();
      p->StartRead(&p->in);
      p->StartCall();
      peers_.push_back(std::move(p));
    }
  }

  // `rounds` exchanges over every stream; one sample (µs) per round appended to `samples`.
  absl::Status Rounds(int rounds, std::vector<double>* samples) {
    for (int i = 0; i < rounds; ++i) {
      const auto t0 = Clock::now();
      {
        std::lock_guard<std::mutex> lock(mu_);
        answered_ = 0;
        written_ = 0;
      }
      for (auto& p : peers_) p->StartWrite(&p->out);
      std::unique_lock<std::mutex> lock(mu_);
      const auto timeout = std::chrono::milliseconds(kSocketTimeoutMs);
      if (!cv_.wait_for(lock, timeout, [&] { return answered_ == peers_.size() || failed_; })) {
        return absl::DeadlineExceededError("gRPC echo: no answer within 5 s");
      }
      if (samples) samples->push_back(Micros(Clock::now() - t0));
      // The next write may start once this one completed (one write at a time per stream).
      if (!cv_.wait_for(lock, timeout, [&] { return written_ == peers_.size() || failed_; })) {
        return absl::DeadlineExceededError("gRPC echo: a write did not complete within 5 s");
      }
      if (failed_) return absl::InternalError("gRPC echo stream failed");
    }
    return absl::OkStatus();
  }

 private:
  struct Peer final : grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
    Peer(GrpcEcho* echo, size_t request_bytes) : echo(echo) {
      const std::string body(request_bytes, 'q');
      grpc::Slice slice(body);
      out = grpc::ByteBuffer(&slice, 1);
    }
    ~Peer() override {
      ctx.TryCancel();
      std::unique_lock<std::mutex> lock(mu);
      done_cv.wait(lock, [&] { return done; });
    }
    void Count(bool ok, size_t GrpcEcho::*counter) {
      {
        std::lock_guard<std::mutex> lock(echo->mu_);
        if (ok) {
          ++(echo->*counter);
        } else {
          echo->failed_ = true;
        }
      }
      echo->cv_.notify_all();
    }
    void OnReadDone(bool ok) override {
      Count(ok, &GrpcEcho::answered_);
      if (!ok) {
        RemoveHold();
        return;
      }
      in.Clear();
      StartRead(&in);
    }
    void OnWriteDone(bool ok) override { Count(ok, &GrpcEcho::written_); }
    void OnDone(const grpc::Status&) override {
      std::lock_guard<std::mutex> lock(mu);
      done = true;
      done_cv.notify_all();
    }
    GrpcEcho* const echo;
    grpc::ClientContext ctx;
    grpc::ByteBuffer in, out;
    std::mutex mu;
    std::condition_variable done_cv;
    bool done = false;
  };

  std::unique_ptr<grpc::GenericStub> stub_;
  std::vector<std::unique_ptr<Peer>> peers_;
  std::mutex mu_;
  std::condition_variable cv_;
  size_t answered_ = 0;
  size_t written_ = 0;
  bool failed_ = false;
};

// ---- the batch and its bytes ---------------------------------------------------------------

struct Batch {
  QuantizedActivations x;
  ExpertRoutes routes;
};

// B rows of random activations, each routed to top-k distinct random experts (ascending) with
// weights summing to 1.
Batch MakeBatch(const ModelConfig& config, int b, uint64_t seed) {
  Rng rng(seed);
  const int64_t H = config.hidden_size;
  std::vector<float> x(static_cast<size_t>(b * H));
  for (float& v : x) v = static_cast<float>(rng.Uniform() * 2.0 - 1.0);
  Batch batch{QuantizeActivations(x, b, H), {}};
  const int k = static_cast<int>(config.num_experts_per_tok);
  for (int r = 0; r < b; ++r) {
    std::vector<int32_t> experts;
    while (static_cast<int>(experts.size()) < k) {
      const int32_t e = static_cast<int32_t>(rng.Next() % config.n_routed_experts);
      if (std::find(experts.begin(), experts.end(), e) == experts.end()) experts.push_back(e);
    }
    std::sort(experts.begin(), experts.end());
    std::vector<float> weights(k, 1.0f / static_cast<float>(k));
    batch.routes.AddRow(experts, weights);
  }
  return batch;
}

// The serialized sizes of each shard's ExpertRequest and ExpertResponse for this batch, built
// field by field as the dispatcher builds them (ids of realistic width). Exact combine: the
// answer holds one BF16 row per (row, expert) pair; partial: one per row.
std::vector<std::pair<size_t, size_t>> WireSizes(const Batch& batch, const Placement& placement,
                                                 int layer, int64_t H, CombineMode combine) {
  std::vector<std::pair<size_t, size_t>> out;
  for (int32_t s = 0; s < placement.num_shards; ++s) {
    v1::ExpertRequest req;
    std::vector<int32_t> rows;
    req.add_row_offsets(0);
    for (int32_t r = 0; r < batch.x.n_rows; ++r) {
      for (int32_t p = batch.routes.offsets[r]; p < batch.routes.offsets[r + 1]; ++p) {
        if (placement.ShardOf(layer, batch.routes.experts[p]) != s) continue;
        if (rows.empty() || rows.back() != r) {
          rows.push_back(r);
          req.add_row_offsets(req.row_offsets(req.row_offsets_size() - 1));
        }
        req.add_experts(batch.routes.experts[p]);
        req.add_weights(batch.routes.weights[p]);
        req.set_row_offsets(req.row_offsets_size() - 1,
                            req.row_offsets(req.row_offsets_size() - 1) + 1);
      }
    }
    if (rows.empty()) continue;
    const bool exact = combine == CombineMode::kExact;
    req.set_batch_id(100000);
    req.set_layer(layer);
    req.set_n_rows(static_cast<uint32_t>(rows.size()));
    req.set_hidden_size(static_cast<uint32_t>(H));
    req.set_request_id(100000);
    req.set_combine(exact ? v1::COMBINE_PER_EXPERT : v1::COMBINE_PARTIAL_SUM);
    PackActivationRows(batch.x, rows, req.mutable_activations(), req.mutable_scales());
    v1::ExpertResponse resp;
    resp.set_batch_id(100000);
    resp.set_layer(layer);
    resp.set_request_id(100000);
    resp.set_n_rows(static_cast<uint32_t>(rows.size()));
    resp.mutable_outputs()->assign(
        OutputBytes(exact ? static_cast<uint64_t>(req.experts_size()) : rows.size(), H), '\0');
    out.emplace_back(req.ByteSizeLong(), resp.ByteSizeLong());
  }
  return out;
}

// --bytes-only: serialized bytes per token of one MoE layer, both modes, for each shard count.
int BytesOnly(const std::string& model_dir, const std::vector<int>& shard_counts,
              const std::vector<int>& batches) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(model_dir + "/config.json");
  if (!config.ok()) {
    spdlog::error("{}", config.status().ToString());
    return 1;
  }
  int layer = -1;
  for (int l = 0; l < config->num_hidden_layers && layer < 0; ++l) {
    if (config->IsMoeLayer(l)) layer = l;
  }
  if (layer < 0) {
    spdlog::error("the model has no MoE layer");
    return 1;
  }
  std::printf(
      "config %s: hidden %lld, top-%lld of %lld experts, MoE layer %d; serialized bytes per "
      "token of one MoE layer, all shard groups together (random routes, even placement)\n",
      model_dir.c_str(), static_cast<long long>(config->hidden_size),
      static_cast<long long>(config->num_experts_per_tok),
      static_cast<long long>(config->n_routed_experts), layer);
  std::printf("%-7s %-6s %-14s %-14s %-14s %-14s %s\n", "shards", "batch", "request/token",
              "partial resp", "exact resp", "partial total", "exact total (x partial)");
  for (int shards : shard_counts) {
    absl::StatusOr<Placement> placement = EvenPlacement(*config, shards);
    if (!placement.ok()) {
      spdlog::error("{}", placement.status().ToString());
      return 1;
    }
    for (int b : batches) {
      const Batch batch = MakeBatch(*config, b, 42 + static_cast<uint64_t>(b));
      size_t req = 0, resp_partial = 0, resp_exact = 0, req_exact = 0;
      for (const auto& [q, a] :
           WireSizes(batch, *placement, layer, config->hidden_size, CombineMode::kPartial)) {
        req += q;
        resp_partial += a;
      }
      for (const auto& [q, a] :
           WireSizes(batch, *placement, layer, config->hidden_size, CombineMode::kExact)) {
        req_exact += q;
        resp_exact += a;
      }
      const double t = static_cast<double>(b);
      std::printf(
          "%-7d %-6d %-14.0f %-14.0f %-14.0f %-14.0f %.0f (%.2fx)\n", shards, b,
          static_cast<double>(req) / t, static_cast<double>(resp_partial) / t,
          static_cast<double>(resp_exact) / t, static_cast<double>(req + resp_partial) / t,
          static_cast<double>(req_exact + resp_exact) / t,
          static_cast<double>(req_exact + resp_exact) / static_cast<double>(req + resp_partial));
    }
  }
  return 0;
}

// What each shard group computes of the batch: its rows with only its (expert, weight) pairs,
// through the same FP8 packing as the wire.
absl::StatusOr<std::vector<Batch>> ShardBatches(const Batch& batch, const Placement& placement,
                                                int layer, int64_t H) {
  std::vector<Batch> out;
  for (int32_t s = 0; s < placement.num_shards; ++s) {
    Batch part;
    std::vector<int32_t> rows;
    for (int32_t r = 0; r < batch.x.n_rows; ++r) {
      std::vector<int32_t> experts;
      std::vector<float> weights;
      for (int32_t p = batch.routes.offsets[r]; p < batch.routes.offsets[r + 1]; ++p) {
        if (placement.ShardOf(layer, batch.routes.experts[p]) != s) continue;
        experts.push_back(batch.routes.experts[p]);
        weights.push_back(batch.routes.weights[p]);
      }
      if (experts.empty()) continue;
      rows.push_back(r);
      part.routes.AddRow(experts, weights);
    }
    if (rows.empty()) continue;
    std::string act, scales;
    PackActivationRows(batch.x, rows, &act, &scales);
    EM_ASSIGN_OR_RETURN(part.x,
                        UnpackActivations(act, scales, static_cast<int64_t>(rows.size()), H));
    out.push_back(std::move(part));
  }
  return out;
}

// The router's current placement map (the first message of a watch).
absl::StatusOr<Placement> RouterPlacement(const std::string& router, const v1::PeerIdentity& id) {
  auto stub = v1::RouterService::NewStub(MakeChannel(router));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::WatchPlacementRequest req;
  *req.mutable_identity() = id;
  auto reader = stub->WatchPlacement(&ctx, req);
  v1::PlacementMap map;
  if (!reader->Read(&map)) return FromGrpcStatus(reader->Finish());
  ctx.TryCancel();
  (void)reader->Finish();
  return PlacementFromMap(map);
}

int Run(const std::string& model_dir, int shards, const std::vector<int>& batches, int iterations,
        int blocks, CombineMode combine, int shard_threads, int echo_port) {
  const auto fail = [](const absl::Status& s) {
    spdlog::error("{}", s.ToString());
    return 1;
  };
  absl::StatusOr<ModelConfig> config = LoadModelConfig(model_dir + "/config.json");
  if (!config.ok()) return fail(config.status());
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(model_dir);
  if (!ckpt.ok()) return fail(ckpt.status());
  absl::StatusOr<std::unique_ptr<LocalExperts>> local =
      LocalExperts::Create(**ckpt, *config, AllExperts(*config));
  if (!local.ok()) return fail(local.status());
  int layer = -1;
  for (int l = 0; l < config->num_hidden_layers; ++l) {
    if (config->IsMoeLayer(l)) {
      layer = l;
      break;
    }
  }
  if (layer < 0) return fail(absl::InvalidArgumentError("the model has no MoE layer"));
  absl::StatusOr<v1::PeerIdentity> identity =
      MakeLocalIdentity(model_dir, "attention-service", "bench-dispatch");
  if (!identity.ok()) return fail(identity.status());

  launcher::ClusterOptions o;
  o.tls = ProcessTls();  // --tls-*: every service on mTLS, our channels too
  o.model_dir = model_dir;
  o.shards = shards;
  o.replicas = 1;
  if (shard_threads > 0) {
    o.extra_expert_args = {"--threads", std::to_string(shard_threads)};
    cpu::SetKernelThreads(shard_threads);  // the compute column runs as one shard does
  }
  absl::StatusOr<std::unique_ptr<launcher::Cluster>> cluster = launcher::Cluster::Start(o);
  if (!cluster.ok()) return fail(cluster.status());
  absl::StatusOr<Placement> placement =
      RouterPlacement((*cluster)->router().grpc_address, *identity);
  if (!placement.ok()) return fail(placement.status());

  // Two dispatchers over the same shards: one on the gRPC Compute streams only, one on the
  // shards' framed TCP data plane (the default; under mTLS it stays on the streams too).
  std::unique_ptr<Dispatcher> dispatchers[2];
  for (int k = 0; k < 2; ++k) {
    DispatcherOptions d;
    d.identity = *identity;
    d.load_report_interval = absl::ZeroDuration();
    d.combine = combine;
    d.data_plane = k == 1;
    absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher = Dispatcher::Create(*config, d);
    if (!dispatcher.ok()) return fail(dispatcher.status());
    (*dispatcher)->WatchRouter((*cluster)->router().grpc_address);
    if (absl::Status s = (*dispatcher)->WaitCovered(absl::Seconds(30)); !s.ok()) return fail(s);
    dispatchers[k] = *std::move(dispatcher);
  }

  std::vector<std::unique_ptr<RawPeer>> peers;
  if (echo_port == 0) return fail(absl::InternalError("the gRPC echo server did not start"));
  GrpcEcho echo(echo_port);
  std::printf(
      "model %s: hidden %lld, MoE layer %d, top-%lld of %lld experts, %d shard groups, %s "
      "combine\n",
      model_dir.c_str(), static_cast<long long>(config->hidden_size), layer,
      static_cast<long long>(config->num_experts_per_tok),
      static_cast<long long>(config->n_routed_experts), shards, CombineModeName(combine));
  std::printf(
      "%d iterations per batch in %d alternating blocks; shard kernel threads %s; times in "
      "microseconds\n",
      iterations, blocks,
      shard_threads > 0 ? std::to_string(shard_threads).c_str() : "every CPU (the default)");
  std::printf("dispatch on the gRPC streams (stream) and on the framed TCP data plane (data)%s\n",
              ProcessTls().enabled() ? " -- mTLS: the data column runs on the streams too" : "");
  std::printf("%-6s %-22s %-12s %-12s %-14s %-14s %-8s %-9s %-11s %-9s %-9s %s\n", "batch",
              "bytes req/resp per shard", "raw p50/p99", "gRPC p50/p99", "stream p50/p99",
              "data p50/p99", "compute", "together", "stream/raw", "data/raw", "gRPC/raw",
              "(data-compute)/raw");
  for (int b : batches) {
    const Batch batch = MakeBatch(*config, b, 42 + static_cast<uint64_t>(b));
    const std::vector<std::pair<size_t, size_t>> sizes =
        WireSizes(batch, *placement, layer, config->hidden_size, combine);
    while (peers.size() < sizes.size()) {
      absl::StatusOr<std::unique_ptr<RawPeer>> p = RawPeer::Start();
      if (!p.ok()) return fail(p.status());
      peers.push_back(*std::move(p));
    }
    std::string bytes;
    for (size_t i = 0; i < sizes.size(); ++i) {
      peers[i]->SetSizes(sizes[i].first, sizes[i].second);
      absl::StrAppend(&bytes, i ? " " : "", sizes[i].first, "/", sizes[i].second);
    }
    const std::span<const std::unique_ptr<RawPeer>> subset(peers.data(), sizes.size());
    echo.SetSizes(sizes);

    std::vector<float> out(static_cast<size_t>(b * config->hidden_size));
    std::vector<double> raw, grpc_echo, stream, disp, compute;
    const int per_block = std::max(1, iterations / blocks);
    const auto dispatch_rounds = [&](Dispatcher& dispatcher, int n,
                                     std::vector<double>* samples) -> absl::Status {
      for (int i = 0; i < n; ++i) {
        const auto t0 = Clock::now();
        EM_RETURN_IF_ERROR(dispatcher.Run(layer, batch.x, batch.routes, out));
        if (samples) samples->push_back(Micros(Clock::now() - t0));
      }
      return absl::OkStatus();
    };
    absl::Status s = RawRounds(subset, per_block / 4 + 1, nullptr);  // warm-up
    if (s.ok()) s = echo.Rounds(per_block / 4 + 1, nullptr);
    if (s.ok()) s = dispatch_rounds(*dispatchers[0], per_block / 4 + 1, nullptr);
    if (s.ok()) s = dispatch_rounds(*dispatchers[1], per_block / 4 + 1, nullptr);
    for (int k = 0; s.ok() && k < blocks; ++k) {
      s = RawRounds(subset, per_block, &raw);
      if (s.ok()) s = echo.Rounds(per_block, &grpc_echo);
      if (s.ok()) s = dispatch_rounds(*dispatchers[0], per_block, &stream);
      if (s.ok()) s = dispatch_rounds(*dispatchers[1], per_block, &disp);
    }
    // The shards compute in parallel: per round the slowest shard's time alone, and the time
    // of every shard's part computed at once on its own thread (what the shards' processes do
    // on this machine's cores inside the round trip).
    absl::StatusOr<std::vector<Batch>> parts =
        ShardBatches(batch, *placement, layer, config->hidden_size);
    if (!parts.ok()) return fail(parts.status());
    std::vector<std::vector<float>> part_outs;
    for (const Batch& part : *parts) {
      part_outs.emplace_back(static_cast<size_t>(part.x.n_rows * config->hidden_size));
    }
    std::vector<double> together;
    for (int i = 0; s.ok() && i < per_block; ++i) {
      double slowest = 0;
      for (size_t k = 0; s.ok() && k < parts->size(); ++k) {
        const Batch& part = (*parts)[k];
        const auto t0 = Clock::now();
        s = (*local)->Run(layer, part.x, part.routes, part_outs[k]);
        slowest = std::max(slowest, Micros(Clock::now() - t0));
      }
      compute.push_back(slowest);
      if (!s.ok()) break;
      // Every part on its own thread, started together (a spin barrier), from the first start
      // to the last end.
      std::atomic<size_t> ready{0};
      std::vector<Clock::time_point> starts(parts->size()), ends(parts->size());
      std::vector<absl::Status> results(parts->size());
      std::vector<std::thread> threads;
      for (size_t k = 0; k < parts->size(); ++k) {
        threads.emplace_back([&, k] {
          ready.fetch_add(1);
          while (ready.load() < parts->size()) {
          }
          starts[k] = Clock::now();
          const Batch& part = (*parts)[k];
          results[k] = (*local)->Run(layer, part.x, part.routes, part_outs[k]);
          ends[k] = Clock::now();
        });
      }
      for (std::thread& t : threads) t.join();
      for (const absl::Status& r : results) {
        if (s.ok()) s = r;
      }
      together.push_back(Micros(*std::max_element(ends.begin(), ends.end()) -
                                *std::min_element(starts.begin(), starts.end())));
    }
    if (!s.ok()) return fail(s);
    const double raw50 = Percentile(raw, 0.5), disp50 = Percentile(disp, 0.5);
    const double stream50 = Percentile(stream, 0.5);
    const double grpc50 = Percentile(grpc_echo, 0.5), comp50 = Percentile(compute, 0.5);
    char c1[32], c2[32], c3[32], c3s[32], c4[32], c5[32];
    std::snprintf(c1, sizeof c1, "%.0f/%.0f", raw50, Percentile(raw, 0.99));
    std::snprintf(c2, sizeof c2, "%.0f/%.0f", grpc50, Percentile(grpc_echo, 0.99));
    std::snprintf(c3s, sizeof c3s, "%.0f/%.0f", stream50, Percentile(stream, 0.99));
    std::snprintf(c3, sizeof c3, "%.0f/%.0f", disp50, Percentile(disp, 0.99));
    std::snprintf(c4, sizeof c4, "%.0f", comp50);
    std::snprintf(c5, sizeof c5, "%.0f", Percentile(together, 0.5));
    std::printf("%-6d %-22s %-12s %-12s %-14s %-14s %-8s %-9s %-11.2f %-9.2f %-9.2f %.2f\n", b,
                bytes.c_str(), c1, c2, c3s, c3, c4, c5, stream50 / raw50, disp50 / raw50,
                grpc50 / raw50, (disp50 - comp50) / raw50);
    std::fflush(stdout);
  }
  for (auto& d : dispatchers) d.reset();
  return (*cluster)->Stop().ok() ? 0 : 1;
}

}  // namespace
}  // namespace expertmesh

int main(int argc, char** argv) {
  CLI::App app{
      "One MoE layer's dispatch through real expert shards against a raw TCP ping-pong of the "
      "same bytes, in one run"};
  std::string model;
  int shards = 2, iterations = 2000, blocks = 4, shard_threads = 0;
  std::vector<int> batches = {1, 32};
  std::vector<int> bytes_shards;
  std::string combine = "exact";
  bool bytes_only = false;
  app.add_option("--model", model, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--shards", bytes_shards,
                 "Shard groups (with --bytes-only: a list; else one value, default 2)")
      ->check(CLI::Range(1, 256));
  app.add_option("--combine", combine, "Combine mode of the dispatch: exact or partial")
      ->check(CLI::IsMember({"exact", "partial"}))
      ->capture_default_str();
  app.add_flag("--bytes-only", bytes_only,
               "Only the serialized bytes per token of both combine modes (needs only "
               "config.json; no cluster)");
  app.add_option("--batches", batches, "Batch sizes (rows)")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  app.add_option("--iterations", iterations, "Measured round trips per batch and kind")
      ->capture_default_str()
      ->check(CLI::Range(10, 1000000));
  app.add_option("--shard-threads", shard_threads,
                 "CPU kernel threads of each shard (its --threads) and of the compute column; 0 = "
                 "every CPU (the services' default; shards on one machine then share the cores)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  app.add_option("--blocks", blocks, "Alternating raw/dispatch blocks")
      ->capture_default_str()
      ->check(CLI::Range(1, 100));
  expertmesh::TlsFiles tls;
  expertmesh::AddTlsOptions(
      &app, tls, "of every service and this benchmark (SAN IP:127.0.0.1, server and client use)");
  CLI11_PARSE(app, argc, argv);
  if (bytes_only) {
    if (bytes_shards.empty()) bytes_shards = {1, 2, 4};
    return expertmesh::BytesOnly(model, bytes_shards, batches);
  }
  if (bytes_shards.size() > 1) {
    std::fprintf(stderr, "--shards takes one value without --bytes-only\n");
    return 2;
  }
  if (!bytes_shards.empty()) shards = bytes_shards[0];
  if (int rc = expertmesh::ApplyTlsOptions(tls); rc != 0) return rc;
  const int echo_port = expertmesh::ForkEchoServer();  // before this process uses gRPC
  spdlog::set_level(spdlog::level::warn);
  return expertmesh::Run(
      model, shards, batches, iterations, blocks,
      combine == "partial" ? expertmesh::CombineMode::kPartial : expertmesh::CombineMode::kExact,
      shard_threads, echo_port);
}
