#include "attention-service/attention_service.h"

#include <chrono>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/backend/backend.h"
#include "service-common/bootstrap.h"
#include "service-common/handshake.h"
#include "spdlog/spdlog.h"

namespace expertmesh::attention {
namespace {

v1::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case FinishReason::kError:
      return v1::FINISH_REASON_ERROR;
    case FinishReason::kNone:
      break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

absl::Time FromChrono(std::chrono::system_clock::time_point t) {
  if (t == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(t);
}

}  // namespace

absl::StatusOr<SequenceRequest> ToGenerationRequest(const v1::SubmitRequest& req,
                                                    int64_t max_context, absl::Time now,
                                                    absl::Time rpc_deadline,
                                                    absl::Duration default_deadline) {
  SequenceRequest r;
  r.request_id = req.request_id();
  if (r.request_id.size() > 256) return absl::InvalidArgumentError("request_id over 256 bytes");
  if (req.prompt_token_ids_size() == 0) {
    return absl::InvalidArgumentError("prompt_token_ids is empty");
  }
  if (req.prompt_token_ids_size() >= max_context) {
    return absl::InvalidArgumentError(absl::StrCat("prompt of ", req.prompt_token_ids_size(),
                                                   " tokens leaves no room in the context of ",
                                                   max_context, " tokens"));
  }
  r.prompt.assign(req.prompt_token_ids().begin(), req.prompt_token_ids().end());
  const int64_t room = max_context - static_cast<int64_t>(r.prompt.size());
  r.max_tokens = req.max_tokens() == 0 ? room : std::min<int64_t>(req.max_tokens(), room);
  if (req.stop_token_ids_size() > 64) {
    return absl::InvalidArgumentError("at most 64 stop_token_ids");
  }
  r.stop_token_ids.assign(req.stop_token_ids().begin(), req.stop_token_ids().end());
  r.ignore_eos = req.ignore_eos();
  r.disable_mtp = req.disable_mtp();
  r.priority = req.priority();
  switch (req.response_format()) {
    case v1::RESPONSE_FORMAT_TEXT:
      break;
    case v1::RESPONSE_FORMAT_JSON_OBJECT:
      r.json_object = true;  // the scheduler masks its samples (core/decode/json_constraint.h)
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unknown response_format ", static_cast<int>(req.response_format())));
  }

  const v1::SamplingParams& s = req.sampling();
  if (!std::isfinite(s.temperature()) || s.temperature() < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.temperature ", s.temperature(), " must be a finite value >= 0"));
  }
  if (!std::isfinite(s.top_p()) || s.top_p() < 0.0f || s.top_p() > 1.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.top_p ", s.top_p(), " must lie in (0, 1] (0 = unset)"));
  }
  if (s.top_k() < 0) return absl::InvalidArgumentError("sampling.top_k must be >= 0");
  if (s.top_logprobs() > 20) {
    return absl::InvalidArgumentError("sampling.top_logprobs must lie in [0, 20]");
  }
  r.sampling.temperature = s.temperature();
  r.sampling.top_p = s.top_p() == 0.0f ? 1.0f : s.top_p();
  r.sampling.top_k = s.top_k();
  r.sampling.presence_penalty = s.presence_penalty();
  r.sampling.frequency_penalty = s.frequency_penalty();
  r.sampling.top_logprobs = static_cast<int32_t>(s.top_logprobs());
  if (s.has_seed()) {
    r.sampling.seed = s.seed();
  } else {
    std::random_device rd;
    r.sampling.seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }

  absl::Duration budget =
      req.deadline_ms() > 0 ? absl::Milliseconds(req.deadline_ms()) : default_deadline;
  r.deadline = std::min(now + budget, rpc_deadline);
  return r;
}

grpc::Status AttentionServiceImpl::Handshake(grpc::ServerContext*, const v1::HandshakeRequest* req,
                                             v1::HandshakeResponse* resp) {
  if (absl::Status s = CheckPeer(identity_, req->client()); !s.ok()) return ToGrpcStatus(s);
  *resp->mutable_server() = identity_;
  return grpc::Status::OK;
}

grpc::Status AttentionServiceImpl::Submit(grpc::ServerContext* ctx, const v1::SubmitRequest* req,
                                          grpc::ServerWriter<v1::TokenEvent>* writer) {
  Scheduler* scheduler = scheduler_.load();
  if (scheduler == nullptr) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading");
  }
  open_streams_.fetch_add(1);
  struct Closed {
    std::atomic<int>& n;
    ~Closed() { n.fetch_sub(1); }
  } closed{open_streams_};
  if (draining_.load()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the attention replica is draining");
  }
  absl::StatusOr<SequenceRequest> request = ToGenerationRequest(
      *req, scheduler->max_context(), absl::Now(), FromChrono(ctx->deadline()), default_deadline_);
  if (!request.ok()) return ToGrpcStatus(request.status());
  if (request->request_id.empty()) request->request_id = absl::StrCat("anon-", next_id_++);
  absl::StatusOr<std::shared_ptr<SequenceStream>> stream = scheduler->Submit(*std::move(request));
  if (!stream.ok()) return ToGrpcStatus(stream.status());

