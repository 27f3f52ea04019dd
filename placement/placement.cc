#include "placement/placement.h"

#include <algorithm>

#include <boost/json.hpp>

#include "absl/container/inlined_vector.h"

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

std::span<const int32_t> Placement::ShardsOf(int64_t layer, int64_t expert) const {
  if (layer < 0 || layer >= n_layers || expert < 0 || expert >= n_routed_experts) return {};
  const size_t i = static_cast<size_t>(layer) * n_routed_experts + expert;
  if (copy_offsets.empty()) {
    if (shard_of[i] < 0) return {};
    return std::span<const int32_t>(&shard_of[i], 1);
  }
  return std::span<const int32_t>(copy_shards.data() + copy_offsets[i],
                                  copy_offsets[i + 1] - copy_offsets[i]);
}

std::vector<LayerExpert> Placement::ExpertsOf(int32_t shard) const {
  std::vector<LayerExpert> out;
  for (int32_t l = 0; l < n_layers; ++l) {
    for (int32_t e = 0; e < n_routed_experts; ++e) {
      const std::span<const int32_t> s = ShardsOf(l, e);
      if (std::find(s.begin(), s.end(), shard) != s.end()) out.push_back({l, e});
    }
  }
  return out;
}

absl::Status Placement::SetCopies(const std::vector<std::vector<int32_t>>& shards) {
  const size_t n = static_cast<size_t>(n_layers) * n_routed_experts;
  if (shards.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("placement: ", shards.size(), " copy lists for ",
                                                   n, " (layer, expert) pairs"));
  }
  bool copies = false;
  for (size_t i = 0; i < n; ++i) {
    const std::vector<int32_t>& s = shards[i];
    for (size_t j = 0; j < s.size(); ++j) {
      if (s[j] < 0 || s[j] >= num_shards || (j > 0 && s[j] <= s[j - 1])) {
        return absl::InvalidArgumentError(absl::StrCat(
            "placement: layer ", i / n_routed_experts, " expert ", i % n_routed_experts,
            ": shards must be distinct, ascending and in [0, ", num_shards, ")"));
      }
    }
    copies |= s.size() > 1;
  }
  shard_of.assign(n, -1);
  copy_offsets.clear();
  copy_shards.clear();
  for (size_t i = 0; i < n; ++i) {
    if (!shards[i].empty()) shard_of[i] = shards[i].front();
  }
  if (copies) {
    copy_offsets.reserve(n + 1);
    copy_offsets.push_back(0);
    for (size_t i = 0; i < n; ++i) {
      copy_shards.insert(copy_shards.end(), shards[i].begin(), shards[i].end());
      copy_offsets.push_back(static_cast<int32_t>(copy_shards.size()));
    }
  }
  return absl::OkStatus();
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
  std::vector<std::vector<int32_t>> copies(p.shard_of.size());
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
      return absl::InvalidArgumentError(absl::StrCat("placement: layers.", key, " must list ",
                                                     p.n_routed_experts,
                                                     " shard ids (or arrays of them)"));
    }
    for (int32_t e = 0; e < p.n_routed_experts; ++e) {
      const auto& item = (*arr)[e];
      std::vector<int32_t>& out = copies[static_cast<size_t>(layer) * p.n_routed_experts + e];
      if (!out.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement: layer ", key, " is given twice"));
      }
      const auto add = [&](const boost::json::value& s) -> absl::Status {
        if (!s.is_int64() || s.as_int64() < 0 || s.as_int64() >= num_shards) {
          return absl::InvalidArgumentError(absl::StrCat("placement: layers.", key, "[", e,
                                                         "] must be a shard id in [0, ", num_shards,
                                                         ") or an array of them"));
        }
        out.push_back(static_cast<int32_t>(s.as_int64()));
        return absl::OkStatus();
      };
      if (const auto* list = item.if_array()) {
        if (list->empty()) {
          return absl::InvalidArgumentError(
              absl::StrCat("placement: layers.", key, "[", e,
                           "] is an empty array: every expert needs a shard"));
        }
        for (const auto& s : *list) {
          if (absl::Status st = add(s); !st.ok()) return st;
        }
        std::sort(out.begin(), out.end());
        if (std::adjacent_find(out.begin(), out.end()) != out.end()) {
          return absl::InvalidArgumentError(
              absl::StrCat("placement: layers.", key, "[", e,
                           "] lists a shard twice (a second copy in one group is useless)"));
        }
      } else if (absl::Status st = add(item); !st.ok()) {
        return st;
      }
    }
  }
  if (absl::Status st = p.SetCopies(copies); !st.ok()) return st;
  for (int32_t l = 0; l < p.n_layers; ++l) {
    if (config.IsMoeLayer(l) && p.ShardOf(l, 0) < 0) {
      return absl::InvalidArgumentError(absl::StrCat("placement: MoE layer ", l, " is missing"));
    }
  }
  std::vector<bool> holds(p.num_shards, false);
  for (int32_t s : p.HasCopies() ? p.copy_shards : p.shard_of) {
    if (s >= 0) holds[s] = true;
  }
  for (int32_t s = 0; s < p.num_shards; ++s) {
    if (!holds[s]) {
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
    for (int32_t e = 0; e < placement.n_routed_experts; ++e) {
      const std::span<const int32_t> s = placement.ShardsOf(l, e);
      if (s.size() == 1) {
        arr.push_back(s[0]);
      } else {
        arr.push_back(boost::json::array(s.begin(), s.end()));
      }
    }
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
  std::vector<v1::ShardGroup*> groups;
  for (int32_t s = 0; s < placement.num_shards; ++s) {
    groups.push_back(map->add_shards());
    groups.back()->set_shard_id(s);
  }
  for (int32_t l = 0; l < placement.n_layers; ++l) {
    for (int32_t e = 0; e < placement.n_routed_experts; ++e) {
      for (int32_t s : placement.ShardsOf(l, e)) {
        v1::LayerExpert* p = groups[s]->add_experts();
        p->set_layer(l);
        p->set_expert(e);
      }
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
  const size_t n = static_cast<size_t>(p.n_layers) * p.n_routed_experts;
  std::vector<std::vector<int32_t>> copies(n);
  std::vector<bool> seen_id(map.shards_size(), false);
  for (const v1::ShardGroup& g : map.shards()) {
    if (g.shard_id() < 0 || g.shard_id() >= map.shards_size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement map: shard id ", g.shard_id(), " out of range"));
    }
    if (seen_id[g.shard_id()]) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement map: shard id ", g.shard_id(), " appears twice"));
    }
    seen_id[g.shard_id()] = true;
    p.num_shards = std::max(p.num_shards, g.shard_id() + 1);
    for (const v1::LayerExpert& le : g.experts()) {
      if (le.layer() < 0 || le.layer() >= p.n_layers || le.expert() < 0 ||
          le.expert() >= p.n_routed_experts) {
        return absl::InvalidArgumentError(absl::StrCat("placement map: layer ", le.layer(),
                                                       " expert ", le.expert(), " out of range"));
      }
      std::vector<int32_t>& c =
          copies[static_cast<size_t>(le.layer()) * p.n_routed_experts + le.expert()];
      if (std::find(c.begin(), c.end(), g.shard_id()) != c.end()) {
        return absl::InvalidArgumentError(absl::StrCat("placement map: layer ", le.layer(),
                                                       " expert ", le.expert(),
                                                       " is listed twice in shard ", g.shard_id()));
      }
      c.push_back(g.shard_id());
    }
  }
  for (int32_t l = 0; l < p.n_layers; ++l) {
    const size_t row = static_cast<size_t>(l) * p.n_routed_experts;
    bool any = false;
    for (int32_t e = 0; e < p.n_routed_experts; ++e) any |= !copies[row + e].empty();
    if (!any) continue;  // not a MoE layer
    for (int32_t e = 0; e < p.n_routed_experts; ++e) {
      if (copies[row + e].empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement map: layer ", l, " expert ", e, " is in no shard"));
      }
      std::sort(copies[row + e].begin(), copies[row + e].end());
    }
  }
  if (absl::Status st = p.SetCopies(copies); !st.ok()) return st;
  return p;
}

bool ChooseShards(const Placement& placement, int layer, std::span<const int32_t> row_experts,
                  uint64_t row_key, std::span<int32_t> shard_out, CopyChoice choice) {
  if (row_experts.size() != shard_out.size()) {
    std::fill(shard_out.begin(), shard_out.end(), -1);
    return false;
  }
  const size_t k = row_experts.size();
  constexpr int32_t kPending = -2;
  absl::InlinedVector<int32_t, 16> used;  // shard groups the row already goes to
  const auto use = [&](int32_t s) {
    if (std::find(used.begin(), used.end(), s) == used.end()) used.push_back(s);
  };
  bool ok = true;
  // Experts with one copy have no choice; their groups are used whatever the rest picks.
  for (size_t i = 0; i < k; ++i) {
    const std::span<const int32_t> c = placement.ShardsOf(layer, row_experts[i]);
    if (c.empty()) {
      shard_out[i] = -1;
      ok = false;
    } else if (c.size() == 1) {
      shard_out[i] = c[0];
      use(c[0]);
    } else {
      shard_out[i] = kPending;
    }
  }
  for (size_t i = 0; i < k; ++i) {
    if (shard_out[i] != kPending) continue;
    const std::span<const int32_t> c = placement.ShardsOf(layer, row_experts[i]);
    const size_t m = c.size();
    // The ascending copies rotated by (row_key + expert): consecutive keys take turns.
    const size_t start = static_cast<size_t>(
        (row_key + static_cast<uint64_t>(static_cast<uint32_t>(row_experts[i]))) % m);
    int32_t pick = c[start];
    if (choice == CopyChoice::kFewerGroups) {
      for (size_t j = 0; j < m; ++j) {
        const int32_t s = c[(start + j) % m];
        if (std::find(used.begin(), used.end(), s) != used.end()) {
          pick = s;
          break;
        }
      }
    }
    shard_out[i] = pick;
    use(pick);
  }
  return ok;
}

absl::StatusOr<Placement> GroupAlignedPlacement(const ModelConfig& config, int32_t num_shards,
                                                bool* aligned) {
  absl::StatusOr<Placement> even = EvenPlacement(config, num_shards);
  if (!even.ok()) return even.status();
  if (aligned) *aligned = false;
  const int64_t E = config.n_routed_experts;
  const int64_t n_group = config.n_group;
  if (n_group <= 1 || config.topk_group >= n_group || E % n_group != 0 ||
      (n_group % num_shards != 0 && num_shards % n_group != 0)) {
    return even;  // no group limit to exploit, or groups and shards do not divide
  }
  if (aligned) *aligned = true;
  const int64_t per_group = E / n_group;
  Placement p = EmptyPlacement(config, num_shards);
  std::vector<std::vector<int32_t>> copies(p.shard_of.size());
  for (int32_t l = 0; l < p.n_layers; ++l) {
    if (!config.IsMoeLayer(l)) continue;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t g = e / per_group;
      std::vector<int32_t>& c = copies[static_cast<size_t>(l) * E + e];
      if (n_group % num_shards == 0) {
        c.push_back(static_cast<int32_t>(g / (n_group / num_shards)));
      } else {
        const int64_t k = num_shards / n_group;
        for (int64_t j = 0; j < k; ++j) c.push_back(static_cast<int32_t>(g * k + j));
      }
    }
  }
  if (absl::Status st = p.SetCopies(copies); !st.ok()) return st;
  return p;
}

}  // namespace expertmesh
