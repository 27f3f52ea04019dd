// ChatTemplate: a model's chat template run by the Jinja2-subset interpreter of core/text/jinja.h,
// with the message clean-up transformers' apply_chat_template does first.
#include "core/text/chat_template.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/base/file.h"
#include "core/base/status.h"
#include "core/text/jinja.h"

namespace expertmesh {

// ---------------------------------------------------------------------------------------------

ChatTemplate::ChatTemplate(std::shared_ptr<const jinja::Template> tmpl, std::string source,
                           std::string bos, std::string eos)
    : template_(std::move(tmpl)),
      source_(std::move(source)),
      bos_token_(std::move(bos)),
      eos_token_(std::move(eos)) {}

absl::StatusOr<ChatTemplate> ChatTemplate::Create(std::string_view source, std::string bos_token,
                                                  std::string eos_token) {
  EM_ASSIGN_OR_RETURN(std::shared_ptr<const jinja::Template> t, jinja::Parse(source));
  return ChatTemplate(std::move(t), std::string(source), std::move(bos_token),
                      std::move(eos_token));
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromTokenizerConfig(const std::string& path) {
  EM_ASSIGN_OR_RETURN(const std::string text, base::ReadFile(path));
  boost::system::error_code ec;
  boost::json::value config = boost::json::parse(text, ec);
  if (ec || !config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  const boost::json::object& o = config.get_object();
  auto token = [&](std::string_view key) -> std::string {
    const boost::json::value* v = o.if_contains(key);
    if (v && v->is_string()) return std::string(v->get_string());
    if (v && v->is_object()) {
      const boost::json::value* c = v->get_object().if_contains("content");
      if (c && c->is_string()) return std::string(c->get_string());
    }
    return "";
  };
  const boost::json::value* tmpl = o.if_contains("chat_template");
  std::string source;
  if (tmpl && tmpl->is_string()) {
    source = std::string(tmpl->get_string());
  } else if (tmpl && tmpl->is_array()) {  // [{"name": "default", "template": ...}, ...]
    for (const auto& entry : tmpl->get_array()) {
      const boost::json::object* e = entry.if_object();
      const boost::json::value* name = e ? e->if_contains("name") : nullptr;
      const boost::json::value* text = e ? e->if_contains("template") : nullptr;
      if (name && name->is_string() && name->get_string() == "default" && text &&
          text->is_string()) {
        source = std::string(text->get_string());
      }
    }
  }
  if (source.empty()) return absl::NotFoundError(absl::StrCat(path, ": no chat_template"));
  absl::StatusOr<ChatTemplate> t = Create(source, token("bos_token"), token("eos_token"));
  if (!t.ok())
    return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Apply(const boost::json::array& messages,
                                                bool add_generation_prompt) const {
  return Apply(messages, add_generation_prompt, {});
}

absl::StatusOr<std::string> ChatTemplate::Apply(const boost::json::array& messages,
                                                bool add_generation_prompt,
                                                const boost::json::object& extra_context,
                                                bool drop_null_keys) const {
  // As transformers' apply_chat_template: keys whose value is null are dropped from each
  // message, and reasoning under its older names is also offered as reasoning_content.
  boost::json::array cleaned;
  for (const boost::json::value& m : messages) {
    if (!m.is_object()) return absl::InvalidArgumentError("chat messages must be objects");
    boost::json::object o;
    for (const auto& [k, v] : m.get_object()) {
      if (!v.is_null() || !drop_null_keys) o[k] = v;
    }
    for (std::string_view key : {"reasoning_content", "thinking", "reasoning"}) {
      if (const boost::json::value* r = o.if_contains(key)) {
        boost::json::value reasoning = *r;
        boost::json::object aliased;
        aliased["thinking"] = reasoning;
        for (const auto& [k, v] : o) aliased[k] = v;
        aliased["reasoning_content"] = reasoning;
        o = std::move(aliased);
        break;
      }
    }
    cleaned.push_back(std::move(o));
  }
  boost::json::object context;
  context["bos_token"] = bos_token_;
  context["eos_token"] = eos_token_;
  context["tools"] = nullptr;
  context["documents"] = nullptr;
  for (const auto& [k, v] : extra_context) context[k] = v;
  context["messages"] = std::move(cleaned);
  context["add_generation_prompt"] = add_generation_prompt;
  return jinja::Render(*template_, context);
}

}  // namespace expertmesh
