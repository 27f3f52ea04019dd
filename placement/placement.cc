#include "placement/placement.h"

#include <algorithm>

#include <boost/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/base/file.h"

namespace expertmesh {
namespace {

Placement EmptyPlacement(const ModelConfig& config, int32_t num_shards) {
  Placement p;
  p.num_shards = num_shards;
  p.n_layers = static_cast<int32_t>(config.num_hidden_layers + config.num_nextn_predict_layers);
  p.n_routed_experts = static_cast<int32_t>(config.n_routed_experts);
  p.shard_of.assign(static_cast<size_t>(p.n_layers) * p.n_routed_experts, -1);
  return p;
}

}  // namespace

int32_t Placement::ShardOf(int64_t layer, int64_t expert) const {
  if (layer < 0 || layer >= n_layers || expert < 0 || expert >= n_routed_experts) return -1;
  return shard_of[layer * n_routed_experts + expert];
}

std::vector<LayerExpert> Placement::ExpertsOf(int32_t shard) const {
  std::vector<LayerExpert> out;
  for (int32_t l = 0; l < n_layers; ++l) {
    for (int32_t e = 0; e < n_routed_experts; ++e) {
      if (shard_of[static_cast<size_t>(l) * n_routed_experts + e] == shard) out.push_back({l, e});
    }
  }
  return out;
}

absl::StatusOr<Placement> EvenPlacement(const ModelConfig& config, int32_t num_shards) {
  if (num_shards < 1 || num_shards > config.n_routed_experts) {
    return absl::InvalidArgumentError(absl::StrCat("num_shards ", num_shards, " must be in [1, ",
                                                   config.n_routed_experts,
                                                   "] (n_routed_experts)"));
  }
  Placement p = EmptyPlacement(config, num_shards);
  for (int32_t l = 0; l < p.n_layers; ++l) {
    if (!config.IsMoeLayer(l)) continue;
    for (int32_t e = 0; e < p.n_routed_experts; ++e) {
      p.shard_of[static_cast<size_t>(l) * p.n_routed_experts + e] =
          static_cast<int32_t>(static_cast<int64_t>(e) * num_shards / p.n_routed_experts);
    }
  }
  return p;
}

absl::StatusOr<Placement> PlacementFromJson(std::string_view json, const ModelConfig& config) {
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(boost::json::string_view(json.data(), json.size()), ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("placement: bad JSON: ", ec.message()));
  const auto* root = v.if_object();
  if (!root) return absl::InvalidArgumentError("placement: the top level must be an object");
  const auto* ns = root->if_contains("num_shards");
  if (!ns || !ns->is_int64()) {
    return absl::InvalidArgumentError("placement: num_shards must be an integer");
  }
  const int64_t num_shards = ns->as_int64();
  if (num_shards < 1 || num_shards > config.n_routed_experts * 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement: num_shards ", num_shards, " out of range"));
  }
  const auto* layers_v = root->if_contains("layers");
  if (!layers_v || !layers_v->is_object()) {
    return absl::InvalidArgumentError("placement: layers must be an object");
  }
  Placement p = EmptyPlacement(config, static_cast<int32_t>(num_shards));
  for (const auto& kv : layers_v->as_object()) {
    const std::string key(kv.key());
    int32_t layer;
    if (!absl::SimpleAtoi(key, &layer) || layer < 0 || layer >= p.n_layers ||
        !config.IsMoeLayer(layer)) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement: layers.\"", key, "\" is not a MoE layer of this model"));
    }
    const auto* arr = kv.value().if_array();
    if (!arr || static_cast<int64_t>(arr->size()) != p.n_routed_experts) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement: layers.", key, " must list ", p.n_routed_experts, " shard ids"));
    }
    for (int32_t e = 0; e < p.n_routed_experts; ++e) {
      const auto& s = (*arr)[e];
      if (!s.is_int64() || s.as_int64() < 0 || s.as_int64() >= num_shards) {
        return absl::InvalidArgumentError(absl::StrCat(
            "placement: layers.", key, "[", e, "] must be a shard id in [0, ", num_shards, ")"));
      }
      p.shard_of[static_cast<size_t>(layer) * p.n_routed_experts + e] =
          static_cast<int32_t>(s.as_int64());
    }
  }
  for (int32_t l = 0; l < p.n_layers; ++l) {
    if (config.IsMoeLayer(l) && p.ShardOf(l, 0) < 0) {
      return absl::InvalidArgumentError(absl::StrCat("placement: MoE layer ", l, " is missing"));
    }
  }
  for (int32_t s = 0; s < p.num_shards; ++s) {
    if (p.ExpertsOf(s).empty()) {
      return absl::InvalidArgumentError(absl::StrCat("placement: shard ", s, " holds no expert"));
    }
  }
  return p;
}