  while (true) {
    // Waiting in short slices lets a client's cancellation reach the scheduler promptly.
    std::optional<SequenceEvent> e = (*stream)->Next(absl::Milliseconds(10));
    if (!e.has_value()) {
      if (ctx->IsCancelled()) {
        (*stream)->Cancel();
        return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
      }
      continue;
    }
    if (e->finish == FinishReason::kError) return ToGrpcStatus(e->error);
    v1::TokenEvent out;
    for (const GeneratedToken& t : e->tokens) {
      out.add_token_ids(t.token);
      out.add_logprobs(t.logprob);
      v1::TopLogprobs* top = out.add_top_logprobs();
      for (const auto& [id, lp] : t.top_logprobs) {
        v1::TopLogprob* entry = top->add_entries();
        entry->set_token_id(id);
        entry->set_logprob(lp);
      }
    }
    if (e->finish != FinishReason::kNone) {
      out.set_finish_reason(ToProto(e->finish));
      out.set_prompt_tokens(static_cast<uint32_t>(e->prompt_tokens));
      out.set_completion_tokens(static_cast<uint32_t>(e->completion_tokens));
      out.set_drafted_tokens(static_cast<uint32_t>(e->drafted_tokens));
      out.set_accepted_draft_tokens(static_cast<uint32_t>(e->accepted_tokens));
    }
    if (!writer->Write(out)) {
      (*stream)->Cancel();
      return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
    }
    if (e->finish != FinishReason::kNone) return grpc::Status::OK;
  }
}

grpc::Status AttentionServiceImpl::Cancel(grpc::ServerContext*, const v1::CancelRequest* req,
                                          v1::CancelResponse* resp) {
  Scheduler* scheduler = scheduler_.load();
  resp->set_found(scheduler != nullptr && scheduler->Cancel(req->request_id()));
  return grpc::Status::OK;
}

grpc::Status AttentionServiceImpl::GetLoad(grpc::ServerContext*, const v1::LoadRequest*,
                                           v1::LoadResponse* resp) {
  Scheduler* scheduler = scheduler_.load();
  if (scheduler == nullptr) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading");
  }
  const SchedulerLoad load = scheduler->Load();
  resp->set_running(static_cast<uint32_t>(load.running));
  resp->set_waiting(static_cast<uint32_t>(load.waiting));
  resp->set_kv_blocks_used(static_cast<uint64_t>(load.kv_blocks_used));
  resp->set_kv_blocks_total(static_cast<uint64_t>(load.kv_blocks_total));
  resp->set_max_context(static_cast<uint32_t>(load.max_context));
  return grpc::Status::OK;
}

