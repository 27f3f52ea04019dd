#include "gateway/openai_parse.h"

#include <cmath>
#include <initializer_list>
#include <limits>

#include <boost/json.hpp>

#include "core/base/json.h"
#include "core/base/status.h"
#include "gateway/api_error.h"
#include "gateway/strings.h"
#include "gateway/tool_calls.h"

namespace expertmesh::gateway {
namespace json = boost::json;
namespace {

// Reads the typed fields of one JSON object; null counts as absent (OpenAI's convention).
class Fields {
 public:
  explicit Fields(const json::object& object) : object_(object) {}

  // OpenAI answers an unknown argument with 400 "Unrecognized request argument supplied".
  absl::Status RejectUnknown(std::initializer_list<std::string_view> allowed) const {
    for (const auto& kv : object_) {
      bool known = false;
      for (std::string_view name : allowed) known = known || kv.key() == name;
      if (!known) {
        const std::string key(kv.key());
        return InvalidParam(key, Cat("Unrecognized request argument supplied: ", key));
      }
    }
    return absl::OkStatus();
  }

  const json::value* Get(std::string_view key) const { return json_field::Find(object_, key); }

  absl::Status String(std::string_view key, std::optional<std::string>* out) const {
    return Read(key, out, json_field::AsString, "a string");
  }

  absl::Status Bool(std::string_view key, bool* out) const {
    std::optional<bool> b;
    EM_RETURN_IF_ERROR(Read(key, &b, json_field::AsBool, "a boolean"));
    if (b) *out = *b;
    return absl::OkStatus();
  }

  absl::Status Number(std::string_view key, std::optional<double>* out) const {
    return Read(key, out, json_field::AsNumber, "a number");
  }

  absl::Status Integer(std::string_view key, std::optional<int64_t>* out) const {
    const json::value* v = Get(key);
    if (v != nullptr && v->is_uint64() && !json_field::AsInt64(*v)) {
      return InvalidParam(key, Cat(key, " is too large"));
    }
    return Read(key, out, json_field::AsInt64, "an integer");
  }

  static absl::Status TypeError(std::string_view key, std::string_view expected) {
    return InvalidParam(key, Cat("Invalid type for '", key, "': expected ", expected, "."));
  }

 private:
  template <typename T, typename Convert>
  absl::Status Read(std::string_view key, std::optional<T>* out, Convert convert,
                    std::string_view expected) const {
    const json::value* v = Get(key);
    if (v == nullptr) return absl::OkStatus();
    std::optional<T> value = convert(*v);
    if (!value) return TypeError(key, expected);
    *out = *std::move(value);
    return absl::OkStatus();
  }

