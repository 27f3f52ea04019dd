#include "gateway/tool_calls.h"

#include <algorithm>

#include <boost/json.hpp>

#include "gateway/api_error.h"
#include "gateway/reasoning_parser.h"  // PartialMarkerSuffix
#include "gateway/strings.h"

namespace expertmesh::gateway {
namespace json = boost::json;
namespace {

std::string Trim(std::string_view s) {
  const size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string_view::npos) return "";
  const size_t e = s.find_last_not_of(" \t\r\n");
  return std::string(s.substr(b, e - b + 1));
}

// The longest held-back tail for any of `markers`.
size_t Held(std::string_view text, std::initializer_list<std::string_view> markers) {
  size_t keep = 0;
  for (std::string_view m : markers) keep = std::max(keep, PartialMarkerSuffix(text, m));
  return keep;
}

// OpenAI's rule for function names.
bool ValidFunctionName(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-';
  });
}

}  // namespace

ToolCallParser::ToolCallParser(bool forced, std::string forced_name) {
  if (!forced) return;
  type_ = "function";
  if (!forced_name.empty()) {
    state_ = State::kArgs;
    pending_start_name_ = std::move(forced_name);
  } else {
    state_ = State::kName;
  }
}

void ToolCallParser::StartCall(std::string type, std::string name, Output* out) {
  ToolCallEvent e;
  e.index = calls_++;
  e.start = true;
  e.type = type.empty() ? "function" : std::move(type);
  e.name = std::move(name);
  out->calls.push_back(std::move(e));
}

ToolCallParser::Output ToolCallParser::Feed(std::string_view text) {
  pending_.append(text);
  Output out;
  Drain(false, &out);
  return out;
}

ToolCallParser::Output ToolCallParser::Finish() {
  Output out;
  Drain(true, &out);
  return out;
}

void ToolCallParser::Drain(bool final, Output* out) {
  if (pending_start_name_.has_value()) {
    StartCall(type_, *std::move(pending_start_name_), out);
    pending_start_name_.reset();
  }
  auto args = [&](std::string piece) {
    if (piece.empty()) return;
    if (!out->calls.empty() && out->calls.back().index == calls_ - 1) {
      out->calls.back().arguments += piece;
      return;
    }
    ToolCallEvent e;
    e.index = calls_ - 1;
    e.arguments = std::move(piece);
    out->calls.push_back(std::move(e));
  };
  for (;;) {
    switch (state_) {
      case State::kContent: {
        const size_t calls = pending_.find(kToolCallsBegin);
        const size_t call = pending_.find(kToolCallBegin);
        const size_t at = std::min(calls, call);
        if (at == std::string::npos) {
          const size_t keep = final ? 0 : Held(pending_, {kToolCallsBegin, kToolCallBegin});
          out->content += pending_.substr(0, pending_.size() - keep);
          pending_.erase(0, pending_.size() - keep);
          return;
        }
        out->content += pending_.substr(0, at);
        const bool all = at == calls;
        pending_.erase(0, at + (all ? kToolCallsBegin : kToolCallBegin).size());
        state_ = all ? State::kBetween : State::kType;
        break;
      }
      case State::kBetween: {  // between calls: the next call, or the end of the calls
        const size_t call = pending_.find(kToolCallBegin);
        const size_t end = pending_.find(kToolCallsEnd);
        if (call == std::string::npos && end == std::string::npos) {
          const size_t keep = final ? 0 : Held(pending_, {kToolCallBegin, kToolCallsEnd});
          pending_.erase(0, pending_.size() - keep);  // separators ("\n") are not content
          return;
        }
        if (call < end) {
          pending_.erase(0, call + kToolCallBegin.size());
          state_ = State::kType;
        } else {
          pending_.erase(0, end + kToolCallsEnd.size());
          state_ = State::kAfter;
        }
        break;
      }
      case State::kType: {
        const size_t sep = pending_.find(kToolSep);
        if (sep == std::string::npos) {
          if (final) pending_.clear();
          return;
        }
        type_ = Trim(std::string_view(pending_).substr(0, sep));
        pending_.erase(0, sep + kToolSep.size());
        state_ = State::kName;
        break;
      }
      case State::kName: {
        const size_t nl = pending_.find('\n');
        if (nl == std::string::npos) {
          if (final) {
            std::string name = Trim(pending_);
            pending_.clear();
            if (!name.empty()) StartCall(type_, std::move(name), out);
          }
          return;
        }
        StartCall(type_, Trim(std::string_view(pending_).substr(0, nl)), out);
        pending_.erase(0, nl + 1);
        state_ = State::kFence;
        break;
      }
      case State::kFence: {
        if (std::string_view(pending_).starts_with(kArgsOpen)) {
          pending_.erase(0, kArgsOpen.size());
        } else if (!final && kArgsOpen.starts_with(pending_)) {
          return;  // may still become the fence
        }
        state_ = State::kArgs;
        break;
      }
      case State::kArgs: {
        const size_t end = pending_.find(kToolCallEnd);
        if (end == std::string::npos) {
          static const std::string kFenced = Cat("\n```", kToolCallEnd);
          static const std::string kBare = Cat("```", kToolCallEnd);
          const size_t keep = final ? 0 : Held(pending_, {kFenced, kBare, kToolCallEnd});
          args(pending_.substr(0, pending_.size() - keep));
          pending_.erase(0, pending_.size() - keep);
          return;
        }
        std::string_view body = std::string_view(pending_).substr(0, end);
        if (body.ends_with("```")) body.remove_suffix(3);
        if (body.ends_with("\n")) body.remove_suffix(1);
        args(std::string(body));
        pending_.erase(0, end + kToolCallEnd.size());
        state_ = State::kBetween;
        break;
      }
      case State::kAfter: {  // after the calls: nothing is expected but the end of sequence
        out->content += pending_;
        pending_.clear();
        return;
      }
    }
  }
}