absl::StatusOr<std::unique_ptr<AttentionServer>> AttentionServer::Start(
    AttentionServerOptions options) {
  std::unique_ptr<AttentionServer> s(new AttentionServer());
  s->options_ = std::move(options);
  const AttentionServerOptions& o = s->options_;
  // The main layers' routed experts are always remote (the Dispatcher), and the wire carries
  // FP8 activations only (ExpertRequest): unquantized activations would start, report
  // SERVING and then fail every step. Refuse the combination before anything starts.
  if (!o.scheduler.engine.quantize_activations) {
    return absl::FailedPreconditionError(
        "unquantized activations (--no-act-quant) cannot be served: the routed experts run on "
        "the expert shards, which take FP8 activations only; drop --no-act-quant (the "
        "in-process `expertmesh run --no-act-quant` supports it)");
  }

  absl::StatusOr<v1::PeerIdentity> identity =
      MakeLocalIdentity(o.model_dir, "attention-service", o.instance_id);
  if (!identity.ok()) return identity.status();
  absl::StatusOr<ModelConfig> config = LoadModelConfig(o.model_dir + "/config.json");
  if (!config.ok()) return config.status();
  s->config_ = *std::move(config);

  if (o.metrics_port >= 0) {
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> m =
        MetricsHttpServer::Start(&s->metrics_, o.metrics_host, o.metrics_port);
    if (!m.ok()) return m.status();
    s->metrics_http_ = *std::move(m);
  }
  // gRPC first, NOT_SERVING, so health checks answer while the model loads.
  s->service_ = std::make_unique<AttentionServiceImpl>(*identity, o.default_deadline);
  ServerOptions server_options = o.server;
  // One sync thread per open Submit stream: room for every running and waiting sequence.
  server_options.max_sync_threads =
      std::max<int>(server_options.max_sync_threads,
                    static_cast<int>(o.scheduler.max_batch + o.scheduler.max_waiting + 16));
  // grpc.health.v1 answers for the service name too (following SERVING like ""), as the router
  // and the shards do for theirs.
  server_options.health_service_names.push_back(v1::AttentionService::service_full_name());
  absl::StatusOr<RunningServer> server = StartGrpcServer(server_options, {s->service_.get()});
  if (!server.ok()) return server.status();
  s->server_ = std::move(server->server);
  s->port_ = server->port;

  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(o.model_dir);
  if (!ckpt.ok()) return ckpt.status();
  s->checkpoint_ = *std::move(ckpt);
  ModelLoadOptions load;
  load.load_mtp = o.scheduler.mtp;  // the MTP module drafts (speculative decoding)
  // The CPU engine's absorbed attention reads kv_b_proj precomputed in FP32 (4x its FP8 bytes);
  // the CUDA engine keeps its own device copy, so the host copy would only cost memory.
  if (absl::StatusOr<DeviceSpec> device = ParseDeviceSpec(o.scheduler.device);
      device.ok() && device->cuda) {
    load.absorbed_attention = false;
  }
  if (o.load_progress) {
    load.progress = [](int64_t done, int64_t total) {
      if (done == total || done % 64 == 0) spdlog::info("loading: {}/{} tensors", done, total);
    };
  }
  const absl::Time load_start = absl::Now();
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Create(*s->checkpoint_, s->config_, load);
  if (!model.ok()) return model.status();
  s->model_ = *std::move(model);
  spdlog::info("model loaded in {:.2f} s ({} MiB mapped)",
               absl::ToDoubleSeconds(absl::Now() - load_start),
               s->checkpoint_->bytes_mapped() >> 20);

  DispatcherOptions d;
  d.identity = *identity;
  d.step_deadline = o.step_deadline;
  d.attempt_timeout = std::min(o.attempt_timeout, o.step_deadline);
  d.combine = o.combine;
  d.data_plane = o.data_plane;
  d.metrics = &s->metrics_;
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher = Dispatcher::Create(s->config_, d);
  if (!dispatcher.ok()) return dispatcher.status();
  s->dispatcher_ = *std::move(dispatcher);
  s->dispatcher_->WatchRouter(o.router_address);

  RoutedExperts* experts = s->dispatcher_.get();
  const int n_layers = static_cast<int>(s->config_.num_hidden_layers);
  if (o.local_mtp_experts && o.scheduler.mtp && !s->model_->mtp().empty()) {
    std::vector<LayerExpert> mtp;
    for (int d = 0; d < std::ssize(s->model_->mtp()); ++d) {
      for (int e = 0; e < s->config_.n_routed_experts; ++e) mtp.push_back({n_layers + d, e});
    }
    LocalExperts::Options lo;
    lo.quantize_activations = o.scheduler.engine.quantize_activations;
    absl::StatusOr<std::unique_ptr<LocalExperts>> local =
        LocalExperts::Create(*s->checkpoint_, s->config_, mtp, lo);
    if (!local.ok()) return local.status();
    s->mtp_experts_ = *std::move(local);
    s->experts_ =
        std::make_unique<LayerSplitExperts>(s->dispatcher_.get(), s->mtp_experts_.get(), n_layers);
    experts = s->experts_.get();
    spdlog::info("MTP module's {} routed experts held here ({} MiB): drafting skips the network",
                 mtp.size(), s->mtp_experts_->bytes_mapped() >> 20);
  }
  SchedulerOptions scheduler_options = o.scheduler;
  if (scheduler_options.micro_batches > 1) {
    if (scheduler_options.micro_batches > Dispatcher::kMaxMicroBatches) {
      return absl::InvalidArgumentError(absl::StrCat("--micro-batches ",
                                                     scheduler_options.micro_batches, ": at most ",
                                                     Dispatcher::kMaxMicroBatches));
    }
    // Each micro-batch dispatches under its own step table (overlapping steps).
    scheduler_options.micro_batch_experts.clear();
    for (int i = 0; i < scheduler_options.micro_batches; ++i) {
      RoutedExperts* lane = s->dispatcher_->MicroBatch(i);
      if (s->mtp_experts_) {
        s->micro_batch_experts_.push_back(
            std::make_unique<LayerSplitExperts>(lane, s->mtp_experts_.get(), n_layers));
        lane = s->micro_batch_experts_.back().get();
      }
      scheduler_options.micro_batch_experts.push_back(lane);
    }
  }
  // JSON mode's token bytes come from the model's tokenizer.json (when it has one).
  scheduler_options.tokenizer_json = o.model_dir + "/tokenizer.json";
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler =
      Scheduler::Create(s->model_.get(), experts, scheduler_options, &s->metrics_);
  if (!scheduler.ok()) return scheduler.status();
  s->scheduler_ = *std::move(scheduler);
  s->service_->SetScheduler(s->scheduler_.get());

  Gauge& running = s->metrics_.GetGauge("expertmesh_attention_requests_running",
                                        "Sequences in the running batch");
  Gauge& waiting = s->metrics_.GetGauge("expertmesh_attention_requests_waiting",
                                        "Sequences waiting for a batch slot or KV blocks");
  Gauge& used = s->metrics_.GetGauge("expertmesh_attention_kv_blocks_used", "KV blocks in use");
  Gauge& total = s->metrics_.GetGauge("expertmesh_attention_kv_blocks_total", "KV blocks");
  Gauge& mtp_used = s->metrics_.GetGauge("expertmesh_attention_mtp_kv_blocks_used",
                                         "KV blocks of the MTP module's caches in use");
  Gauge& usage = s->metrics_.GetGauge("expertmesh_attention_kv_cache_usage_ratio",
                                      "KV blocks in use / KV blocks");
  Scheduler* sched = s->scheduler_.get();
  s->metrics_.AddCollector([=, &running, &waiting, &used, &total, &mtp_used, &usage] {
    const SchedulerLoad l = sched->Load();
    running.Set(static_cast<double>(l.running));
    waiting.Set(static_cast<double>(l.waiting));
    used.Set(static_cast<double>(l.kv_blocks_used));
    total.Set(static_cast<double>(l.kv_blocks_total));
    mtp_used.Set(static_cast<double>(l.mtp_kv_blocks_used));
    usage.Set(l.kv_blocks_total > 0
                  ? static_cast<double>(l.kv_blocks_used) / static_cast<double>(l.kv_blocks_total)
                  : 0.0);
  });
  spdlog::info("speculative decoding with the MTP module: {}",
               s->scheduler_->mtp()
                   ? absl::StrCat("on, up to ", o.scheduler.draft_k, " draft(s) per step")
                   : std::string("off"));
  SetLive(*s->server_);  // readiness (the name) follows the shard groups' coverage
  s->monitor_ = std::thread([p = s.get()] { p->MonitorCoverage(); });
  return s;
}

