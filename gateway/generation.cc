#include "gateway/generation.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

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
                                             SteadyClock::time_point deadline,
                                             std::optional<uint32_t> index) {
  const GenerationRequest& r = p.request;
  v1::SubmitRequest submit;
  submit.set_request_id(index.has_value() ? Cat(p.request_id, "-", *index) : p.request_id);
  submit.mutable_prompt_token_ids()->Add(p.prompt_ids.begin(), p.prompt_ids.end());
  v1::SamplingParams* s = submit.mutable_sampling();
  s->set_temperature(r.sampling.temperature);
  s->set_top_p(r.sampling.top_p);
  s->set_top_k(r.sampling.top_k);
  if (r.sampling.seed.has_value()) {
    s->set_seed(*r.sampling.seed + index.value_or(0));
    s->set_has_seed(true);
  }
  s->set_presence_penalty(r.sampling.presence_penalty);
  s->set_frequency_penalty(r.sampling.frequency_penalty);
  // best_of ranks the choices by their cumulative logprob.
  s->set_logprobs(r.sampling.logprobs || r.best_of > r.n);
  s->set_top_logprobs(r.sampling.top_logprobs);
  submit.set_max_tokens(p.max_tokens);
  submit.mutable_stop_token_ids()->Add(r.stop_token_ids.begin(), r.stop_token_ids.end());
  submit.set_ignore_eos(r.ignore_eos);
  submit.set_priority(r.priority);
  if (r.json_object) submit.set_response_format(v1::RESPONSE_FORMAT_JSON_OBJECT);
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

  // 1. Admission (priority, fair share by client, cost (prompt + max_tokens) per sequence),
  // then the Submit stream to an attention replica.
  const uint32_t sequences = std::max(p.request.best_of, p.request.n);
  const Admission::Entry entry{.priority = p.request.priority,
                               .tokens = (p.prompt_ids.size() + uint64_t{p.max_tokens}) * sequences,
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
  if (sequences > 1) return RunChoices(p, sink, start, steady_deadline, wall_deadline);
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

// One choice of several: its stream, read on a thread of its own into the shared queue.
namespace {

struct ChoiceEvent {
  uint32_t choice = 0;
  std::optional<v1::TokenEvent> event;  // nullopt: the stream ended
};

// The events of every choice's stream, in arrival order. Bounded: a reader waits while it
// is full, until the queue is closed (then events are dropped).
class ChoiceQueue {
 public:
  explicit ChoiceQueue(size_t capacity) : capacity_(capacity) {}
  void Push(ChoiceEvent e) {
    std::unique_lock lock(mu_);
    space_.wait(lock, [&] { return closed_ || events_.size() < capacity_; });
    if (closed_) return;
    events_.push_back(std::move(e));
    ready_.notify_one();
  }
  // The next event, waiting up to `timeout`; nullopt on timeout.
  std::optional<ChoiceEvent> Pop(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu_);
    if (!ready_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return std::nullopt;
    ChoiceEvent e = std::move(events_.front());
    events_.pop_front();
    space_.notify_one();
    return e;
  }
  void Close() {
    std::lock_guard lock(mu_);
    closed_ = true;
    events_.clear();
    space_.notify_all();
  }

 private:
  const size_t capacity_;
  std::mutex mu_;
  std::condition_variable ready_, space_;
  std::deque<ChoiceEvent> events_;
  bool closed_ = false;
};

}  // namespace

absl::StatusOr<Outcome> RequestRunner::RunChoices(
    const PreparedRequest& p, GenerationSink& sink, SteadyClock::time_point start,
    SteadyClock::time_point steady_deadline,
    std::chrono::system_clock::time_point wall_deadline) const {
  const GenerationRequest& r = p.request;
  const uint32_t total = std::max(r.best_of, r.n);
  const bool ranked = total > r.n;  // best_of: deltas held until every choice has ended
  struct Choice {
    std::unique_ptr<SubmitCall> call;
    std::unique_ptr<EventDecoder> decoder;
    std::thread reader;
    uint32_t received = 0;
    uint32_t accepted_drafts = 0;
    double cumulative_logprob = 0;
    bool ended = false;
    v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
    std::optional<std::string> stop_string;
    std::vector<Delta> held;  // ranked: the deltas, delivered once the best are known
  };
  std::vector<Choice> choices(total);
  ChoiceQueue queue(64 * size_t{total});
  // Every stream is cancelled and every reader joined on the way out, however it ends.
  struct Cleanup {
    std::vector<Choice>& choices;
    ChoiceQueue& queue;
    ~Cleanup() {
      for (Choice& c : choices) {
        if (c.call != nullptr && !c.ended) c.call->Cancel();
      }
      queue.Close();
      for (Choice& c : choices) {
        if (c.reader.joinable()) c.reader.join();
      }
    }
  } cleanup{choices, queue};
  const auto open = [&](uint32_t i) -> absl::Status {
    EM_ASSIGN_OR_RETURN(choices[i].call,
                        pool_->Submit(BuildSubmit(p, steady_deadline, i), wall_deadline));
    choices[i].decoder = std::make_unique<EventDecoder>(*this, r);
    SubmitCall* call = choices[i].call.get();
    choices[i].reader = std::thread([call, i, &queue] {
      v1::TokenEvent event;
      while (call->Read(&event)) queue.Push({i, event});
      queue.Push({i, std::nullopt});
    });
    return absl::OkStatus();
  };
  EM_RETURN_IF_ERROR(open(0));
  bool opened_rest = false;

  const auto deliver = [&](Choice& c, Delta delta) {
    if (delta.text.empty() && delta.token_ids.empty() && !delta.finish_reason.has_value()) {
      return true;
    }
    if (ranked) {
      c.held.push_back(std::move(delta));
      return true;
    }
    return sink.OnDelta(delta);
  };
  Outcome outcome;
  outcome.usage.prompt_tokens = static_cast<uint32_t>(p.prompt_ids.size());
  uint32_t ended = 0, received_all = 0;
  bool first = true, client_gone = false;
  absl::Status failure;
  auto last_event = start;
  while (ended < total) {
    std::optional<ChoiceEvent> next = queue.Pop(std::chrono::milliseconds(100));
    if (!next.has_value()) {
      if (sink.ClientGone()) {
        client_gone = true;
        break;
      }
      continue;
    }
    const uint32_t i = next->choice;
    Choice& c = choices[i];
    if (c.ended) continue;  // the rest of a stream cut at a stop string
    if (!next->event.has_value()) {
      // The stream ended without a final event: its status says why.
      absl::Status status = c.call->Finish();
      failure = status.ok() ? absl::InternalError("The attention service ended the stream early.")
                            : status;
      spdlog::warn("request {} choice {} failed after {} tokens: {}", p.request_id, i, c.received,
                   failure);
      break;
    }
    const v1::TokenEvent& event = *next->event;
    const auto now = SteadyClock::now();
    if (first) {
      metrics_->time_to_first_token.Observe(Seconds(now - start));
      first = false;
    } else {
      metrics_->inter_token_latency.Observe(Seconds(now - last_event));
    }
    last_event = now;
    if (i == 0 && !opened_rest) {
      // The first choice's prompt is in the cache now: the others share its full blocks.
      opened_rest = true;
      for (uint32_t j = 1; j < total && failure.ok(); ++j) failure = open(j);
      if (!failure.ok()) break;
    }
    v1::FinishReason finish = event.finish_reason();
    if (finish == v1::FINISH_REASON_ERROR || finish == v1::FINISH_REASON_CANCELLED) {
      failure = absl::InternalError(
          Cat("The attention service ended the sequence (", v1::FinishReason_Name(finish), ")."));
      break;
    }
    Delta delta;
    delta.index = i;
    const uint32_t consumed = c.decoder->Decode(event, finish, delta);
    for (int k = 0; k < event.logprobs_size() && k < static_cast<int>(consumed); ++k) {
      c.cumulative_logprob += event.logprobs(k);
    }
    c.received += consumed;
    received_all += consumed;
    if (event.accepted_draft_tokens() > 0) c.accepted_drafts = event.accepted_draft_tokens();
    if (c.decoder->stopped()) {
      finish = v1::FINISH_REASON_STOP;
      c.call->Cancel();  // the rest of this choice is not needed
      metrics_->cancelled.Inc();
    } else if (finish != v1::FINISH_REASON_UNSPECIFIED) {
      c.decoder->Finish(delta);
    }
    if (finish != v1::FINISH_REASON_UNSPECIFIED) {
      c.ended = true;
      c.finish = finish;
      c.stop_string = c.decoder->matched();
      ++ended;
    }
    bool ok = deliver(c, std::move(delta));
    if (ok && c.ended && ended < total) {
      Delta end;
      end.index = i;
      end.finish_reason = finish == v1::FINISH_REASON_LENGTH ? "length" : "stop";
      ok = deliver(c, std::move(end));
    }
    if (c.ended && ended == total) outcome.index = i;
    if (!ok || sink.ClientGone()) {
      client_gone = true;
      break;
    }
  }
  metrics_->generation_tokens.Inc(received_all);
  metrics_->prompt_tokens.Inc(static_cast<double>(p.prompt_ids.size()));
  metrics_->request_latency.Observe(Seconds(SteadyClock::now() - start));
  if (client_gone) {
    metrics_->cancelled.Inc(total - ended);
    return absl::CancelledError("The client disconnected.");
  }
  if (!failure.ok()) return failure;

  // The choices returned: all of them, or (best_of) the n best by cumulative logprob, best
  // first as vLLM orders them, renumbered 0..n-1.
  std::vector<uint32_t> order(total);
  for (uint32_t i = 0; i < total; ++i) order[i] = i;
  if (ranked) {
    std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
      return choices[a].cumulative_logprob > choices[b].cumulative_logprob;
    });
    order.resize(r.n);
    for (uint32_t j = 0; j < r.n; ++j) {
      Choice& c = choices[order[j]];
      for (Delta& d : c.held) {
        d.index = j;
        if (d.finish_reason.has_value()) continue;  // re-sent below, in the new order
        if (!sink.OnDelta(d)) return absl::CancelledError("The client disconnected.");
      }
      if (j + 1 < r.n) {
        Delta end;
        end.index = j;
        end.finish_reason = c.finish == v1::FINISH_REASON_LENGTH ? "length" : "stop";
        if (!sink.OnDelta(end)) return absl::CancelledError("The client disconnected.");
      }
    }
    outcome.index = r.n - 1;
  }
  const Choice& last = choices[order[outcome.index]];
  outcome.finish_reason = last.finish == v1::FINISH_REASON_LENGTH ? "length" : "stop";
  outcome.stop_string = last.stop_string;
  for (uint32_t i : order) {
    outcome.usage.completion_tokens += choices[i].received;
    outcome.usage.accepted_draft_tokens += choices[i].accepted_drafts;
  }
  return outcome;
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
