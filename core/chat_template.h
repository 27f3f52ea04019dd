// ChatTemplate: renders a model's chat template (the Jinja2 `chat_template` string of its
// tokenizer_config.json) for a list of messages, exactly as transformers' apply_chat_template.
//
// Why: the gateway turns chat requests into prompts for any deepseek_v3 checkpoint, and the
// prompt must be byte-identical to what the model was trained with. Rather than hand-coding
// each template, a small interpreter for the Jinja2 subset chat templates use (core/jinja.h)
// runs the model's own template: {{ }}, {% set %} (also namespace attributes), namespace(), for
// (with loop.index/first/last), if/elif/else, `is defined / none / string ...` tests, and/or/not,
// comparisons, `in`, `~` and `+` on strings, subscripts and slices, the string methods and
// filters the DeepSeek/Qwen/Llama templates use, raise_exception, and whitespace control
// ({%- -%}); with transformers' settings trim_blocks and lstrip_blocks. tests/tokenizer/ checks
// the output against transformers for the DeepSeek-V3 and R1 templates and ours.
#ifndef EXPERTMESH_CORE_CHAT_TEMPLATE_H_
#define EXPERTMESH_CORE_CHAT_TEMPLATE_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "boost/json.hpp"

namespace expertmesh {

namespace jinja {
struct Template;  // parsed template (core/chat_template.cc)
}  // namespace jinja

class ChatTemplate {
 public:
  // Reads `chat_template`, `bos_token` and `eos_token` from a tokenizer_config.json.
  static absl::StatusOr<ChatTemplate> FromTokenizerConfig(const std::string& path);
  // Parses a template string; InvalidArgument on syntax errors or unsupported constructs.
  static absl::StatusOr<ChatTemplate> Create(std::string_view template_source,
                                             std::string bos_token, std::string eos_token);

  // messages: [{"role": "system"|"user"|"assistant"|"tool", "content": string|null,
  //             "tool_calls": [...]?, ...}, ...], passed to the template as they are.
  // InvalidArgument when the template raises (raise_exception) or fails at run time.
  absl::StatusOr<std::string> Apply(const boost::json::array& messages,
                                    bool add_generation_prompt) const;
  // The same with extra template variables (e.g. "tools"), as apply_chat_template's kwargs.
  absl::StatusOr<std::string> Apply(const boost::json::array& messages, bool add_generation_prompt,
                                    const boost::json::object& extra_context) const;

  const std::string& bos_token() const { return bos_token_; }
  const std::string& eos_token() const { return eos_token_; }

 private:
  ChatTemplate(std::shared_ptr<const jinja::Template> tmpl, std::string bos, std::string eos);

  std::shared_ptr<const jinja::Template> template_;
  std::string bos_token_;
  std::string eos_token_;
};

}  // namespace expertmesh

#endif  // EXPERTMESH_CORE_CHAT_TEMPLATE_H_