absl::StatusOr<Placement> LoadPlacementFile(const std::string& path, const ModelConfig& config) {
  absl::StatusOr<std::string> text = base::ReadFile(path);
  if (!text.ok()) {
    return absl::Status(text.status().code(),
                        absl::StrCat("cannot read placement file ", text.status().message()));
  }
  absl::StatusOr<Placement> p = PlacementFromJson(*text, config);
  if (!p.ok())
    return absl::Status(p.status().code(), absl::StrCat(path, ": ", p.status().message()));
  return p;
}

std::string PlacementToJson(const Placement& placement) {
  boost::json::object root;
  root["num_shards"] = placement.num_shards;
  boost::json::object layers;
  for (int32_t l = 0; l < placement.n_layers; ++l) {
    if (placement.ShardOf(l, 0) < 0) continue;
    boost::json::array arr;
    for (int32_t e = 0; e < placement.n_routed_experts; ++e) arr.push_back(placement.ShardOf(l, e));
    layers[std::to_string(l)] = std::move(arr);
  }
  root["layers"] = std::move(layers);
  return boost::json::serialize(root);
}

absl::StatusOr<std::vector<LayerExpert>> ParseExpertList(std::string_view text) {
  std::vector<LayerExpert> out;
  const std::string compact = absl::StrReplaceAll(std::string(text), {{" ", ""}});
  for (absl::string_view part : absl::StrSplit(compact, ';', absl::SkipEmpty())) {
    const std::vector<absl::string_view> lr = absl::StrSplit(part, ':');
    int32_t layer;
    if (lr.size() != 2 || !absl::SimpleAtoi(lr[0], &layer) || layer < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("experts: '", part, "' is not layer:e1,e2,..."));
    }
    for (absl::string_view item : absl::StrSplit(lr[1], ',', absl::SkipEmpty())) {
      int32_t lo, hi;
      const std::vector<absl::string_view> range = absl::StrSplit(item, '-');
      if (range.size() == 1 && absl::SimpleAtoi(range[0], &lo)) {
        hi = lo;
      } else if (range.size() != 2 || !absl::SimpleAtoi(range[0], &lo) ||
                 !absl::SimpleAtoi(range[1], &hi)) {
        return absl::InvalidArgumentError(absl::StrCat("experts: bad expert id '", item, "'"));
      }
      if (lo < 0 || hi < lo || hi - lo > 1 << 20) {
        return absl::InvalidArgumentError(absl::StrCat("experts: bad range '", item, "'"));
      }
      for (int32_t e = lo; e <= hi; ++e) out.push_back({layer, e});
    }
  }
  if (out.empty()) return absl::InvalidArgumentError("experts: empty list");
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

void FillShardGroups(const Placement& placement, v1::PlacementMap* map) {
  map->set_n_layers(placement.n_layers);
  map->set_n_routed_experts(placement.n_routed_experts);
  map->clear_shards();
  for (int32_t s = 0; s < placement.num_shards; ++s) {
    v1::ShardGroup* g = map->add_shards();
    g->set_shard_id(s);
    for (const LayerExpert& le : placement.ExpertsOf(s)) {
      v1::LayerExpert* p = g->add_experts();
      p->set_layer(le.layer);
      p->set_expert(le.expert);
    }
  }
}

absl::StatusOr<Placement> PlacementFromMap(const v1::PlacementMap& map) {
  Placement p;
  p.n_layers = map.n_layers();
  p.n_routed_experts = map.n_routed_experts();
  if (p.n_layers <= 0 || p.n_routed_experts <= 0 || p.n_layers > (1 << 16) ||
      p.n_routed_experts > (1 << 16)) {
    return absl::InvalidArgumentError("placement map: bad n_layers / n_routed_experts");
  }
  p.shard_of.assign(static_cast<size_t>(p.n_layers) * p.n_routed_experts, -1);
  for (const v1::ShardGroup& g : map.shards()) {
    if (g.shard_id() < 0 || g.shard_id() >= map.shards_size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement map: shard id ", g.shard_id(), " out of range"));
    }
    p.num_shards = std::max(p.num_shards, g.shard_id() + 1);
    for (const v1::LayerExpert& le : g.experts()) {
      if (le.layer() < 0 || le.layer() >= p.n_layers || le.expert() < 0 ||
          le.expert() >= p.n_routed_experts) {
        return absl::InvalidArgumentError(absl::StrCat("placement map: layer ", le.layer(),
                                                       " expert ", le.expert(), " out of range"));
      }
      int32_t& slot =
          p.shard_of[static_cast<size_t>(le.layer()) * p.n_routed_experts + le.expert()];
      if (slot >= 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "placement map: layer ", le.layer(), " expert ", le.expert(), " is in two shards"));
      }
      slot = g.shard_id();
    }
  }
  return p;
}

}  // namespace expertmesh