void AttentionServer::MonitorCoverage() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    const bool covered = dispatcher_->Covered() && !draining_;
    if (covered != serving_ && !draining_) {
      serving_ = covered;
      SetReady(*server_, v1::AttentionService::service_full_name(), covered);  // "" stays live
      if (covered) {
        spdlog::info("every shard group has a replica (placement map v{}): SERVING",
                     dispatcher_->placement_version());
      } else {
        spdlog::warn("a shard group has no replica: NOT_SERVING");
      }
      cv_.notify_all();
    }
    cv_.wait_for(lock, std::chrono::milliseconds(50));
  }
}

absl::Status AttentionServer::WaitServing(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                    [this] { return serving_ || stopping_; }) ||
      !serving_) {
    return absl::DeadlineExceededError("the attention service is not SERVING");
  }
  return absl::OkStatus();
}

int AttentionServer::Drain(absl::Duration grace) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || draining_) return 0;
    draining_ = true;
    serving_ = false;
  }
  cv_.notify_all();
  if (server_) SetServing(*server_, false);
  service_->StartDraining();
  const absl::Time start = absl::Now();
  const int open = service_->open_streams();
  spdlog::info("draining: NOT_SERVING, {} sequence(s) to finish (grace {})", open,
               absl::FormatDuration(grace));
  while (service_->open_streams() > 0 && absl::Now() - start < grace) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const int cut = service_->open_streams();
  if (cut > 0) {
    spdlog::warn("drain grace over after {}: {} sequence(s) end with UNAVAILABLE",
                 absl::FormatDuration(absl::Now() - start), cut);
  } else {
    spdlog::info("drained in {:.3f} s", absl::ToDoubleSeconds(absl::Now() - start));
  }
  Shutdown();
  return cut;
}

void AttentionServer::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (monitor_.joinable()) monitor_.join();
  if (server_) SetServing(*server_, false);
  // Live sequences end with UNAVAILABLE; their handlers then return and Shutdown completes.
  if (scheduler_) scheduler_->Shutdown();
  if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  if (service_) service_->SetScheduler(nullptr);
  metrics_http_.reset();  // its collector reads the scheduler
  scheduler_.reset();
  dispatcher_.reset();
}

AttentionServer::~AttentionServer() { Shutdown(); }

}  // namespace expertmesh::attention
