#include "expert-service/expert_service.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/backend/backend.h"
#include "core/base/status.h"
#include "core/format/wire.h"
#include "core/numerics/numerics.h"
#include "expert-service/live_placement.h"
#include "service-common/bootstrap.h"
#include "service-common/grpc_util.h"
#include "service-common/handshake.h"
#include "service-common/tls.h"
#include "spdlog/spdlog.h"

namespace expertmesh {

absl::Status ValidateExpertRequest(const v1::ExpertRequest& request, const ModelConfig& config,
                                   const ExpertRequestLimits& limits,
                                   const std::function<bool(int, int)>& holds) {
  const uint64_t bytes = request.ByteSizeLong();
  if (bytes > limits.max_request_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request of ", bytes, " bytes exceeds ", limits.max_request_bytes));
  }
  const uint64_t n_rows = request.n_rows();
  const uint64_t hidden = request.hidden_size();
  if (hidden != static_cast<uint64_t>(config.hidden_size)) {
    return absl::InvalidArgumentError(
        absl::StrCat("hidden_size ", hidden, "; the model has ", config.hidden_size));
  }
  if (n_rows == 0) return absl::InvalidArgumentError("n_rows must be positive");
  if (n_rows > limits.max_rows) {
    return absl::ResourceExhaustedError(
        absl::StrCat("n_rows ", n_rows, " exceeds ", limits.max_rows));
  }
  const int64_t n_layers = config.num_hidden_layers + config.num_nextn_predict_layers;
  const int32_t layer = request.layer();
  if (layer < 0 || layer >= n_layers || !config.IsMoeLayer(layer)) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not a MoE layer"));
  }
  // Sizes first (all products fit in 64 bits: n_rows <= 2^32, hidden <= 2^32 / 2^16).
  if (request.activations().size() != ActivationBytes(n_rows, hidden)) {
    return absl::InvalidArgumentError(
        absl::StrCat("activations hold ", request.activations().size(),
                     " bytes; n_rows x hidden_size = ", ActivationBytes(n_rows, hidden)));
  }
  if (request.scales().size() != ScaleBytes(n_rows, hidden)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scales hold ", request.scales().size(), " bytes; expected ", ScaleBytes(n_rows, hidden)));
  }
  if (static_cast<uint64_t>(request.row_offsets_size()) != n_rows + 1) {
    return absl::InvalidArgumentError(absl::StrCat("row_offsets has ", request.row_offsets_size(),
                                                   " entries; n_rows + 1 = ", n_rows + 1));
  }
  if (request.weights_size() != request.experts_size()) {
    return absl::InvalidArgumentError(absl::StrCat("weights has ", request.weights_size(),
                                                   " entries, experts ", request.experts_size()));
  }
  if (request.combine() != v1::COMBINE_PARTIAL_SUM && request.combine() != v1::COMBINE_PER_EXPERT) {
    return absl::InvalidArgumentError(
        absl::StrCat("combine mode ", static_cast<int>(request.combine()), " is unknown"));
  }
  const uint64_t answer_rows = request.combine() == v1::COMBINE_PER_EXPERT
                                   ? static_cast<uint64_t>(request.experts_size())
                                   : n_rows;
  if (OutputBytes(answer_rows, hidden) > limits.max_response_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the answer would hold ", OutputBytes(answer_rows, hidden), " bytes of outputs (",
        answer_rows, request.combine() == v1::COMBINE_PER_EXPERT ? " pairs" : " rows",
        "); the limit is ", limits.max_response_bytes));
  }
  if (request.row_offsets(0) != 0 || request.row_offsets(static_cast<int>(n_rows)) !=
                                         static_cast<uint32_t>(request.experts_size())) {
    return absl::InvalidArgumentError(
        "row_offsets must start at 0 and end at the number of experts");
  }
  const float max_weight =
      limits.max_weight > 0
          ? limits.max_weight
          : 1.01f * static_cast<float>(std::max(1.0, config.routed_scaling_factor));
  for (uint64_t r = 0; r < n_rows; ++r) {
    const uint32_t begin = request.row_offsets(static_cast<int>(r));
    const uint32_t end = request.row_offsets(static_cast<int>(r + 1));
    if (end < begin) {
      return absl::InvalidArgumentError(absl::StrCat("row_offsets decrease at row ", r));
    }
    if (end > static_cast<uint32_t>(request.experts_size())) {  // (found by expert_request_fuzz)
      return absl::InvalidArgumentError(absl::StrCat(
          "row_offsets[", r + 1, "] = ", end, " is past the ", request.experts_size(), " experts"));
    }
    if (end - begin > static_cast<uint64_t>(config.num_experts_per_tok)) {
      return absl::InvalidArgumentError(absl::StrCat("row ", r, " has ", end - begin,
                                                     " experts; num_experts_per_tok is ",
                                                     config.num_experts_per_tok));
    }
    for (uint32_t p = begin; p < end; ++p) {
      const int32_t e = request.experts(static_cast<int>(p));
      if (e < 0 || e >= config.n_routed_experts) {
        return absl::InvalidArgumentError(absl::StrCat("expert id ", e, " out of range"));
      }
      if (p > begin && e <= request.experts(static_cast<int>(p - 1))) {
        return absl::InvalidArgumentError(
            absl::StrCat("experts of row ", r, " are not strictly ascending"));
      }
      if (!holds(layer, e)) {
        return absl::FailedPreconditionError(
            absl::StrCat("this shard does not hold layer ", layer, " expert ", e));
      }
      const float w = request.weights(static_cast<int>(p));
      if (!std::isfinite(w) || w < 0.0f || w > max_weight) {
        return absl::InvalidArgumentError(
            absl::StrCat("weight ", w, " of row ", r, " is not in [0, ", max_weight, "]"));
      }
    }
  }
  const std::string& scales = request.scales();
  for (size_t i = 0; i < scales.size(); i += 4) {
    float s;
    std::memcpy(&s, scales.data() + i, 4);
    if (!std::isfinite(s) || s <= 0.0f) {
      return absl::InvalidArgumentError(
          absl::StrCat("scale ", i / 4, " is ", s, "; scales must be finite and positive"));
    }
  }
  const std::string& act = request.activations();
  for (size_t i = 0; i < act.size(); ++i) {
    if ((static_cast<uint8_t>(act[i]) & 0x7f) == 0x7f) {  // float8_e4m3fn NaN
      return absl::InvalidArgumentError(absl::StrCat("activation ", i, " is NaN"));
    }
  }
  return absl::OkStatus();
}

