// DeepSeek-V3's tool calls, parsed from the generated text while it streams. The model writes
// (as its chat template renders an assistant's tool_calls, tokenizer_config.json of V3/R1):
//   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>
//   [\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>]...<｜tool▁calls▁end｜>
// Text before the first marker is content; each call becomes an OpenAI tool call: its name
// once the name is complete, its arguments as they arrive (held back only where they may be
// the start of the closing "\n```<｜tool▁call▁end｜>"), so streamed pieces concatenate to what
// the whole text gives. Also: request validation of `tools` / `tool_choice` and the prompt
// suffix that forces a call for tool_choice "required" or a named function.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json/array.hpp>
#include <boost/json/value.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gateway/request.h"

namespace expertmesh::gateway {

inline constexpr std::string_view kToolCallsBegin = "<｜tool▁calls▁begin｜>";
inline constexpr std::string_view kToolCallsEnd = "<｜tool▁calls▁end｜>";
inline constexpr std::string_view kToolCallBegin = "<｜tool▁call▁begin｜>";
inline constexpr std::string_view kToolCallEnd = "<｜tool▁call▁end｜>";
inline constexpr std::string_view kToolSep = "<｜tool▁sep｜>";
inline constexpr std::string_view kArgsOpen = "```json\n";

// One change to the tool calls: a new call (start: its type and name), or more arguments.
struct ToolCallEvent {
  int index = 0;
  bool start = false;
  std::string type;  // "function"
  std::string name;
  std::string arguments;  // the next piece of the call's arguments (JSON text)
};

class ToolCallParser {
 public:
  struct Output {
    std::string content;
    std::vector<ToolCallEvent> calls;
  };
  // forced: the prompt already opened a call (ForcedToolCallPrefix); with a forced_name, the
  // output starts inside that call's arguments, without one, inside the first call's name.
  explicit ToolCallParser(bool forced = false, std::string forced_name = "");
  Output Feed(std::string_view text);
  Output Finish();  // the end of the output: what was held back
  int calls() const { return calls_; }

 private:
  enum class State { kContent, kBetween, kType, kName, kFence, kArgs, kAfter };
  void Drain(bool final, Output* out);
  void StartCall(std::string type, std::string name, Output* out);

  State state_ = State::kContent;
  std::string pending_;
  std::string type_;
  std::optional<std::string> pending_start_name_;  // a forced call not reported yet
  int calls_ = 0;
};

// The text that opens a tool call at the end of the prompt: up to the name's separator
// (tool_choice "required": the model names the function) or through the arguments' opening
// fence (a named function).
std::string ForcedToolCallPrefix(const std::optional<std::string>& name);

// Validates a chat request's `tools` (an array of {"type": "function", "function": {"name",
// "description"?, "parameters"?, "strict"?}}) and `tool_choice` (none, auto, required or
// {"type": "function", "function": {"name"}} naming one of the tools), and sets
// request->chat: the tools for the template, whether to parse tool calls, a forced prefix.
// `tools` / `tool_choice` may be null (absent). Errors are InvalidParam (api_error.h).
absl::Status ParseToolRequest(const boost::json::value* tools, const boost::json::value* choice,
                              GenerationRequest* request);

// An assistant message's tool_calls: [{"id"?, "type": "function", "function": {"name",
// "arguments": string (an object is serialized)}}]; `at` names the message in errors.
absl::StatusOr<boost::json::array> NormalizeToolCalls(const boost::json::value& calls,
                                                      const std::string& at);

}  // namespace expertmesh::gateway