std::string ForcedToolCallPrefix(const std::optional<std::string>& name) {
  std::string s = Cat(kToolCallsBegin, kToolCallBegin, "function", kToolSep);
  if (name.has_value()) s += Cat(*name, "\n", kArgsOpen);
  return s;
}

absl::StatusOr<json::array> NormalizeToolCalls(const json::value& calls, const std::string& at) {
  const std::string param = Cat(at, ".tool_calls");
  if (!calls.is_array())
    return InvalidParam(param, Cat("Invalid type for '", param, "': expected an array."));
  json::array out;
  for (size_t i = 0; i < calls.get_array().size(); ++i) {
    const std::string call_at = Cat(param, "[", i, "]");
    const json::object* c = calls.get_array()[i].if_object();
    if (c == nullptr) return InvalidParam(call_at, Cat(call_at, " must be an object."));
    for (const auto& kv : *c) {
      if (kv.key() != "id" && kv.key() != "type" && kv.key() != "function" && kv.key() != "index") {
        return InvalidParam(
            call_at, Cat("Unrecognized field '", std::string(kv.key()), "' in ", call_at, "."));
      }
    }
    const json::value* type = c->if_contains("type");
    if (type != nullptr && !type->is_null() &&
        (!type->is_string() || type->get_string() != "function")) {
      return InvalidParam(call_at, Cat(call_at, ".type must be \"function\"."));
    }
    const json::value* id = c->if_contains("id");
    if (id != nullptr && !id->is_null() && !id->is_string()) {
      return InvalidParam(call_at, Cat(call_at, ".id must be a string."));
    }
    const json::value* fn = c->if_contains("function");
    const json::object* f = fn ? fn->if_object() : nullptr;
    const json::value* name = f ? f->if_contains("name") : nullptr;
    const json::value* arguments = f ? f->if_contains("arguments") : nullptr;
    if (name == nullptr || !name->is_string() || name->get_string().empty()) {
      return InvalidParam(call_at, Cat(call_at, ".function.name must be a non-empty string."));
    }
    std::string args;
    if (arguments == nullptr || arguments->is_null()) {
      args = "{}";
    } else if (arguments->is_string()) {
      args = std::string(arguments->get_string());
    } else if (arguments->is_object()) {
      args = json::serialize(*arguments);
    } else {
      return InvalidParam(call_at, Cat(call_at, ".function.arguments must be a JSON string."));
    }
    json::object call;
    if (id != nullptr && id->is_string()) call["id"] = id->get_string();
    call["type"] = "function";
    call["function"] = json::object{{"name", name->get_string()}, {"arguments", args}};
    out.push_back(std::move(call));
  }
  return out;
}

