// Typed reads of JSON fields (Boost.JSON), the one set of conversions every reader builds on:
// config.json (strict, errors naming the dotted path), tokenizer.json (lenient, defaults),
// OpenAI request bodies (strict, OpenAI-style errors) and safetensors headers. Each caller
// keeps its own error policy; the type rules live here once.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <boost/json.hpp>

namespace expertmesh::json_field {

// The value of `key` in `object`, or null when the object is null, the key is absent or its
// value is JSON null.
const boost::json::value* Find(const boost::json::object* object, std::string_view key);
inline const boost::json::value* Find(const boost::json::object& object, std::string_view key) {
  return Find(&object, key);
}

std::optional<std::string> AsString(const boost::json::value& v);
std::optional<bool> AsBool(const boost::json::value& v);
// An integer that fits int64_t (no fractional numbers).
std::optional<int64_t> AsInt64(const boost::json::value& v);
// A non-negative integer.
std::optional<uint64_t> AsUnsigned(const boost::json::value& v);
// Any JSON number, as double.
std::optional<double> AsNumber(const boost::json::value& v);

}  // namespace expertmesh::json_field