ExpertServiceImpl::ExpertServiceImpl(const ModelConfig& config, v1::PeerIdentity identity,
                                     ExpertRequestLimits limits, MetricsRegistry* metrics)
    : config_(config),
      identity_(std::move(identity)),
      limits_(limits),
      metrics_(metrics),
      held_(std::make_shared<const HeldSet>()) {
  n_last_use_ = std::max<int64_t>(
      0, (config_.num_hidden_layers + config_.num_nextn_predict_layers) * config_.n_routed_experts);
  last_use_ = std::make_unique<std::atomic<int64_t>[]>(static_cast<size_t>(n_last_use_));
  for (int64_t i = 0; i < n_last_use_; ++i) last_use_[i].store(INT64_MIN);
  if (metrics_) {
    requests_ok_ =
        &metrics_->GetCounter("expertmesh_expert_requests_total", "Expert requests by outcome",
                              {{"code", absl::StatusCodeToString(absl::StatusCode::kOk)}});
    rows_total_ = &metrics_->GetCounter("expertmesh_expert_rows_total", "Rows computed");
    compute_seconds_ = &metrics_->GetHistogram("expertmesh_expert_compute_seconds",
                                               "Validate + compute time", LatencyBucketsSeconds());
  }
}

void ExpertServiceImpl::CountRequest(absl::StatusCode code) {
  if (!metrics_) return;
  if (code == absl::StatusCode::kOk) {
    requests_ok_->Inc();
    return;
  }
  metrics_
      ->GetCounter("expertmesh_expert_requests_total", "Expert requests by outcome",
                   {{"code", absl::StatusCodeToString(code)}})
      .Inc();
}

