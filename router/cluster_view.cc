#include "router/cluster_view.h"

#include <algorithm>
#include <map>

#include <boost/json.hpp>

#include "router/router_service.h"
#include "service-common/metrics_http.h"

namespace expertmesh {
namespace {

namespace json = boost::json;

// A whole number as an integer ("40", not "4E1"), else the double.
json::value Number(double x) {
  if (x >= 0 && x < 9e15 && x == static_cast<double>(static_cast<uint64_t>(x))) {
    return static_cast<uint64_t>(x);
  }
  return x;
}

}  // namespace

std::string ClusterJson(const v1::StatusResponse& status, const LoadWindow::Sums& window,
                        const ClusterViewOptions& options) {
  const v1::PlacementMap& map = status.placement();
  const int32_t n_experts = map.n_routed_experts();
  // Both load tables are indexed by layer * n_routed_experts + expert (the window's shape is
  // the router's placement, which the map describes).
  const size_t cells = static_cast<size_t>(std::max(map.n_layers(), 0)) *
                       static_cast<size_t>(std::max(n_experts, 0));
  std::vector<uint64_t> total(cells, 0);
  for (const v1::LayerExpertLoad& l : status.expert_load()) {
    if (l.layer() < 0 || l.layer() >= map.n_layers() || l.expert() < 0 || l.expert() >= n_experts) {
      continue;
    }
    total[static_cast<size_t>(l.layer()) * n_experts + l.expert()] += l.tokens();
  }
  auto window_at = [&](size_t i) -> uint64_t {
    return window.tokens.size() == cells ? window.tokens[i] : 0;
  };
  // (layer -> expert -> shard groups holding it), from the groups: copies appear in several.
  std::map<int32_t, std::vector<std::vector<int32_t>>> holders;
  for (const v1::ShardGroup& g : map.shards()) {
    for (const v1::LayerExpert& le : g.experts()) {
      if (le.layer() < 0 || le.layer() >= map.n_layers() || le.expert() < 0 ||
          le.expert() >= n_experts) {
        continue;
      }
      std::vector<std::vector<int32_t>>& row = holders[le.layer()];
      row.resize(static_cast<size_t>(n_experts));
      row[static_cast<size_t>(le.expert())].push_back(g.shard_id());
    }
  }

  json::object out;
  out["model"] = status.model_name();
  out["placement_version"] = map.version();
  out["n_layers"] = map.n_layers();
  out["n_routed_experts"] = n_experts;
  out["experts_per_token"] = options.experts_per_token;
  out["num_hidden_layers"] = options.num_hidden_layers;
  out["load_window_s"] = Number(absl::ToDoubleSeconds(window.length));
  const double span_s = absl::ToDoubleSeconds(window.span);
  out["load_span_s"] = Number(span_s);

  uint64_t window_sum = 0, total_sum = 0, busiest_layer = 0;
  json::array layers;
  for (const auto& [layer, experts] : holders) {
    json::array w, t, groups;
    uint64_t layer_window = 0;
    for (int32_t e = 0; e < n_experts; ++e) {
      const size_t i = static_cast<size_t>(layer) * n_experts + e;
      w.emplace_back(window_at(i));
      t.emplace_back(total[i]);
      layer_window += window_at(i);
      total_sum += total[i];
      json::array g;
      for (int32_t s : experts[static_cast<size_t>(e)]) g.emplace_back(s);
      groups.emplace_back(std::move(g));
    }
    window_sum += layer_window;
    busiest_layer = std::max(busiest_layer, layer_window);
    json::object l;
    l["layer"] = layer;
    l["window"] = std::move(w);
    l["total"] = std::move(t);
    l["groups"] = std::move(groups);
    layers.emplace_back(std::move(l));
  }
  out["window_expert_tokens"] = window_sum;
  out["total_expert_tokens"] = total_sum;
  if (options.experts_per_token > 0 && span_s > 0) {
    out["tokens_per_s"] = static_cast<double>(busiest_layer) / options.experts_per_token / span_s;
  } else {
    out["tokens_per_s"] = nullptr;
  }

  json::array groups;
  for (const v1::ShardGroup& g : map.shards()) {
    json::object o;
    o["id"] = g.shard_id();
    o["n_experts"] = g.experts_size();
    json::object experts;
    double window_tokens = 0, total_tokens = 0;
    for (const v1::LayerExpert& le : g.experts()) {
      auto h = holders.find(le.layer());
      if (h == holders.end() || le.expert() < 0 || le.expert() >= n_experts) continue;
      const std::string key = std::to_string(le.layer());
      if (!experts.contains(key)) experts[key] = json::array();
      experts[key].as_array().emplace_back(le.expert());
      // An expert held by k groups: 1/k of its tokens here.
      const double copies = static_cast<double>(h->second[static_cast<size_t>(le.expert())].size());
      const size_t i = static_cast<size_t>(le.layer()) * n_experts + le.expert();
      window_tokens += static_cast<double>(window_at(i)) / copies;
      total_tokens += static_cast<double>(total[i]) / copies;
    }
    o["experts"] = std::move(experts);
    int healthy = 0;
    json::array replicas;
    for (const v1::ShardReplica& r : g.replicas()) {
      healthy += r.healthy() && !r.loading() ? 1 : 0;  // a loading replica serves nothing yet
      json::object ro;
      ro["id"] = r.replica_id();
      ro["address"] = r.address();
      ro["data_address"] = r.data_address();
      ro["healthy"] = r.healthy();
      ro["capacity"] = r.capacity();
      ro["outstanding_rows"] = r.outstanding_rows();
      ro["last_heartbeat_ms_ago"] = r.last_heartbeat_ms_ago();
      ro["loading"] = r.loading();
      ro["device_kind"] = r.device_kind();
      ro["capacity_weight"] = r.capacity_weight();
      replicas.emplace_back(std::move(ro));
    }
    o["healthy_replicas"] = healthy;
    o["replicas"] = std::move(replicas);
    o["window_tokens"] = Number(window_tokens);
    o["total_tokens"] = Number(total_tokens);
    groups.emplace_back(std::move(o));
  }
  out["shard_groups"] = std::move(groups);
  const v1::RebalanceState& rb = status.rebalance();
  json::object rebalance;
  rebalance["automatic"] = rb.automatic();
  rebalance["threshold"] = Number(rb.threshold());
  rebalance["window_s"] = rb.window_s();
  rebalance["imbalance"] = Number(rb.imbalance());
  rebalance["pending"] = rb.pending();
  rebalance["changes"] = rb.rebalances();
  rebalance["redundant_copies"] = rb.redundant_copies();
  rebalance["last_result"] = rb.last_result();
  rebalance["last_change_ms_ago"] = rb.last_change_ms_ago();
  out["rebalance"] = std::move(rebalance);
  out["layers"] = std::move(layers);
  return json::serialize(out);
}

void AddClusterPageRoutes(MetricsHttpServer& http, const RouterServiceImpl& router,
                          const ClusterViewOptions& options) {
  for (const WebAsset& asset : WebAssets()) {
    HttpRouteHandler serve = [asset] {
      return HttpReply{std::string(asset.content_type), std::string(asset.body)};
    };
    if (asset.path == "/index.html") http.AddRoute("/", serve);
    http.AddRoute(std::string(asset.path), std::move(serve));
  }
  http.AddRoute("/api/cluster", [&router, options] {
    v1::StatusResponse status;
    LoadWindow::Sums window;
    router.Snapshot(&status, &window);
    return HttpReply{"application/json", ClusterJson(status, window, options)};
  });
}

}  // namespace expertmesh