  const json::object& object_;
};

absl::StatusOr<json::object> ParseBody(std::string_view body) {
  if (!IsValidUtf8(body)) {
    return absl::InvalidArgumentError("The request body is not valid UTF-8.");
  }
  json::parse_options options;
  options.max_depth = 64;
  boost::system::error_code ec;
  json::value value = json::parse(body, ec, json::storage_ptr(), options);
  if (ec) {
    return absl::InvalidArgumentError(
        Cat("We could not parse the JSON body of your request: ", ec.message(), "."));
  }
  if (!value.is_object()) {
    return absl::InvalidArgumentError("The request body must be a JSON object.");
  }
  return std::move(value.as_object());
}

absl::Status ParseTokenIdList(const json::array& array, std::string_view param,
                              std::vector<int32_t>* out) {
  out->clear();
  out->reserve(array.size());
  for (size_t i = 0; i < array.size(); ++i) {
    const json::value& v = array[i];
    int64_t id = -1;
    if (v.is_int64()) {
      id = v.get_int64();
    } else if (v.is_uint64()) {
      id = std::numeric_limits<int64_t>::max();
    } else {
      return InvalidParam(
          param, Cat("Invalid type for '", param, "[", i, "]': expected an integer token id."));
    }
    if (id < 0 || id > std::numeric_limits<int32_t>::max()) {
      return InvalidParam(param, Cat("Token id ", id, " in '", param, "' is out of range."));
    }
    out->push_back(static_cast<int32_t>(id));
  }
  return absl::OkStatus();
}

// `stop`: a string or a list of strings.
absl::Status ParseStop(const Fields& f, std::vector<std::string>* out) {
  const json::value* v = f.Get("stop");
  if (v == nullptr) return absl::OkStatus();
  if (v->is_string()) {
    out->push_back(std::string(v->get_string()));
    return absl::OkStatus();
  }
  if (!v->is_array()) return Fields::TypeError("stop", "a string or an array of strings");
  for (const json::value& s : v->get_array()) {
    if (!s.is_string()) return Fields::TypeError("stop", "a string or an array of strings");
    out->push_back(std::string(s.get_string()));
  }
  return absl::OkStatus();
}

// Fields both endpoints share: sampling, stop, n, streaming, extensions (vLLM's names).
absl::Status ParseCommon(const Fields& f, const ModelCard& card, const RequestLimits& limits,
                         GenerationRequest* r) {
  std::optional<std::string> model;
  EM_RETURN_IF_ERROR(f.String("model", &model));
  if (!model.has_value()) return InvalidParam("model", "you must provide a model parameter");
  if (*model != card.id) return UnknownModel(*model);
  r->model = *model;

  std::optional<int64_t> n;
  EM_RETURN_IF_ERROR(f.Integer("n", &n));
  const uint32_t max_choices = limits.max_choices;
  if (n.has_value()) {
    if (*n < 1 || *n > max_choices) {
      return InvalidParam("n",
                          Cat("n must be an integer in [1, ", max_choices, "], got ", *n, "."));
    }
    r->n = static_cast<uint32_t>(*n);
  }
  r->best_of = r->n;
  std::optional<int64_t> best_of;
  EM_RETURN_IF_ERROR(f.Integer("best_of", &best_of));
  if (best_of.has_value()) {
    if (*best_of < 1 || *best_of > max_choices) {
      return InvalidParam("best_of", Cat("best_of must be an integer in [1, ", max_choices,
                                         "], got ", *best_of, "."));
    }
    if (*best_of < r->n) {
      return InvalidParam("best_of", Cat("best_of must be greater than or equal to n, got n = ",
                                         r->n, " and best_of = ", *best_of, "."));
    }
    r->best_of = static_cast<uint32_t>(*best_of);
  }
  if (const json::value* bias = f.Get("logit_bias"); bias != nullptr) {
    if (!bias->is_object()) return Fields::TypeError("logit_bias", "an object");
    if (!bias->get_object().empty()) {
      return InvalidParam("logit_bias", "logit_bias is not supported.");
    }
  }
  std::optional<std::string> user;
  EM_RETURN_IF_ERROR(f.String("user", &user));

  SamplingOptions& s = r->sampling;
  const GenerationDefaults& d = card.defaults;
  std::optional<double> temperature, top_p, presence, frequency;
  EM_RETURN_IF_ERROR(f.Number("temperature", &temperature));
  EM_RETURN_IF_ERROR(f.Number("top_p", &top_p));
  EM_RETURN_IF_ERROR(f.Number("presence_penalty", &presence));
  EM_RETURN_IF_ERROR(f.Number("frequency_penalty", &frequency));
  s.temperature = static_cast<float>(temperature.value_or(d.temperature));
  s.top_p = static_cast<float>(top_p.value_or(d.top_p));
  s.presence_penalty = static_cast<float>(presence.value_or(0.0));
  s.frequency_penalty = static_cast<float>(frequency.value_or(0.0));
  std::optional<int64_t> top_k, seed;
  EM_RETURN_IF_ERROR(f.Integer("top_k", &top_k));
  EM_RETURN_IF_ERROR(f.Integer("seed", &seed));
  if (top_k.has_value()) {
    if (*top_k < -1 || *top_k > std::numeric_limits<int32_t>::max()) {
      return InvalidParam("top_k", "top_k must be -1 (off), 0 (off) or a positive integer.");
    }
    s.top_k = *top_k < 0 ? 0 : static_cast<int32_t>(*top_k);
  } else {
    s.top_k = d.top_k;
  }
  if (seed.has_value()) s.seed = static_cast<uint64_t>(*seed);

  EM_RETURN_IF_ERROR(ParseStop(f, &r->stop));
  if (const json::value* ids = f.Get("stop_token_ids"); ids != nullptr) {
    if (!ids->is_array()) return Fields::TypeError("stop_token_ids", "an array of integers");
    EM_RETURN_IF_ERROR(ParseTokenIdList(ids->get_array(), "stop_token_ids", &r->stop_token_ids));
  }
  EM_RETURN_IF_ERROR(f.Bool("ignore_eos", &r->ignore_eos));
  EM_RETURN_IF_ERROR(f.Bool("skip_special_tokens", &r->skip_special_tokens));
  std::optional<int64_t> priority;
  EM_RETURN_IF_ERROR(f.Integer("priority", &priority));
  if (priority.has_value()) {
    // Out of int32 here; the range itself is checked in ValidateGenerationRequest.
    if (*priority < std::numeric_limits<int32_t>::min() ||
        *priority > std::numeric_limits<int32_t>::max()) {
      const int32_t max = RequestLimits{}.max_abs_priority;
      return InvalidParam("priority", Cat("priority must be an integer in [", -max, ", ", max,
                                          "] (lower is served earlier), got ", *priority, "."));
    }
    r->priority = static_cast<int32_t>(*priority);
  }

  EM_RETURN_IF_ERROR(f.Bool("stream", &r->stream));
  if (r->stream && r->best_of > r->n) {
    return InvalidParam("best_of",
                        "best_of > n is not supported with stream (the best choices "
                        "are known only when every one has ended).");
  }
  if (const json::value* so = f.Get("stream_options"); so != nullptr) {
    if (!so->is_object()) return Fields::TypeError("stream_options", "an object");
    if (!r->stream) {
      return InvalidParam("stream_options",
                          "The 'stream_options' parameter is only allowed when 'stream' is "
                          "enabled.");
    }
    Fields sf(so->get_object());
    absl::Status unknown = sf.RejectUnknown({"include_usage"});
    if (!unknown.ok()) {
      return InvalidParam("stream_options",
                          Cat("Unrecognized stream option: ", std::string(unknown.message())));
    }
    EM_RETURN_IF_ERROR(sf.Bool("include_usage", &r->include_usage));
  }
  return absl::OkStatus();
}

// response_format: {"type": "text"} or {"type": "json_object"} (JSON mode, enforced while
// decoding); json_schema is refused.
absl::Status ParseResponseFormat(const Fields& f, GenerationRequest* r) {
  const json::value* rf = f.Get("response_format");
  if (rf == nullptr || rf->is_null()) return absl::OkStatus();
  if (!rf->is_object()) return Fields::TypeError("response_format", "an object");
  Fields rff(rf->get_object());
  absl::Status unknown = rff.RejectUnknown({"type", "json_schema"});
  if (!unknown.ok()) {
    return InvalidParam("response_format", Cat("Unrecognized response_format field: ",
                                               std::string(unknown.message())));
  }
  std::optional<std::string> type;
  EM_RETURN_IF_ERROR(rff.String("type", &type));
  if (!type.has_value()) return InvalidParam("response_format", "response_format needs a type.");
  if (*type == "text") return absl::OkStatus();
  if (*type == "json_object") {
    r->json_object = true;
    return absl::OkStatus();
  }
  if (*type == "json_schema") {
    return InvalidParam("response_format",
                        "response_format json_schema is not supported; use json_object.");
  }
  return InvalidParam(
      "response_format",
      Cat("response_format type must be 'text' or 'json_object', got '", *type, "'."));
}

absl::Status ParseMaxTokens(const Fields& f, std::string_view key, GenerationRequest* r) {
  std::optional<int64_t> max_tokens;
  EM_RETURN_IF_ERROR(f.Integer(key, &max_tokens));
  if (!max_tokens.has_value()) return absl::OkStatus();
  if (*max_tokens < 1) {
    return InvalidParam(key, Cat(key, " must be at least 1, got ", *max_tokens, "."));
  }
  if (*max_tokens > std::numeric_limits<uint32_t>::max()) {
    return InvalidParam(key, Cat(key, " is too large."));
  }
  r->max_tokens = static_cast<uint32_t>(*max_tokens);
  return absl::OkStatus();
}

// The prompt of /v1/completions: a string, a list of one string, a list of token ids, or a
// list of one list of token ids. Batches (several prompts) are rejected: n = 1 per request.
absl::Status ParsePrompt(const Fields& f, GenerationRequest* r) {
  const json::value* v = f.Get("prompt");
  if (v == nullptr) return InvalidParam("prompt", "you must provide a prompt parameter");
  if (v->is_string()) {
    r->prompt_text = std::string(v->get_string());
    return absl::OkStatus();
  }
  if (!v->is_array()) {
    return Fields::TypeError("prompt",
                             "a string, an array of token ids, or an array of one "
                             "string");
  }
  const json::array& a = v->get_array();
  if (a.empty()) return InvalidParam("prompt", "The prompt must not be empty.");
  if (a[0].is_string() || a[0].is_array()) {
    if (a.size() != 1) {
      return InvalidParam("prompt",
                          "Batched prompts are not supported: send one prompt per "
                          "request.");
    }
    if (a[0].is_string()) {
      r->prompt_text = std::string(a[0].get_string());
      return absl::OkStatus();
    }
    std::vector<int32_t> ids;
    EM_RETURN_IF_ERROR(ParseTokenIdList(a[0].get_array(), "prompt", &ids));
    r->prompt_token_ids = std::move(ids);
    return absl::OkStatus();
  }
  std::vector<int32_t> ids;
  EM_RETURN_IF_ERROR(ParseTokenIdList(a, "prompt", &ids));
  r->prompt_token_ids = std::move(ids);
  return absl::OkStatus();
}

// One chat message -> {"role", "content": string, tool fields}. Content may be a string, a
// list of text parts (joined with "\n", as vLLM does) or null for an assistant's tool call.
absl::StatusOr<json::object> NormalizeMessage(const json::value& value, size_t index) {
  const std::string at = Cat("messages[", index, "]");
  if (!value.is_object()) return InvalidParam(at, Cat(at, " must be an object."));
  const json::object& m = value.get_object();
  Fields f(m);
  absl::Status unknown = f.RejectUnknown(
      {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"});
  if (!unknown.ok()) {
    return InvalidParam(at, Cat(at, ": ", std::string(unknown.message())));
  }
  std::optional<std::string> role;
  if (absl::Status s = f.String("role", &role); !s.ok()) {
    return InvalidParam(Cat(at, ".role"), std::string(s.message()));
  }
  if (!role.has_value()) {
    return InvalidParam(Cat(at, ".role"), Cat(at, " has no role."));
  }
  if (*role == "developer") role = "system";
  if (*role != "system" && *role != "user" && *role != "assistant" && *role != "tool") {
    return InvalidParam(Cat(at, ".role"),
                        Cat("Invalid role '", *role, "' in ", at,
                            ": expected system, developer, user, assistant or tool."));
  }
  json::object out;
  out["role"] = *role;
  const json::value* content = f.Get("content");
  std::string text;
  if (content == nullptr) {
    if (*role != "assistant" || f.Get("tool_calls") == nullptr) {
      return InvalidParam(Cat(at, ".content"), Cat(at, " must have content."));
    }
  } else if (content->is_string()) {
    text = std::string(content->get_string());
  } else if (content->is_array()) {
    for (size_t i = 0; i < content->get_array().size(); ++i) {
      const json::value& part = content->get_array()[i];
      const std::string part_at = Cat(at, ".content[", i, "]");
      const json::object* po = part.if_object();
      const json::value* type = po ? po->if_contains("type") : nullptr;
      const json::value* part_text = po ? po->if_contains("text") : nullptr;
      if (type == nullptr || !type->is_string() || type->get_string() != "text" ||
          part_text == nullptr || !part_text->is_string()) {
        return InvalidParam(part_at, Cat(part_at,
                                         " must be a text part {\"type\": "
                                         "\"text\", \"text\": string}; only "
                                         "text content is supported."));
      }
      if (i > 0) text += "\n";
      text += std::string(part_text->get_string());
    }
  } else {
    return Fields::TypeError(Cat(at, ".content"), "a string or an array of parts");
  }
  // An assistant's tool call has null content, which DeepSeek's templates test for (`content is
  // none`) to render the call; empty content with tool calls is the same message.
  const json::value* calls = f.Get("tool_calls");
  const bool has_calls =
      *role == "assistant" && calls != nullptr && calls->is_array() && !calls->get_array().empty();
  if (has_calls && text.empty()) {
    out["content"] = nullptr;
  } else {
    out["content"] = text;
  }
  for (std::string_view key : {"name", "tool_call_id", "reasoning_content"}) {
    std::optional<std::string> s;
    if (absl::Status st = f.String(key, &s); !st.ok()) {
      return InvalidParam(Cat(at, ".", key), std::string(st.message()));
    }
    if (s.has_value()) out[key] = *s;
  }
  if (calls != nullptr) {
    if (*role != "assistant") {
      return InvalidParam(Cat(at, ".tool_calls"),
                          Cat(at, ": only assistant messages have tool_calls."));
    }
    EM_ASSIGN_OR_RETURN(json::array normalized, NormalizeToolCalls(*calls, at));
    if (!normalized.empty()) out["tool_calls"] = std::move(normalized);
  }
  return out;
}

}  // namespace

absl::Status ValidateGenerationRequest(const GenerationRequest& r, const ModelCard& card,
                                       const RequestLimits& limits) {
  if (r.priority < -limits.max_abs_priority || r.priority > limits.max_abs_priority) {
    return InvalidParam("priority", Cat("priority must be an integer in [",
                                        -limits.max_abs_priority, ", ", limits.max_abs_priority,
                                        "] (lower is served earlier), got ", r.priority, "."));
  }
  const SamplingOptions& s = r.sampling;
  if (!std::isfinite(s.temperature) || s.temperature < 0.0f || s.temperature > 2.0f) {
    return InvalidParam("temperature",
                        Cat("temperature must be in [0, 2], got ", s.temperature, "."));
  }
  if (!std::isfinite(s.top_p) || s.top_p <= 0.0f || s.top_p > 1.0f) {
    return InvalidParam("top_p", Cat("top_p must be in (0, 1], got ", s.top_p, "."));
  }
  if (s.top_k < 0) return InvalidParam("top_k", "top_k must be 0 (off) or positive.");
  if (!std::isfinite(s.presence_penalty) || std::fabs(s.presence_penalty) > 2.0f) {
    return InvalidParam("presence_penalty", Cat("presence_penalty must be in [-2, 2], "
                                                "got ",
                                                s.presence_penalty, "."));
  }
  if (!std::isfinite(s.frequency_penalty) || std::fabs(s.frequency_penalty) > 2.0f) {
    return InvalidParam("frequency_penalty", Cat("frequency_penalty must be in [-2, "
                                                 "2], got ",
                                                 s.frequency_penalty, "."));
  }
  if (s.top_logprobs > limits.max_top_logprobs) {
    return InvalidParam(r.endpoint == Endpoint::kChatCompletions ? "top_logprobs" : "logprobs",
                        Cat("at most ", limits.max_top_logprobs,
                            " top logprobs may be requested, got ", s.top_logprobs, "."));
  }
  if (r.stop.size() > limits.max_stop_strings) {
    return InvalidParam("stop",
                        Cat("at most ", limits.max_stop_strings, " stop strings are allowed."));
  }
  for (const std::string& stop : r.stop) {
    if (stop.empty()) return InvalidParam("stop", "stop strings must not be empty.");
    if (stop.size() > limits.max_stop_string_bytes) {
      return InvalidParam(
          "stop", Cat("stop strings are limited to ", limits.max_stop_string_bytes, " bytes."));
    }
    if (!IsValidUtf8(stop)) return InvalidParam("stop", "stop strings must be valid UTF-8.");
  }
  if (r.stop_token_ids.size() > limits.max_stop_token_ids) {
    return InvalidParam("stop_token_ids",
                        Cat("at most ", limits.max_stop_token_ids, " stop token ids are allowed."));
  }
  if (r.max_tokens.has_value() && (*r.max_tokens < 1 || *r.max_tokens >= card.max_context)) {
    return WithCode(
        InvalidParam("max_tokens", Cat("max_tokens must be in [1, ", card.max_context - 1,
                                       "] for this model's context of ", card.max_context,
                                       " tokens; got ", *r.max_tokens, ".")),
        "context_length_exceeded");
  }
  if (r.prompt_text.has_value()) {
    if (r.prompt_text->size() > limits.max_prompt_bytes) {
      return InvalidParam("prompt", Cat("the prompt exceeds ", limits.max_prompt_bytes, " bytes."));
    }
    if (!IsValidUtf8(*r.prompt_text)) return InvalidParam("prompt", "prompt is not valid UTF-8.");
  }
  if (r.prompt_token_ids.has_value() && r.prompt_token_ids->empty()) {
    return InvalidParam("prompt", "The prompt must not be empty.");
  }
  if (r.messages.has_value() && r.messages->empty()) {
    return InvalidParam("messages", "messages must contain at least one message.");
  }
  int forms = r.prompt_text.has_value() + r.prompt_token_ids.has_value() + r.messages.has_value();
  if (forms != 1) return InvalidParam("prompt", "give exactly one of a prompt or messages.");
  return absl::OkStatus();
}

absl::StatusOr<GenerationRequest> ParseCompletionRequest(std::string_view body,
                                                         const ModelCard& card,
                                                         const RequestLimits& limits) {
  EM_ASSIGN_OR_RETURN(json::object object, ParseBody(body));
  Fields f(object);
  EM_RETURN_IF_ERROR(f.RejectUnknown({"model",
                                      "prompt",
                                      "max_tokens",
                                      "temperature",
                                      "top_p",
                                      "top_k",
                                      "n",
                                      "stream",
                                      "stream_options",
                                      "logprobs",
                                      "echo",
                                      "stop",
                                      "presence_penalty",
                                      "frequency_penalty",
                                      "seed",
                                      "user",
                                      "best_of",
                                      "logit_bias",
                                      "suffix",
                                      "stop_token_ids",
                                      "ignore_eos",
                                      "skip_special_tokens",
                                      "priority",
                                      "response_format"}));
  GenerationRequest r;
  r.endpoint = Endpoint::kCompletions;
  EM_RETURN_IF_ERROR(ParseCommon(f, card, limits, &r));
  EM_RETURN_IF_ERROR(ParsePrompt(f, &r));
  EM_RETURN_IF_ERROR(ParseMaxTokens(f, "max_tokens", &r));
  bool echo = false;
  EM_RETURN_IF_ERROR(f.Bool("echo", &echo));
  if (echo) return InvalidParam("echo", "echo is not supported.");
  EM_RETURN_IF_ERROR(ParseResponseFormat(f, &r));
  std::optional<std::string> suffix;
  EM_RETURN_IF_ERROR(f.String("suffix", &suffix));
  if (suffix.has_value() && !suffix->empty()) {
    return InvalidParam("suffix", "suffix is not supported.");
  }
  // Completions: logprobs is an integer, the number of alternatives per position.
  std::optional<int64_t> logprobs;
  EM_RETURN_IF_ERROR(f.Integer("logprobs", &logprobs));
  if (logprobs.has_value()) {
    if (*logprobs < 0 || *logprobs > limits.max_top_logprobs) {
      return InvalidParam("logprobs", Cat("logprobs must be in [0, ", limits.max_top_logprobs,
                                          "], got ", *logprobs, "."));
    }
    r.sampling.logprobs = true;
    r.sampling.top_logprobs = static_cast<uint32_t>(*logprobs);
  }
  EM_RETURN_IF_ERROR(ValidateGenerationRequest(r, card, limits));
  return r;
}

absl::StatusOr<GenerationRequest> ParseChatCompletionRequest(std::string_view body,
                                                             const ModelCard& card,
                                                             const RequestLimits& limits) {
  EM_ASSIGN_OR_RETURN(json::object object, ParseBody(body));
  Fields f(object);
  EM_RETURN_IF_ERROR(f.RejectUnknown({"model",
                                      "messages",
                                      "max_tokens",
                                      "max_completion_tokens",
                                      "temperature",
                                      "top_p",
                                      "top_k",
                                      "n",
                                      "stream",
                                      "stream_options",
                                      "logprobs",
                                      "top_logprobs",
                                      "stop",
                                      "presence_penalty",
                                      "frequency_penalty",
                                      "seed",
                                      "user",
                                      "logit_bias",
                                      "response_format",
                                      "tools",
                                      "tool_choice",
                                      "parallel_tool_calls",
                                      "stop_token_ids",
                                      "ignore_eos",
                                      "skip_special_tokens",
                                      "store",
                                      "metadata",
                                      "priority",
                                      "include_reasoning"}));
  GenerationRequest r;
  r.endpoint = Endpoint::kChatCompletions;
  EM_RETURN_IF_ERROR(ParseCommon(f, card, limits, &r));

  const json::value* messages = f.Get("messages");
  if (messages == nullptr) {
    return InvalidParam("messages", "you must provide a messages parameter");
  }
  if (!messages->is_array()) return Fields::TypeError("messages", "an array of messages");
  if (messages->get_array().empty()) {
    return InvalidParam("messages", "messages must contain at least one message.");
  }
  json::array normalized;
  for (size_t i = 0; i < messages->get_array().size(); ++i) {
    EM_ASSIGN_OR_RETURN(json::object m, NormalizeMessage(messages->get_array()[i], i));
    normalized.push_back(std::move(m));
  }
  r.messages = std::move(normalized);

  EM_RETURN_IF_ERROR(ParseMaxTokens(f, "max_tokens", &r));
  if (f.Get("max_completion_tokens") != nullptr) {
    EM_RETURN_IF_ERROR(ParseMaxTokens(f, "max_completion_tokens", &r));
  }
  EM_RETURN_IF_ERROR(f.Bool("logprobs", &r.sampling.logprobs));
  std::optional<int64_t> top_logprobs;
  EM_RETURN_IF_ERROR(f.Integer("top_logprobs", &top_logprobs));
  if (top_logprobs.has_value()) {
    if (!r.sampling.logprobs) {
      return InvalidParam("top_logprobs", "top_logprobs requires logprobs to be true.");
    }
    if (*top_logprobs < 0 || *top_logprobs > limits.max_top_logprobs) {
      return InvalidParam("top_logprobs",
                          Cat("top_logprobs must be in [0, ", limits.max_top_logprobs, "], got ",
                              *top_logprobs, "."));
    }
    r.sampling.top_logprobs = static_cast<uint32_t>(*top_logprobs);
  }
  EM_RETURN_IF_ERROR(ParseToolRequest(f.Get("tools"), f.Get("tool_choice"), &r));
  r.chat.reasoning = card.reasoning_parser;
  EM_RETURN_IF_ERROR(f.Bool("include_reasoning", &r.chat.include_reasoning));
  bool store = false;
  EM_RETURN_IF_ERROR(f.Bool("parallel_tool_calls", &r.chat.parallel_tool_calls));
  EM_RETURN_IF_ERROR(f.Bool("store", &store));
  if (store) return InvalidParam("store", "store is not supported.");
  if (const json::value* md = f.Get("metadata"); md != nullptr && !md->is_object()) {
    return Fields::TypeError("metadata", "an object");
  }
  EM_RETURN_IF_ERROR(ParseResponseFormat(f, &r));
  EM_RETURN_IF_ERROR(ValidateGenerationRequest(r, card, limits));
  return r;
}

}  // namespace expertmesh::gateway
