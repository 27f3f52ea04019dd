#include "gateway/request.h"

#include <filesystem>

#include <boost/json.hpp>

#include "core/base/file.h"
#include "core/base/status.h"
#include "gateway/strings.h"

namespace expertmesh::gateway {
namespace json = boost::json;

absl::StatusOr<GenerationDefaults> LoadGenerationDefaults(const std::string& path) {
  GenerationDefaults d;
  if (!std::filesystem::exists(path)) return d;
  EM_ASSIGN_OR_RETURN(const std::string text, base::ReadFile(path));
  boost::system::error_code ec;
  json::value v = json::parse(text, ec);
  if (ec || !v.is_object()) {
    return absl::InvalidArgumentError(Cat(path, ": not a JSON object"));
  }
  const json::object& o = v.get_object();
  auto number = [&](std::string_view key) -> std::optional<double> {
    const json::value* x = o.if_contains(key);
    if (x == nullptr || !x->is_number()) return std::nullopt;
    return x->to_number<double>();
  };
  bool do_sample = true;
  if (const json::value* x = o.if_contains("do_sample"); x != nullptr && x->is_bool()) {
    do_sample = x->get_bool();
  }
  if (auto t = number("temperature")) d.temperature = static_cast<float>(*t);
  if (auto p = number("top_p")) d.top_p = static_cast<float>(*p);
  if (auto k = number("top_k")) d.top_k = static_cast<int32_t>(*k);
  if (!do_sample) d.temperature = 0.0f;  // transformers: greedy unless do_sample
  if (auto b = number("bos_token_id")) d.bos_token_id = static_cast<int32_t>(*b);
  if (const json::value* e = o.if_contains("eos_token_id"); e != nullptr) {
    if (e->is_number()) {
      d.eos_token_ids.push_back(static_cast<int32_t>(e->to_number<double>()));
    } else if (e->is_array()) {
      for (const json::value& id : e->get_array()) {
        if (id.is_number()) d.eos_token_ids.push_back(static_cast<int32_t>(id.to_number<double>()));
      }
    }
  }
  return d;
}

}  // namespace expertmesh::gateway
