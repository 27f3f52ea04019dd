#include "gateway/generation.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>

#include "core/base/status.h"
#include "gateway/api_error.h"
#include "gateway/stop_matcher.h"
#include "gateway/strings.h"
#include "spdlog/spdlog.h"

namespace expertmesh::gateway {
namespace {

using SteadyClock = std::chrono::steady_clock;

std::string NextRequestId() {
  static std::atomic<uint64_t> counter{0};
  return Cat("gw-", getpid(), "-", counter.fetch_add(1));
}

double Seconds(SteadyClock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

GatewayMetrics::GatewayMetrics(MetricsRegistry& r)
    : prompt_tokens(r.GetCounter("expertmesh_gateway_prompt_tokens_total",
                                 "Prompt tokens of admitted requests")),
      generation_tokens(r.GetCounter("expertmesh_gateway_generation_tokens_total",
                                     "Tokens generated and streamed back")),
      cancelled(r.GetCounter("expertmesh_gateway_cancelled_total",
                             "Sequences cancelled (client gone, stop string, deadline)")),
      time_to_first_token(r.GetHistogram("expertmesh_gateway_time_to_first_token_seconds",
                                         "Admission to first token", LatencyBucketsSeconds())),
      inter_token_latency(r.GetHistogram("expertmesh_gateway_inter_token_latency_seconds",
                                         "Time between token events of a sequence",
                                         LatencyBucketsSeconds())),
      request_latency(r.GetHistogram("expertmesh_gateway_request_duration_seconds",
                                     "Whole request, admission included", LatencyBucketsSeconds())),
      queue_rejected(r.GetCounter("expertmesh_gateway_queue_rejected_total",
                                  "Requests refused (429 / RESOURCE_EXHAUSTED): admission queue "
                                  "full")),
      queue_time(r.GetHistogram("expertmesh_gateway_queue_time_seconds",
                                "Time a request waited in the admission queue",
                                ExponentialBuckets(0.001, 2.0, 21))),
      registry(r) {}

Counter& GatewayMetrics::Requests(const std::string& api, int status) {
  return registry.GetCounter("expertmesh_gateway_requests_total", "Requests by API and status",
                             {{"api", api}, {"status", std::to_string(status)}});
}

RequestRunner::RequestRunner(const Tokenizer* tokenizer, const ChatTemplate* chat_template,
                             ModelCard card, AttentionPool* pool, Admission* admission,
                             GatewayMetrics* metrics, Options options)
    : tokenizer_(tokenizer),
      chat_template_(chat_template),
      card_(std::move(card)),
      pool_(pool),
      admission_(admission),
      metrics_(metrics),
      options_(options) {}

uint32_t RequestRunner::max_context() const {
  uint32_t reported = pool_ != nullptr ? pool_->max_context() : 0;
  return reported == 0 ? card_.max_context : std::min(reported, card_.max_context);
}

absl::StatusOr<PreparedRequest> RequestRunner::Prepare(GenerationRequest request) const {
  PreparedRequest p;
  std::string_view prompt_param = "prompt";
  if (request.messages.has_value()) {
    prompt_param = "messages";
    if (chat_template_ == nullptr) {
      return InvalidParam("messages", "This model has no chat template; use /v1/completions.");
    }
    boost::json::object extra;  // the template's `tools`; null values kept (chat_template.h)
    if (request.chat.tools.has_value()) extra["tools"] = *request.chat.tools;
    absl::StatusOr<std::string> text = chat_template_->Apply(*request.messages, true, extra, false);
    if (text.ok()) *text += request.chat.forced_prefix;  // a forced tool call (tool_calls.h)
    if (!text.ok()) {
      return InvalidParam("messages", Cat("The chat template rejected the messages: ",
                                          std::string(text.status().message())));
    }
    // The template writes the BOS token itself (as transformers encodes a rendered chat).
    absl::StatusOr<std::vector<int32_t>> ids = tokenizer_->Encode(*text, false);
    if (!ids.ok()) return InvalidParam("messages", std::string(ids.status().message()));
    p.prompt_ids = std::move(*ids);
  } else if (request.prompt_text.has_value()) {
    absl::StatusOr<std::vector<int32_t>> ids =
        tokenizer_->Encode(*request.prompt_text, tokenizer_->bos_id().has_value());
    if (!ids.ok()) return InvalidParam("prompt", std::string(ids.status().message()));
    p.prompt_ids = std::move(*ids);
  } else if (request.prompt_token_ids.has_value()) {
    p.prompt_ids = *request.prompt_token_ids;
  }
  if (p.prompt_ids.empty()) return InvalidParam(prompt_param, "The prompt is empty.");
  const int32_t vocab = tokenizer_->vocab_size();
  for (int32_t id : p.prompt_ids) {
    if (id < 0 || id >= vocab) {
      return InvalidParam(prompt_param,
                          Cat("Token id ", id, " is outside the vocabulary (size ", vocab, ")."));
    }
  }
  for (int32_t id : request.stop_token_ids) {
    if (id < 0 || id >= vocab) {
      return InvalidParam("stop_token_ids",
                          Cat("Token id ", id, " is outside the vocabulary (size ", vocab, ")."));
    }
  }
  const uint32_t context = max_context();
  const size_t prompt_tokens = p.prompt_ids.size();
  if (prompt_tokens >= context ||
      (request.max_tokens.has_value() && prompt_tokens + *request.max_tokens > context)) {
    std::string asked =
        request.max_tokens.has_value()
            ? Cat("you requested ", prompt_tokens + *request.max_tokens, " tokens (", prompt_tokens,
                  " in the ", prompt_param, ", ", *request.max_tokens, " in the completion)")
            : Cat("your ", prompt_param, " resulted in ", prompt_tokens, " tokens");
    return WithCode(InvalidParam(prompt_param, Cat("This model's maximum context length is ",
                                                   context, " tokens. However, ", asked,
                                                   ". Please reduce the length of the ",
                                                   prompt_param, " or the completion.")),
                    "context_length_exceeded");
  }
  p.max_tokens = request.max_tokens.value_or(context - static_cast<uint32_t>(prompt_tokens));
  p.request = std::move(request);
  p.request_id = NextRequestId();
  return p;
}

TokenLogprob RequestRunner::MakeLogprob(int32_t id, float logprob,
                                        const v1::TopLogprobs* top) const {
  TokenLogprob lp;
  lp.token_id = id;
  lp.token = tokenizer_->Decode(std::span<const int32_t>(&id, 1), false);
  lp.logprob = logprob;
  if (top != nullptr) {
    for (const v1::TopLogprob& e : top->entries()) {
      const int32_t tid = e.token_id();
      lp.top.push_back(
          {tid, tokenizer_->Decode(std::span<const int32_t>(&tid, 1), false), e.logprob()});
    }
  }
  return lp;
}

v1::SubmitRequest RequestRunner::BuildSubmit(const PreparedRequest& p,
                                             SteadyClock::time_point deadline) {
  const GenerationRequest& r = p.request;
  v1::SubmitRequest submit;
  submit.set_request_id(p.request_id);
  submit.mutable_prompt_token_ids()->Add(p.prompt_ids.begin(), p.prompt_ids.end());
  v1::SamplingParams* s = submit.mutable_sampling();
  s->set_temperature(r.sampling.temperature);
  s->set_top_p(r.sampling.top_p);
  s->set_top_k(r.sampling.top_k);
  if (r.sampling.seed.has_value()) {
    s->set_seed(*r.sampling.seed);
    s->set_has_seed(true);
  }
  s->set_presence_penalty(r.sampling.presence_penalty);
  s->set_frequency_penalty(r.sampling.frequency_penalty);
  s->set_logprobs(r.sampling.logprobs);
  s->set_top_logprobs(r.sampling.top_logprobs);
  submit.set_max_tokens(p.max_tokens);
  submit.mutable_stop_token_ids()->Add(r.stop_token_ids.begin(), r.stop_token_ids.end());
  submit.set_ignore_eos(r.ignore_eos);
  submit.set_priority(r.priority);
  const auto remaining =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - SteadyClock::now());
  submit.set_deadline_ms(std::max<int64_t>(1, remaining.count()));
  return submit;
}

// Token events -> text deltas: incremental detokenization, stop strings, and the token that
// ended the sequence (EOS or a stop token) left out of the text.
class RequestRunner::EventDecoder {
 public:
  EventDecoder(const RequestRunner& runner, const GenerationRequest& r)
      : runner_(runner),
        r_(r),
        decoder_(runner.tokenizer_->NewStreamDecoder(r.skip_special_tokens)),
        stops_(r.stop),
        stop_ids_(r.stop_token_ids) {
    if (!r.ignore_eos) {
      for (int32_t e : runner.card_.defaults.eos_token_ids) stop_ids_.push_back(e);
      if (runner.tokenizer_->eos_id().has_value())
        stop_ids_.push_back(*runner.tokenizer_->eos_id());
    }
  }