// One Compute stream. At most one operation is outstanding at any time (a read, or the write
// of the answer to the message just read), so the reactor needs no lock: each reaction starts
// the next operation or finishes the call, and OnDone, which gRPC calls once after Finish,
// frees it. The request, the response and both byte buffers are reused from message to message.
class ExpertServiceImpl::ComputeReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit ComputeReactor(ExpertServiceImpl* service) : service_(service) { StartRead(&in_); }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed, or the call is gone (cancelled, server shutdown)
      Finish(grpc::Status::OK);
      return;
    }
    ++received_;
    request_.Clear();
    // The transport already bounds the message size (ServerOptions::max_message_bytes).
    const bool parsed =
        grpc::SerializationTraits<v1::ExpertRequest>::Deserialize(&in_, &request_).ok();
    in_.Clear();
    if (!parsed) {
      // No request_id to answer in-band: the stream ends with the error.
      service_->CountRequest(absl::StatusCode::kInvalidArgument);
      spdlog::warn("Compute: message {} of a stream is not an ExpertRequest; ending the stream",
                   received_);
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("Compute: message ", received_,
                                       " of this stream does not parse as an ExpertRequest")));
      return;
    }
    service_->Handle(request_, &response_);
    bool own = false;
    if (!grpc::SerializationTraits<v1::ExpertResponse>::Serialize(response_, &out_, &own).ok()) {
      Finish(grpc::Status(grpc::StatusCode::INTERNAL, "Compute: response not serializable"));
      return;
    }
    StartWrite(&out_);
  }

  void OnWriteDone(bool ok) override {
    out_.Clear();
    if (!ok) {  // the call is broken
      Finish(grpc::Status::OK);
      return;
    }
    StartRead(&in_);
  }

  void OnDone() override {
    service_->open_streams_.fetch_sub(1);
    delete this;
  }

 private:
  ExpertServiceImpl* const service_;
  grpc::ByteBuffer in_;
  grpc::ByteBuffer out_;
  v1::ExpertRequest request_;
  v1::ExpertResponse response_;
  uint64_t received_ = 0;
};

// A stream over the limit: ended at once with the error.
class ExpertServiceImpl::RefusedReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit RefusedReactor(grpc::Status status) { Finish(std::move(status)); }
  void OnDone() override { delete this; }
};

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* ExpertServiceImpl::Compute(
    grpc::CallbackServerContext*) {
  if (open_streams_.fetch_add(1) >= limits_.max_streams) {
    open_streams_.fetch_sub(1);
    spdlog::warn("Compute: {} streams open; refusing another", limits_.max_streams);
    return new RefusedReactor(
        grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     absl::StrCat("Compute: this shard replica already serves ",
                                  limits_.max_streams, " streams")));
  }
  return new ComputeReactor(this);
}

// One connection of the framed TCP data plane: hello first, then requests (a FrameServer
// thread runs it and computes on that thread). The request and response are reused.
class ExpertServiceImpl::DataSession final : public dataplane::FrameSession {
 public:
  explicit DataSession(ExpertServiceImpl* service) : service_(service) {}

