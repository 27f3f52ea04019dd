#include "core/base/json.h"

#include <limits>

namespace expertmesh::json_field {

const boost::json::value* Find(const boost::json::object* object, std::string_view key) {
  if (object == nullptr) return nullptr;
  const boost::json::value* v = object->if_contains(key);
  return (v == nullptr || v->is_null()) ? nullptr : v;
}

std::optional<std::string> AsString(const boost::json::value& v) {
  if (const boost::json::string* s = v.if_string()) return std::string(s->data(), s->size());
  return std::nullopt;
}

std::optional<bool> AsBool(const boost::json::value& v) {
  if (const bool* b = v.if_bool()) return *b;
  return std::nullopt;
}

std::optional<int64_t> AsInt64(const boost::json::value& v) {
  if (const int64_t* i = v.if_int64()) return *i;
  if (const uint64_t* u = v.if_uint64()) {
    if (*u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return static_cast<int64_t>(*u);
    }
  }
  return std::nullopt;
}

std::optional<uint64_t> AsUnsigned(const boost::json::value& v) {
  if (const int64_t* i = v.if_int64()) {
    if (*i < 0) return std::nullopt;
    return static_cast<uint64_t>(*i);
  }
  if (const uint64_t* u = v.if_uint64()) return *u;
  return std::nullopt;
}

std::optional<double> AsNumber(const boost::json::value& v) {
  if (const double* d = v.if_double()) return *d;
  if (const int64_t* i = v.if_int64()) return static_cast<double>(*i);
  if (const uint64_t* u = v.if_uint64()) return static_cast<double>(*u);
  return std::nullopt;
}

}  // namespace expertmesh::json_field