  // Appends the event's tokens to `delta`; returns how many tokens it consumed.
  uint32_t Decode(const v1::TokenEvent& event, v1::FinishReason finish, Delta& delta) {
    uint32_t consumed = 0;
    const int n = event.token_ids_size();
    for (int i = 0; i < n && !stops_.stopped(); ++i) {
      const int32_t id = event.token_ids(i);
      ++consumed;
      if (finish == v1::FINISH_REASON_STOP && i == n - 1 && IsStopToken(id)) break;
      delta.text += stops_.Push(decoder_.Push(id));
      delta.token_ids.push_back(id);
      if (r_.sampling.logprobs && i < event.logprobs_size()) {
        delta.logprobs.push_back(
            runner_.MakeLogprob(id, event.logprobs(i),
                                i < event.top_logprobs_size() ? &event.top_logprobs(i) : nullptr));
      }
    }
    return consumed;
  }
  // The sequence ended: the held-back bytes and stop-string tail.
  void Finish(Delta& delta) {
    delta.text += stops_.Push(decoder_.Flush());
    delta.text += stops_.Finish();
  }
  bool stopped() const { return stops_.stopped(); }
  std::optional<std::string> matched() const {
    return stops_.stopped() ? std::optional<std::string>(stops_.matched()) : std::nullopt;
  }