  absl::Status OnFrame(dataplane::FrameType type, std::string_view payload,
                       dataplane::FrameType* reply_type, std::string* reply) override {
    using dataplane::FrameType;
    if (type == FrameType::kHello) {
      v1::HandshakeRequest req;
      if (greeted_ || !req.ParseFromArray(payload.data(), static_cast<int>(payload.size()))) {
        return absl::InvalidArgumentError(greeted_ ? "data plane: a second hello"
                                                   : "data plane: hello is not a HandshakeRequest");
      }
      if (absl::Status s = CheckPeer(service_->identity_, req.client()); !s.ok()) return s;
      greeted_ = true;
      v1::HandshakeResponse resp;
      *resp.mutable_server() = service_->identity_;
      *reply_type = FrameType::kHelloOk;
      resp.SerializeToString(reply);
      return absl::OkStatus();
    }
    if (type != FrameType::kRequest) {
      return absl::InvalidArgumentError(
          absl::StrCat("data plane: unexpected ", dataplane::FrameTypeName(type), " frame"));
    }
    if (!greeted_) {
      return absl::FailedPreconditionError("data plane: a request before the hello (handshake)");
    }
    ++received_;
    request_.Clear();
    if (!request_.ParseFromArray(payload.data(), static_cast<int>(payload.size()))) {
      service_->CountRequest(absl::StatusCode::kInvalidArgument);
      spdlog::warn("data plane: frame {} of a connection is not an ExpertRequest; closing it",
                   received_);
      return absl::InvalidArgumentError(
          absl::StrCat("data plane: frame ", received_,
                       " of this connection does not parse as an ExpertRequest"));
    }
    service_->Handle(request_, &response_);
    *reply_type = FrameType::kResponse;
    if (!response_.SerializeToString(reply)) {
      return absl::InternalError("data plane: response not serializable");
    }
    return absl::OkStatus();
  }

 private:
  ExpertServiceImpl* const service_;
  bool greeted_ = false;
  uint64_t received_ = 0;
  v1::ExpertRequest request_;
  v1::ExpertResponse response_;
};

std::unique_ptr<dataplane::FrameSession> ExpertServiceImpl::NewDataSession() {
  return std::make_unique<DataSession>(this);
}

void ExpertServiceImpl::SetExperts(std::unique_ptr<RoutedExperts> experts,
                                   std::span<const LayerExpert> held, bool serialize) {
  PublishHeld(held);
  serialize_ = serialize;
  owned_experts_ = std::move(experts);
  experts_.store(owned_experts_.get());
}

std::shared_ptr<const ExpertServiceImpl::HeldSet> ExpertServiceImpl::held() const {
  std::lock_guard<std::mutex> lock(held_mu_);
  return held_;
}

void ExpertServiceImpl::PublishHeld(std::span<const LayerExpert> held) {
  auto next = std::make_shared<HeldSet>();
  for (const LayerExpert& le : held) next->emplace(le.layer, le.expert);
  std::shared_ptr<const HeldSet> old;
  {
    std::lock_guard<std::mutex> lock(held_mu_);
    old = std::exchange(held_, std::move(next));
  }
}

void ExpertServiceImpl::WaitUnused(std::shared_ptr<const HeldSet> old) {
  // Requests hold their set for microseconds to seconds; a poll is enough.
  while (old.use_count() > 1) absl::SleepFor(absl::Milliseconds(1));
}

absl::Time ExpertServiceImpl::LastUse(int layer, int expert) const {
  const int64_t i = static_cast<int64_t>(layer) * config_.n_routed_experts + expert;
  if (layer < 0 || expert < 0 || expert >= config_.n_routed_experts || i >= n_last_use_) {
    return absl::InfinitePast();
  }
  const int64_t ns = last_use_[i].load(std::memory_order_relaxed);
  return ns == INT64_MIN ? absl::InfinitePast() : absl::FromUnixNanos(ns);
}

void ExpertServiceImpl::StartDraining() { draining_ = true; }

void ExpertServiceImpl::WaitIdle() {
  std::unique_lock<std::mutex> lock(idle_mu_);
  idle_cv_.wait(lock, [this] { return in_flight_ == 0; });
}

grpc::Status ExpertServiceImpl::Handshake(grpc::ServerContext*, const v1::HandshakeRequest* req,
                                          v1::HandshakeResponse* resp) {
  if (absl::Status s = CheckPeer(identity_, req->client()); !s.ok()) return ToGrpcStatus(s);
  *resp->mutable_server() = identity_;
  return grpc::Status::OK;
}

