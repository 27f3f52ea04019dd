// ChatTemplate: renders a model's chat template (the Jinja2 `chat_template` string of its
// tokenizer_config.json) for a list of messages, exactly as transformers' apply_chat_template.
//
// Why: the gateway turns chat requests into prompts for any deepseek_v3 checkpoint, and the
// prompt must be byte-identical to what the model was trained with. Rather than hand-coding
// each template, a small interpreter for the Jinja2 subset chat templates use (core/text/jinja.h)
// runs the model's own template: {{ }}, {% set %} (also on namespace attributes), for (loop
// variables, else, loop filters, break/continue), if/elif/else, tests (defined, none, string,
// ...), and/or/not, comparisons, `in`, `+` and `~`, subscripts and slices, common string and
// dict methods, the filters trim/length/join/tojson/default/..., namespace(), range() and
// raise_exception; with transformers' settings (trim_blocks, lstrip_blocks). Unsupported
// constructs (macros, call blocks, other filters and tests) fail at Create (Unimplemented).
// tests/tokenizer/ checks the output against transformers for DeepSeek-V3's and R1's
// templates and ours, and against Jinja2 for snippets of the other constructs.
#ifndef EXPERTMESH_CORE_CHAT_TEMPLATE_H_
#define EXPERTMESH_CORE_CHAT_TEMPLATE_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "boost/json.hpp"

namespace expertmesh {

namespace jinja {
struct Template;  // parsed template (core/text/chat_template.cc)
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
  // drop_null_keys: as transformers, message keys whose value is null are removed first; the
  // gateway keeps them (false), because DeepSeek's templates render an assistant tool-call
  // message only when its `content is none`, as in Jinja2 without transformers' clean-up.
  absl::StatusOr<std::string> Apply(const boost::json::array& messages, bool add_generation_prompt,
                                    const boost::json::object& extra_context,
                                    bool drop_null_keys = true) const;

  const std::string& bos_token() const { return bos_token_; }
  const std::string& eos_token() const { return eos_token_; }
  const std::string& source() const { return source_; }  // the template text

 private:
  ChatTemplate(std::shared_ptr<const jinja::Template> tmpl, std::string source, std::string bos,
               std::string eos);

  std::shared_ptr<const jinja::Template> template_;
  std::string source_;
  std::string bos_token_;
  std::string eos_token_;
};

}  // namespace expertmesh

#endif  // EXPERTMESH_CORE_CHAT_TEMPLATE_H_
