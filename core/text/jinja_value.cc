// Python-like values of the chat-template interpreter; see core/text/jinja.h.
#include <unicode/utf8.h>

#include <charconv>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "core/text/jinja.h"

namespace expertmesh::jinja {

absl::Status Error(std::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("chat template: ", std::string(message)));
}

const char* TypeName(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "undefined";
    case Value::Kind::kNone:
      return "NoneType";
    case Value::Kind::kBool:
      return "bool";
    case Value::Kind::kInt:
      return "int";
    case Value::Kind::kFloat:
      return "float";
    case Value::Kind::kString:
      return "str";
    case Value::Kind::kList:
      return "list";
    case Value::Kind::kDict:
      return "dict";
    case Value::Kind::kNamespace:
      return "Namespace";
  }
  return "?";
}

Value FromJson(const boost::json::value& j) {
  switch (j.kind()) {
    case boost::json::kind::null:
      return Value::None();
    case boost::json::kind::bool_:
      return Value::Bool(j.get_bool());
    case boost::json::kind::int64:
      return Value::Int(j.get_int64());
    case boost::json::kind::uint64:
      return Value::Int(static_cast<int64_t>(j.get_uint64()));
    case boost::json::kind::double_:
      return Value::Float(j.get_double());
    case boost::json::kind::string:
      return Value::Str(std::string(j.get_string()));
    case boost::json::kind::array: {
      List l;
      for (const auto& x : j.get_array()) l.push_back(FromJson(x));
      return Value::MakeList(std::move(l));
    }
    case boost::json::kind::object: {
      Dict d;
      for (const auto& [k, x] : j.get_object()) d.emplace_back(std::string(k), FromJson(x));
      return Value::MakeDict(std::move(d));
    }
  }
  return Value::None();
}

bool Truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return false;
    case Value::Kind::kBool:
      return v.b;
    case Value::Kind::kInt:
      return v.i != 0;
    case Value::Kind::kFloat:
      return v.f != 0;
    case Value::Kind::kString:
      return !v.s.empty();
    case Value::Kind::kList:
      return !v.list->empty();
    case Value::Kind::kDict:
      return !v.dict->empty();
    case Value::Kind::kNamespace:
      return true;
  }
  return false;
}

std::vector<std::string> CodePoints(std::string_view s) {
  std::vector<std::string> out;
  int32_t i = 0, n = static_cast<int32_t>(s.size());
  while (i < n) {
    int32_t start = i;
    UChar32 c;
    U8_NEXT(reinterpret_cast<const uint8_t*>(s.data()), i, n, c);
    out.emplace_back(s.substr(start, i - start));
  }
  return out;
}

// Python's str(): what {{ x }} prints.
std::string PyStr(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "";
    case Value::Kind::kString:
      return v.s;
    default:
      return PyRepr(v);
  }
}

namespace {
std::string PyFloat(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), x);
  std::string s(buf, end);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

}  // namespace

std::string PyRepr(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "";
    case Value::Kind::kNone:
      return "None";
    case Value::Kind::kBool:
      return v.b ? "True" : "False";
    case Value::Kind::kInt:
      return std::to_string(v.i);
    case Value::Kind::kFloat:
      return PyFloat(v.f);
    case Value::Kind::kString: {
      char q =
          v.s.find('\'') != std::string::npos && v.s.find('"') == std::string::npos ? '"' : '\'';
      std::string out(1, q);
      for (char c : v.s) {
        if (c == q || c == '\\') {
          out += '\\';
          out += c;
        } else if (c == '\n') {
          out += "\\n";
        } else if (c == '\t') {
          out += "\\t";
        } else if (c == '\r') {
          out += "\\r";
        } else {
          out += c;
        }
      }
      return out + q;
    }
    case Value::Kind::kList: {
      std::string out = "[";
      for (size_t k = 0; k < v.list->size(); ++k) {
        out += (k ? ", " : "") + PyRepr((*v.list)[k]);
      }
      return out + "]";
    }
    case Value::Kind::kDict: {
      std::string out = "{";
      for (size_t k = 0; k < v.dict->size(); ++k) {
        out += (k ? ", " : "") + PyRepr(Value::Str((*v.dict)[k].first)) + ": " +
               PyRepr((*v.dict)[k].second);
      }
      return out + "}";
    }
    case Value::Kind::kNamespace:
      return "<Namespace>";
  }
  return "";
}

namespace {
// A JSON string literal as json.dumps(ensure_ascii=False) writes it.
std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

}  // namespace

absl::StatusOr<std::string> ToJson(const Value& v, int indent, bool sort_keys, int depth) {
  std::string nl, pad, pad_in;
  if (indent >= 0) {
    nl = "\n";
    pad = std::string(depth * indent, ' ');
    pad_in = std::string((depth + 1) * indent, ' ');
  }
  const char* item_sep = indent >= 0 ? "," : ", ";
  switch (v.kind) {
    case Value::Kind::kNone:
      return std::string("null");
    case Value::Kind::kBool:
      return std::string(v.b ? "true" : "false");
    case Value::Kind::kInt:
      return std::to_string(v.i);
    case Value::Kind::kFloat:
      return std::isfinite(v.f) ? PyFloat(v.f)
                                : std::string(v.f != v.f ? "NaN"
                                              : v.f > 0  ? "Infinity"
                                                         : "-Infinity");
    case Value::Kind::kString:
      return JsonString(v.s);
    case Value::Kind::kList: {
      if (v.list->empty()) return std::string("[]");
      std::string out = "[" + nl;
      for (size_t k = 0; k < v.list->size(); ++k) {
        EM_ASSIGN_OR_RETURN(auto item, ToJson((*v.list)[k], indent, sort_keys, depth + 1));
        out += (k ? item_sep + nl : "") + pad_in + item;
      }
      return out + nl + pad + "]";
    }
    case Value::Kind::kDict:
    case Value::Kind::kNamespace: {
      if (v.dict->empty()) return std::string("{}");
      Dict items = *v.dict;
      if (sort_keys) {
        std::stable_sort(items.begin(), items.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      }
      std::string out = "{" + nl;
      for (size_t k = 0; k < items.size(); ++k) {
        EM_ASSIGN_OR_RETURN(auto item, ToJson(items[k].second, indent, sort_keys, depth + 1));
        out += (k ? item_sep + nl : "") + pad_in + JsonString(items[k].first) + ": " + item;
      }
      return out + nl + pad + "}";
    }
    case Value::Kind::kUndefined:
      break;
  }
  return Error(absl::StrCat("tojson: cannot serialize ", TypeName(v)));
}

bool Equal(const Value& a, const Value& b) {
  if (a.numeric() && b.numeric()) return a.as_double() == b.as_double();
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return true;
    case Value::Kind::kString:
      return a.s == b.s;
    case Value::Kind::kList:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k) {
        if (!Equal((*a.list)[k], (*b.list)[k])) return false;
      }
      return true;
    case Value::Kind::kDict:
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [k, v] : *a.dict) {
        const Value* o = b.Find(k);
        if (o == nullptr || !Equal(v, *o)) return false;
      }
      return true;
    default:
      return a.dict == b.dict;
  }
}

}  // namespace expertmesh::jinja