v1::ExpertResponse ExpertServiceImpl::Handle(const v1::ExpertRequest& request) {
  v1::ExpertResponse response;
  Handle(request, &response);
  return response;
}

namespace {

// Per-thread scratch of Handle: the routes and the float outputs of one message, kept so
// that a stream's messages do not allocate them afresh each time.
struct HandleScratch {
  ExpertRoutes routes;
  std::vector<float> out;          // partial sums
  std::vector<uint16_t> pair_out;  // per-expert outputs
};

}  // namespace

void ExpertServiceImpl::Handle(const v1::ExpertRequest& request, v1::ExpertResponse* response) {
  const absl::Time start = absl::Now();
  response->clear_outputs();
  response->clear_error_message();
  response->set_error_code(0);
  response->set_n_rows(0);
  response->set_batch_id(request.batch_id());
  response->set_layer(request.layer());
  response->set_micro_batch(request.micro_batch());
  response->set_request_id(request.request_id());
  const auto finish = [&](const absl::Status& s) {
    if (!s.ok()) {
      response->set_error_code(static_cast<int>(s.code()));
      response->set_error_message(std::string(s.message()));
      response->clear_outputs();
      response->set_n_rows(0);
      spdlog::debug("expert request {} refused: {}", request.request_id(),
                    std::string(s.message()));
    }
    CountRequest(s.code());
    if (metrics_ && s.ok()) {
      rows_total_->Inc(request.n_rows());
      compute_seconds_->Observe(absl::ToDoubleSeconds(absl::Now() - start));
    }
  };

  {
    std::lock_guard<std::mutex> lock(idle_mu_);
    if (draining_) return finish(absl::UnavailableError("shard replica is draining"));
    ++in_flight_;
  }
  struct Done {
    ExpertServiceImpl* self;
    ~Done() {
      std::lock_guard<std::mutex> lock(self->idle_mu_);
      if (--self->in_flight_ == 0) self->idle_cv_.notify_all();
    }
  } done{this};

  RoutedExperts* experts = experts_.load();
  if (!experts) return finish(absl::UnavailableError("shard replica is still loading"));
  // Kept until the answer is written: a live placement change frees no expert of this set
  // before then (LivePlacement waits with WaitUnused).
  const std::shared_ptr<const HeldSet> held_set = held();
  if (absl::Status s = ValidateExpertRequest(request, config_, limits_,
                                             [&held_set](int l, int e) {
                                               return held_set->count({l, e}) != 0;
                                             });
      !s.ok()) {
    return finish(s);
  }
  {
    const int64_t now_ns = absl::ToUnixNanos(start);
    const int64_t base = static_cast<int64_t>(request.layer()) * config_.n_routed_experts;
    for (const int32_t e : request.experts()) {
      last_use_[base + e].store(now_ns, std::memory_order_relaxed);
    }
  }
  const int64_t n_rows = request.n_rows();
  const int64_t H = request.hidden_size();
  outstanding_rows_ += static_cast<uint32_t>(n_rows);
  absl::StatusOr<QuantizedActivations> x =
      UnpackActivations(request.activations(), request.scales(), n_rows, H);
  absl::Status status = x.status();
  if (status.ok()) {
    thread_local HandleScratch scratch;
    ExpertRoutes& routes = scratch.routes;
    routes.offsets.assign(request.row_offsets().begin(), request.row_offsets().end());
    routes.experts.assign(request.experts().begin(), request.experts().end());
    routes.weights.assign(request.weights().begin(), request.weights().end());
    const bool per_expert = request.combine() == v1::COMBINE_PER_EXPERT;
    if (per_expert) {
      scratch.pair_out.resize(static_cast<size_t>(routes.experts.size() * H));
    } else {
      scratch.out.resize(static_cast<size_t>(n_rows * H));
    }
    std::unique_lock<std::mutex> run_lock(run_mu_, std::defer_lock);
    if (serialize_) run_lock.lock();
    status = per_expert ? experts->RunPerExpert(request.layer(), *x, routes, scratch.pair_out)
                        : experts->Run(request.layer(), *x, routes, scratch.out);
    if (run_lock.owns_lock()) run_lock.unlock();
    if (status.ok()) {
      if (per_expert) {
        // Already BF16 (little-endian on every supported host: see core/format/wire.cc).
        response->mutable_outputs()->assign(reinterpret_cast<const char*>(scratch.pair_out.data()),
                                            scratch.pair_out.size() * sizeof(uint16_t));
      } else {
        PackOutputRows(scratch.out, response->mutable_outputs());
      }
      response->set_n_rows(static_cast<uint32_t>(n_rows));
    }
    // The scratch lives as long as its thread (a data-plane connection's, or a gRPC callback
    // thread): a large message's buffers are not kept for the next, small one.
    constexpr size_t kKeepBytes = 4u << 20;
    if (scratch.pair_out.capacity() * sizeof(uint16_t) > kKeepBytes) {
      std::vector<uint16_t>().swap(scratch.pair_out);
    }
    if (scratch.out.capacity() * sizeof(float) > kKeepBytes) std::vector<float>().swap(scratch.out);
  }
  outstanding_rows_ -= static_cast<uint32_t>(n_rows);
  finish(status);
}

