// libFuzzer target: the chat-template interpreter on untrusted template text.
// Input: the template source; it renders a fixed conversation with a generation prompt.
// Promise: never crash, overflow the stack or hang (see the limits in core/text/jinja.h); every
// failure is a Status with a message.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/text/chat_template.h"

namespace {

void Check(bool condition) {
  if (!condition) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string source(reinterpret_cast<const char*>(data), size);
  auto tmpl = expertmesh::ChatTemplate::Create(source, "<s>", "</s>");
  if (!tmpl.ok()) {
    Check(!tmpl.status().message().empty());
    return 0;
  }
  static const boost::json::array messages = boost::json::parse(R"([
      {"role": "system", "content": "S"}, {"role": "user", "content": "Q {{ x }}"},
      {"role": "assistant", "content": "A", "tool_calls": [{"type": "function",
       "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "content": "R"}])")
                                                 .as_array();
  auto text = tmpl->Apply(messages, true);
  if (!text.ok()) Check(!text.status().message().empty());
  return 0;
}