absl::Status ParseToolRequest(const json::value* tools, const json::value* choice,
                              GenerationRequest* r) {
  std::vector<std::string> names;
  if (tools != nullptr) {
    if (!tools->is_array())
      return InvalidParam("tools", "Invalid type for 'tools': expected an array.");
    if (tools->get_array().size() > 128) {
      return InvalidParam("tools", "at most 128 tools may be given.");
    }
    json::array normalized;
    for (size_t i = 0; i < tools->get_array().size(); ++i) {
      const std::string at = Cat("tools[", i, "]");
      const json::object* t = tools->get_array()[i].if_object();
      if (t == nullptr)
        return InvalidParam(at, Cat("Invalid type for '", at, "': expected an object."));
      for (const auto& kv : *t) {
        if (kv.key() != "type" && kv.key() != "function") {
          return InvalidParam(at,
                              Cat("Unrecognized field '", std::string(kv.key()), "' in ", at, "."));
        }
      }
      const json::value* type = t->if_contains("type");
      if (type == nullptr || !type->is_string() || type->get_string() != "function") {
        return InvalidParam(
            Cat(at, ".type"),
            Cat("Invalid value for '", at, ".type': only \"function\" tools are supported."));
      }
      const json::value* fn = t->if_contains("function");
      const json::object* f = fn ? fn->if_object() : nullptr;
      if (f == nullptr)
        return InvalidParam(Cat(at, ".function"),
                            Cat("Missing required parameter: '", at, ".function'."));
      for (const auto& kv : *f) {
        if (kv.key() != "name" && kv.key() != "description" && kv.key() != "parameters" &&
            kv.key() != "strict") {
          return InvalidParam(
              Cat(at, ".function"),
              Cat("Unrecognized field '", std::string(kv.key()), "' in ", at, ".function."));
        }
      }
      const json::value* name = f->if_contains("name");
      if (name == nullptr || !name->is_string()) {
        return InvalidParam(Cat(at, ".function.name"),
                            Cat("Missing required parameter: '", at, ".function.name'."));
      }
      const std::string n(name->get_string());
      if (!ValidFunctionName(n)) {
        return InvalidParam(Cat(at, ".function.name"),
                            Cat("Invalid '", at,
                                ".function.name': string does not match pattern. Expected a string "
                                "that matches the pattern '^[a-zA-Z0-9_-]{1,64}$'."));
      }
      if (std::find(names.begin(), names.end(), n) != names.end()) {
        return InvalidParam(Cat(at, ".function.name"), Cat("Duplicate tool name '", n, "'."));
      }
      const json::value* desc = f->if_contains("description");
      if (desc != nullptr && !desc->is_null() && !desc->is_string()) {
        return InvalidParam(
            Cat(at, ".function.description"),
            Cat("Invalid type for '", at, ".function.description': expected a string."));
      }
      const json::value* params = f->if_contains("parameters");
      if (params != nullptr && !params->is_null() && !params->is_object()) {
        return InvalidParam(Cat(at, ".function.parameters"),
                            Cat("Invalid type for '", at,
                                ".function.parameters': expected an object (a JSON Schema)."));
      }
      const json::value* strict = f->if_contains("strict");
      if (strict != nullptr && !strict->is_null() && !strict->is_bool()) {
        return InvalidParam(
            Cat(at, ".function.strict"),
            Cat("Invalid type for '", at, ".function.strict': expected a boolean."));
      }
      names.push_back(n);
      normalized.push_back(*t);
    }
    if (!normalized.empty()) r->chat.tools = std::move(normalized);
  }
  // OpenAI's default: "auto" when tools are given, else "none".
  std::string mode = names.empty() ? "none" : "auto";
  std::optional<std::string> named;
  if (choice != nullptr) {
    if (choice->is_string()) {
      mode = std::string(choice->get_string());
      if (mode != "none" && mode != "auto" && mode != "required") {
        return InvalidParam("tool_choice",
                            Cat("Invalid value for 'tool_choice': '", mode,
                                "'. Expected 'none', 'auto', 'required' or a named function."));
      }
    } else if (const json::object* o = choice->if_object()) {
      const json::value* type = o->if_contains("type");
      const json::value* fn = o->if_contains("function");
      const json::object* f = fn ? fn->if_object() : nullptr;
      const json::value* name = f ? f->if_contains("name") : nullptr;
      if (type == nullptr || !type->is_string() || type->get_string() != "function" ||
          name == nullptr || !name->is_string() || o->size() != 2 || f->size() != 1) {
        return InvalidParam("tool_choice",
                            "Invalid 'tool_choice': expected {\"type\": \"function\", "
                            "\"function\": {\"name\": string}}.");
      }
      mode = "named";
      named = std::string(name->get_string());
      if (std::find(names.begin(), names.end(), *named) == names.end()) {
        return InvalidParam("tool_choice", Cat("Invalid 'tool_choice': no tool named '", *named,
                                               "' is in 'tools'."));
      }
    } else {
      return InvalidParam("tool_choice",
                          "Invalid type for 'tool_choice': expected a string or an object.");
    }
    if (mode != "none" && names.empty()) {
      return InvalidParam("tool_choice",
                          "Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                          "'tools' are specified.");
    }
  }
  r->chat.tool_calls = mode != "none";
  if (mode == "required" || mode == "named") {
    r->chat.forced_call = true;
    r->chat.forced_name = named.value_or("");
    r->chat.forced_prefix = ForcedToolCallPrefix(named);
  }
  return absl::OkStatus();
}

}  // namespace expertmesh::gateway