std::string AdvertisedAddress(const std::string& advertise, const std::string& listen,
                              int bound_port) {
  if (!advertise.empty()) return advertise;
  std::string host = listen.substr(0, listen.rfind(':'));
  if (host.empty() || host == "0.0.0.0" || host == "[::]" || host == "::") {
    spdlog::warn("listening on {}: advertising 127.0.0.1; pass --advertise for other hosts",
                 listen);
    host = "127.0.0.1";
  }
  return absl::StrCat(host, ":", bound_port);
}

absl::StatusOr<std::unique_ptr<ExpertServer>> ExpertServer::Start(ExpertServerOptions options) {
  std::unique_ptr<ExpertServer> es(new ExpertServer());
  es->options_ = std::move(options);
  const ExpertServerOptions& o = es->options_;
  EM_ASSIGN_OR_RETURN(es->config_, LoadModelConfig(o.model_dir + "/config.json"));
  EM_ASSIGN_OR_RETURN(v1::PeerIdentity identity,
                      MakeLocalIdentity(o.model_dir, "expert-service", o.instance_id));
  if (o.experts.empty()) return absl::InvalidArgumentError("expert-service: no experts to hold");
  if (!(o.capacity_weight > 0.0f && o.capacity_weight <= 1e6f)) {
    return absl::InvalidArgumentError("expert-service: capacity_weight must be in (0, 1e6]");
  }
  if (o.release_grace < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("expert-service: the release grace must not be negative");
  }
  // Before anything is started or loaded.
  if (!o.data_listen.empty()) {
    if (ProcessTls().enabled()) {
      return absl::FailedPreconditionError(
          "expert-service: the framed TCP data plane is plaintext and this replica runs mTLS: "
          "turn it off (--data-listen off) or run without TLS");
    }
    std::string host;
    int port = 0;
    if (absl::Status s = dataplane::SplitHostPort(o.data_listen, &host, &port); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert-service: data-plane listen address: ", s.message()));
    }
  }

  // The transport accepts somewhat more than the per-message limit so that an oversized
  // message is answered with its own error instead of killing the stream.
  ServerOptions server = o.server;
  server.max_message_bytes = static_cast<int>(
      std::min<uint64_t>(o.limits.max_request_bytes * 2 + (1 << 20), (1u << 31) - 1));
  server.health_service_names.push_back(v1::ExpertService::service_full_name());
  es->service_ = std::make_unique<ExpertServiceImpl>(es->config_, identity, o.limits, o.metrics);
  EM_ASSIGN_OR_RETURN(RunningServer running, StartGrpcServer(server, {es->service_.get()}));
  es->server_ = std::move(running.server);
  es->port_ = running.port;
  spdlog::info("expert-service listening on port {} (NOT_SERVING while loading)", es->port_);

  // Load only this shard's experts.
  EM_ASSIGN_OR_RETURN(es->checkpoint_, Checkpoint::Open(o.model_dir));
  const uint64_t share = ExpertBytesInCheckpoint(*es->checkpoint_, o.experts);
  spdlog::info("loading {} experts of shard {} ({:.1f} MiB of {:.1f} MiB in the checkpoint)",
               o.experts.size(), o.shard_id, share / 1048576.0,
               es->checkpoint_->total_bytes() / 1048576.0);
  EM_ASSIGN_OR_RETURN(const DeviceSpec device, ParseDeviceSpec(o.device));
  LocalExperts::Options lo;
  lo.quantize_activations = o.quantize_activations;
  const int64_t total = static_cast<int64_t>(o.experts.size());
  const int64_t step = std::max<int64_t>(1, total / 10);
  lo.progress = [step](int64_t done, int64_t n) {
    if (done % step == 0 || done == n) spdlog::info("loaded {}/{} experts", done, n);
  };
  if (device.cuda) spdlog::info("copying the experts to CUDA device(s) {}", o.device);
  EM_ASSIGN_OR_RETURN(ExpertsBackend backend,
                      CreateExpertsBackend(*es->checkpoint_, es->config_, o.experts, device, lo));
  es->bytes_mapped_ = backend.bytes;
  spdlog::info("experts loaded on {}: {} bytes of expert tensors ({} bytes mapped from files)",
               o.device, es->bytes_mapped_, es->checkpoint_->bytes_mapped());
  if (o.metrics) {
    o.metrics->GetGauge("expertmesh_expert_bytes_mapped", "Bytes of expert tensors held")
        .Set(static_cast<double>(es->bytes_mapped_));
    ExpertServiceImpl* svc = es->service_.get();
    o.metrics->AddCollector([svc, m = o.metrics] {
      m->GetGauge("expertmesh_expert_outstanding_rows", "Rows being computed")
          .Set(svc->outstanding_rows());
    });
  }
  if (!device.cuda) es->local_ = dynamic_cast<LocalExperts*>(backend.experts.get());
  es->service_->SetExperts(std::move(backend.experts), o.experts, backend.serialize);
  if (o.live_placement && es->local_ != nullptr) {
    es->live_ = std::make_unique<LivePlacement>(
        *es->checkpoint_, es->config_, es->local_, es->service_.get(),
        LivePlacement::Options{.release_grace = o.release_grace, .metrics = o.metrics});
  }
  if (!o.data_listen.empty()) {
    dataplane::FrameServerOptions fo;
    fo.listen = o.data_listen;
    fo.max_connections = o.limits.max_data_connections;
    fo.max_frame_bytes = static_cast<uint32_t>(server.max_message_bytes);
    if (o.metrics) {
      Gauge* open = &o.metrics->GetGauge("expertmesh_expert_data_connections",
                                         "Open connections of the framed TCP data plane");
      Counter* refused =
          &o.metrics->GetCounter("expertmesh_expert_data_connections_refused_total",
                                 "Data-plane connections refused over --max-data-connections");
      Counter* evicted = &o.metrics->GetCounter(
          "expertmesh_expert_data_connections_evicted_total",
          "Idle data-plane connections closed to make room for a new one at the bound");
      fo.on_connections = [open](uint32_t n) { open->Set(n); };
      fo.on_refused = [refused] { refused->Inc(); };
      fo.on_evicted = [evicted] { evicted->Inc(); };
    }
    ExpertServiceImpl* svc = es->service_.get();
    EM_ASSIGN_OR_RETURN(es->data_server_, dataplane::FrameServer::Start(std::move(fo), [svc] {
                          return svc->NewDataSession();
                        }));
    if (!o.data_advertise_address.empty()) {
      es->data_address_ = o.data_advertise_address;
    } else {
      // The host peers reach this replica at: the --advertise host when given (the data port
      // is on the same machine), else the data listen host unless it is a wildcard.
      std::string host = HostOf(o.data_listen);
      if (!o.advertise_address.empty() || host.empty() || host == "0.0.0.0" || host == "::" ||
          host == "*") {
        host = HostOf(AdvertisedAddress(o.advertise_address, o.server.listen, es->port_));
      }
      es->data_address_ = host.find(':') != std::string::npos
                              ? absl::StrCat("[", host, "]:", es->data_server_->port())
                              : absl::StrCat(host, ":", es->data_server_->port());
    }
    spdlog::info("data plane (framed TCP) listening on port {}, advertised as {}",
                 es->data_server_->port(), es->data_address_);
  }
  // Liveness ("") from here on; readiness (the service name) once the router has this replica
  // (at once without a router), and again whenever it registers after the router forgot it.
  SetLive(*es->server_);
  const std::string ready_name = v1::ExpertService::service_full_name();
  if (o.router_address.empty()) SetReady(*es->server_, ready_name, true);

  if (!o.router_address.empty()) {
    v1::RegisterRequest reg;
    *reg.mutable_identity() = identity;
    reg.set_address(AdvertisedAddress(o.advertise_address, o.server.listen, es->port_));
    reg.set_data_address(es->data_address_);
    reg.set_shard_id(o.shard_id);
    reg.set_capacity(o.capacity);
    reg.set_device_kind(device.cuda ? o.device : "cpu");
    reg.set_capacity_weight(o.capacity_weight);
    reg.set_live_placement(es->live_ != nullptr);
    for (const LayerExpert& le : o.experts) {
      v1::LayerExpert* p = reg.add_experts();
      p->set_layer(le.layer);
      p->set_expert(le.expert);
    }
    ExpertServiceImpl* svc = es->service_.get();
    grpc::Server* server = es->server_.get();
    RouterRegistration::LiveHooks hooks;
    if (LivePlacement* live = es->live_.get()) {
      hooks.on_target = [live](const v1::ExpertTarget& t) { live->OnTarget(t); };
      hooks.held_generation = [live] { return live->held_generation(); };
      hooks.load_error = [live] { return live->load_error(); };
      hooks.held = [live] { return live->Held(); };
    }
    EM_ASSIGN_OR_RETURN(
        es->registration_,
        RouterRegistration::Start(
            o.router_address, std::move(reg), [svc] { return svc->outstanding_rows(); },
            o.rpc_timeout,
            [server, ready_name](bool registered) { SetReady(*server, ready_name, registered); },
            std::move(hooks)));
  }
  return es;
}