 private:
  bool IsStopToken(int32_t id) const {
    return std::find(stop_ids_.begin(), stop_ids_.end(), id) != stop_ids_.end();
  }
  const RequestRunner& runner_;
  const GenerationRequest& r_;
  Tokenizer::StreamDecoder decoder_;
  StopMatcher stops_;
  std::vector<int32_t> stop_ids_;
};

absl::StatusOr<Outcome> RequestRunner::Run(const PreparedRequest& p, GenerationSink& sink) const {
  const auto start = SteadyClock::now();
  auto timeout = std::chrono::duration_cast<SteadyClock::duration>(options_.default_timeout);
  if (const auto client = sink.ClientDeadline()) {
    timeout = std::min(timeout, std::chrono::duration_cast<SteadyClock::duration>(
                                    *client - std::chrono::system_clock::now()));
  }
  const auto steady_deadline = start + timeout;
  const auto wall_deadline = std::chrono::system_clock::now() + timeout;

  // 1. Admission (priority, fair share by client, cost prompt + max_tokens), then the Submit
  // stream to an attention replica.
  const Admission::Entry entry{.priority = p.request.priority,
                               .tokens = p.prompt_ids.size() + uint64_t{p.max_tokens},
                               .client = p.request.client};
  absl::StatusOr<Admission::Ticket> ticket =
      admission_->Enter(entry, steady_deadline, [&sink] { return sink.ClientGone(); });
  if (!ticket.ok()) {
    if (ticket.status().code() == absl::StatusCode::kResourceExhausted) {
      metrics_->queue_rejected.Inc();
    }
    return ticket.status();
  }
  metrics_->queue_time.Observe(Seconds(SteadyClock::now() - start));
  EM_ASSIGN_OR_RETURN(std::unique_ptr<SubmitCall> call,
                      pool_->Submit(BuildSubmit(p, steady_deadline), wall_deadline));

  // 2. Events -> deltas until the sequence ends, a stop string matches or the client leaves.
  EventDecoder decoder(*this, p.request);
  Outcome outcome;
  outcome.usage.prompt_tokens = static_cast<uint32_t>(p.prompt_ids.size());
  uint32_t received = 0;
  auto last_event = start;
  const auto deliver = [&](const Delta& delta) {
    if (delta.text.empty() && delta.token_ids.empty()) return true;
    return sink.OnDelta(delta);
  };
  v1::TokenEvent event;
  v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
  bool client_gone = false;
  while (call->Read(&event)) {
    const auto now = SteadyClock::now();
    if (received == 0) {
      metrics_->time_to_first_token.Observe(Seconds(now - start));
    } else {
      metrics_->inter_token_latency.Observe(Seconds(now - last_event));
    }
    last_event = now;
    finish = event.finish_reason();
    Delta delta;
    received += decoder.Decode(event, finish, delta);
    if (event.accepted_draft_tokens() > 0) {
      outcome.usage.accepted_draft_tokens = event.accepted_draft_tokens();
    }
    if (decoder.stopped()) {
      outcome.stop_string = decoder.matched();
      finish = v1::FINISH_REASON_STOP;
      call->Cancel();  // the rest of the sequence is not needed
      metrics_->cancelled.Inc();
      deliver(delta);
      break;
    }
    if (finish != v1::FINISH_REASON_UNSPECIFIED) {
      decoder.Finish(delta);
      outcome.stop_string = decoder.matched();
    }
    if (!deliver(delta) || sink.ClientGone()) {
      client_gone = true;
      break;
    }
    if (finish != v1::FINISH_REASON_UNSPECIFIED) break;
  }
  metrics_->generation_tokens.Inc(received);
  metrics_->prompt_tokens.Inc(static_cast<double>(p.prompt_ids.size()));
  metrics_->request_latency.Observe(Seconds(SteadyClock::now() - start));
  // 3. How it ended.
  return Conclude(p, *call, finish, client_gone, received, std::move(outcome));
}

absl::StatusOr<Outcome> RequestRunner::Conclude(const PreparedRequest& p, SubmitCall& call,
                                                v1::FinishReason finish, bool client_gone,
                                                uint32_t received, Outcome outcome) const {
  if (client_gone) {
    call.Cancel();
    metrics_->cancelled.Inc();
    return absl::CancelledError("The client disconnected.");
  }
  if (finish == v1::FINISH_REASON_UNSPECIFIED) {
    // The stream ended without a final event: its status says why.
    absl::Status status = call.Finish();
    if (status.ok()) status = absl::InternalError("The attention service ended the stream early.");
    spdlog::warn("request {} failed after {} tokens: {}", p.request_id, received, status);
    return status;
  }
  if (finish == v1::FINISH_REASON_ERROR || finish == v1::FINISH_REASON_CANCELLED) {
    call.Cancel();
    return absl::InternalError(
        Cat("The attention service ended the sequence (", v1::FinishReason_Name(finish), ")."));
  }
  if (!outcome.stop_string.has_value()) {
    // A normal end: the replica closes the stream after its final event.
    v1::TokenEvent event;
    while (call.Read(&event)) {
    }
    absl::Status status = call.Finish();
    if (!status.ok()) spdlog::debug("request {}: {}", p.request_id, status);
  }
  outcome.finish_reason = finish == v1::FINISH_REASON_LENGTH ? "length" : "stop";
  outcome.usage.completion_tokens = received;
  return outcome;
}

}  // namespace expertmesh::gateway
