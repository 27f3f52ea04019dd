#include "gateway/grpc_service.h"

#include "gateway/api_error.h"
#include "gateway/openai_parse.h"
#include "gateway/strings.h"
#include "service-common/grpc_util.h"

namespace expertmesh::gateway {
namespace {

class WriterSink : public GenerationSink {
 public:
  WriterSink(grpc::ServerContext* context, grpc::ServerWriter<v1::GenerateResponse>* writer,
             bool return_token_ids, bool logprobs)
      : context_(context),
        writer_(writer),
        return_token_ids_(return_token_ids),
        logprobs_(logprobs) {}

  bool OnDelta(const Delta& delta) override {
    v1::GenerateResponse response;
    response.set_text(delta.text);
    if (return_token_ids_) {
      response.mutable_token_ids()->Add(delta.token_ids.begin(), delta.token_ids.end());
    }
    if (logprobs_) {
      for (const TokenLogprob& lp : delta.logprobs) {
        response.add_logprobs(lp.logprob);
        v1::TopLogprobs* top = response.add_top_logprobs();
        for (const TopCandidate& c : lp.top) {
          v1::TopLogprob* e = top->add_entries();
          e->set_token_id(c.token_id);
          e->set_logprob(c.logprob);
        }
      }
    }
    return writer_->Write(response);
  }
  bool ClientGone() override { return context_->IsCancelled(); }
  std::optional<std::chrono::system_clock::time_point> ClientDeadline() const override {
    const auto d = context_->deadline();
    // No deadline set: gRPC reports the far future.
    if (d >= std::chrono::system_clock::now() + std::chrono::hours(24 * 365)) return std::nullopt;
    return d;
  }

 private:
  grpc::ServerContext* context_;
  grpc::ServerWriter<v1::GenerateResponse>* writer_;
  const bool return_token_ids_;
  const bool logprobs_;
};

}  // namespace

std::string PeerKey(std::string_view peer) {
  // "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:/path": the address without the port.
  const size_t colon = peer.rfind(':');
  const size_t scheme = peer.find(':');
  if (colon != std::string_view::npos && colon != scheme &&
      (peer.substr(0, 5) == "ipv4:" || peer.substr(0, 5) == "ipv6:")) {
    peer = peer.substr(0, colon);
  }
  return Cat("peer:", peer.substr(scheme == std::string_view::npos ? 0 : scheme + 1));
}

absl::StatusOr<GenerationRequest> FromProto(const v1::GenerateRequest& proto, const ModelCard& card,
                                            const RequestLimits& limits) {
  GenerationRequest r;
  r.endpoint = Endpoint::kGrpc;
  r.model = proto.model().empty() ? card.id : proto.model();
  if (r.model != card.id) return UnknownModel(r.model);
  switch (proto.input_case()) {
    case v1::GenerateRequest::kPrompt:
      r.prompt_text = proto.prompt();
      break;
    case v1::GenerateRequest::kPromptTokenIds:
      r.prompt_token_ids.emplace(proto.prompt_token_ids().ids().begin(),
                                 proto.prompt_token_ids().ids().end());
      for (int32_t id : *r.prompt_token_ids) {
        if (id < 0) return InvalidParam("prompt_token_ids", "token ids must not be negative");
      }
      break;
    default:
      return InvalidParam("prompt", "give a prompt or prompt_token_ids");
  }
  if (proto.has_sampling()) {
    const v1::SamplingParams& s = proto.sampling();
    r.sampling.temperature = s.temperature();
    r.sampling.top_p = s.top_p() == 0.0f ? 1.0f : s.top_p();
    r.sampling.top_k = s.top_k();
    if (s.has_seed()) r.sampling.seed = s.seed();
    r.sampling.presence_penalty = s.presence_penalty();
    r.sampling.frequency_penalty = s.frequency_penalty();
    r.sampling.logprobs = s.logprobs() || s.top_logprobs() > 0;
    r.sampling.top_logprobs = s.top_logprobs();
  } else {
    r.sampling.temperature = card.defaults.temperature;
    r.sampling.top_p = card.defaults.top_p;
    r.sampling.top_k = card.defaults.top_k;
  }
  if (proto.max_tokens() > 0) r.max_tokens = proto.max_tokens();
  r.stop.assign(proto.stop().begin(), proto.stop().end());
  r.stop_token_ids.assign(proto.stop_token_ids().begin(), proto.stop_token_ids().end());
  for (int32_t id : r.stop_token_ids) {
    if (id < 0) return InvalidParam("stop_token_ids", "token ids must not be negative");
  }
  r.ignore_eos = proto.ignore_eos();
  r.return_token_ids = proto.return_token_ids();
  r.priority = proto.priority();
  r.stream = true;
  absl::Status valid = ValidateGenerationRequest(r, card, limits);
  if (!valid.ok()) return valid;
  return r;
}

grpc::Status GatewayGrpcService::Generate(grpc::ServerContext* context,
                                          const v1::GenerateRequest* request,
                                          grpc::ServerWriter<v1::GenerateResponse>* writer) {
  absl::StatusOr<GenerationRequest> r = FromProto(*request, runner_->card(), RequestLimits{});
  if (r.ok()) r->client = PeerKey(context->peer());
  absl::StatusOr<PreparedRequest> prepared =
      r.ok() ? runner_->Prepare(std::move(*r)) : absl::StatusOr<PreparedRequest>(r.status());
  if (!prepared.ok()) {
    metrics_->Requests("grpc", ToApiError(prepared.status()).http_status).Inc();
    return ToGrpcStatus(prepared.status());
  }
  WriterSink sink(context, writer, prepared->request.return_token_ids,
                  prepared->request.sampling.logprobs);
  absl::StatusOr<Outcome> outcome = runner_->Run(*prepared, sink);
  if (!outcome.ok()) {
    const ApiError e = ToApiError(outcome.status());
    metrics_->Requests("grpc", e.http_status).Inc();
    if (e.http_status == 429 || e.http_status == 503) {
      // The HTTP API's Retry-After, as trailing metadata.
      context->AddTrailingMetadata("retry-after", std::to_string(e.retry_after_s));
    }
    return ToGrpcStatus(outcome.status());
  }
  metrics_->Requests("grpc", 200).Inc();
  v1::GenerateResponse last;
  last.set_finish_reason(outcome->finish_reason == "length" ? v1::FINISH_REASON_LENGTH
                                                            : v1::FINISH_REASON_STOP);
  v1::Usage* usage = last.mutable_usage();
  usage->set_prompt_tokens(outcome->usage.prompt_tokens);
  usage->set_completion_tokens(outcome->usage.completion_tokens);
  usage->set_total_tokens(outcome->usage.prompt_tokens + outcome->usage.completion_tokens);
  usage->set_accepted_draft_tokens(outcome->usage.accepted_draft_tokens);
  writer->Write(last);
  return grpc::Status::OK;
}

grpc::Status GatewayGrpcService::ListModels(grpc::ServerContext*, const v1::ListModelsRequest*,
                                            v1::ListModelsResponse* response) {
  v1::ModelInfo* m = response->add_models();
  m->set_id(runner_->card().id);
  m->set_max_context(runner_->max_context());
  m->set_owned_by("expertmesh");
  return grpc::Status::OK;
}

}  // namespace expertmesh::gateway