std::string ExpertServer::address() const { return LoopbackAddress(port_); }
uint64_t ExpertServer::bytes_mapped() const {
  return local_ != nullptr ? local_->bytes_mapped() : bytes_mapped_;
}

void ExpertServer::Drain() {
  std::lock_guard<std::mutex> lock(stop_mu_);
  if (stopped_) return;
  stopped_ = true;
  SetServing(*server_, false);
  if (registration_) {
    registration_->Deregister();  // the router stops handing us out; its thread has stopped
    SetServing(*server_, false);  // again: a registration that raced the first made it ready
  }
  live_.reset();              // no more loads or releases
  service_->StartDraining();  // stragglers get UNAVAILABLE: fail over
  service_->WaitIdle();       // in-flight messages finish
  if (data_server_) data_server_->Stop();
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  spdlog::info("expert-service drained and stopped");
}

void ExpertServer::Kill() {
  std::lock_guard<std::mutex> lock(stop_mu_);
  if (stopped_) return;
  stopped_ = true;
  registration_.reset();  // heartbeats stop; the router expires us
  live_.reset();
  if (data_server_) data_server_->Stop();  // connections cut
  server_->Shutdown(std::chrono::system_clock::now());
}

ExpertServer::~ExpertServer() {
  if (server_) Drain();
}

}  // namespace expertmesh
