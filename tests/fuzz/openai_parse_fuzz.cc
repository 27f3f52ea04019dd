// libFuzzer target: the OpenAI request parser (gateway/openai_parse.cc) on untrusted bodies.
// Input: a request body; it is parsed as both POST /v1/completions and POST
// /v1/chat/completions, for a model card like the bundled model's.
// Promises checked (a broken one traps, so the fuzzer reports it as a crash):
//   - a rejected body is the client's fault: its error maps to a 4xx OpenAI error whose JSON
//     form parses back;
//   - an accepted request passes ValidateGenerationRequest, carries exactly the prompt form of
//     its endpoint, the card's model name, and (chat) messages that each have a string "role"
//     and a string "content" (null only beside an assistant's normalized tool_calls), and a
//     forced tool_choice names one of its tools.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include <boost/json.hpp>

#include "gateway/api_error.h"
#include "gateway/openai_parse.h"

namespace {

namespace gw = expertmesh::gateway;

void Check(bool condition) {
  if (!condition) __builtin_trap();
}

const gw::ModelCard& Card() {
  static const gw::ModelCard* card = [] {
    auto* c = new gw::ModelCard;
    c->id = "expertmesh-tiny";
    c->max_context = 4096;
    c->defaults.temperature = 0.6f;
    c->defaults.top_p = 0.95f;
    c->defaults.eos_token_ids = {1};
    c->defaults.bos_token_id = 0;
    return c;
  }();
  return *card;
}

void CheckRejected(const absl::Status& status) {
  Check(!status.ok());
  const gw::ApiError e = gw::ToApiError(status);
  Check(e.http_status >= 400 && e.http_status < 500);
  Check(!e.message.empty());
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(gw::ApiErrorJson(e), ec);
  Check(!ec && v.is_object());
}

void CheckAccepted(const gw::GenerationRequest& r, bool chat) {
  const gw::RequestLimits limits;
  Check(gw::ValidateGenerationRequest(r, Card(), limits).ok());
  Check(r.model == Card().id);
  Check(r.endpoint == (chat ? gw::Endpoint::kChatCompletions : gw::Endpoint::kCompletions));
  Check(r.client.empty());  // never from the body
  if (chat) {
    Check(r.messages.has_value() && !r.prompt_text && !r.prompt_token_ids);
    for (const boost::json::value& m : *r.messages) {
      Check(m.is_object());
      const boost::json::object& o = m.get_object();
      Check(o.contains("role") && o.at("role").is_string());
      Check(o.contains("content"));
      // Null content only for an assistant's tool calls, each with a name and string arguments.
      const boost::json::value* calls = o.if_contains("tool_calls");
      Check(o.at("content").is_string() ||
            (o.at("content").is_null() && o.at("role") == "assistant" && calls != nullptr));
      if (calls != nullptr) {
        Check(calls->is_array() && !calls->get_array().empty());
        for (const boost::json::value& c : calls->get_array()) {
          const boost::json::value& fn = c.at("function");
          Check(fn.at("name").is_string() && fn.at("arguments").is_string());
        }
      }
    }
    // Tools: every parsed call is either off or of a known shape; a forced call names a tool.
    Check(!r.chat.forced_call || r.chat.tool_calls);
    if (!r.chat.forced_name.empty()) {
      bool known = false;
      for (const boost::json::value& t : *r.chat.tools) {
        known = known || t.at("function").at("name").as_string() == r.chat.forced_name;
      }
      Check(known);
    }
  } else {
    Check(!r.messages.has_value() && (r.prompt_text.has_value() != r.prompt_token_ids.has_value()));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  const gw::RequestLimits limits;
  for (bool chat : {false, true}) {
    absl::StatusOr<gw::GenerationRequest> r =
        chat ? gw::ParseChatCompletionRequest(body, Card(), limits)
             : gw::ParseCompletionRequest(body, Card(), limits);
    if (r.ok()) {
      CheckAccepted(*r, chat);
    } else {
      CheckRejected(r.status());
    }
  }
  return 0;
}
