// The router's operator page: GET /api/cluster (a JSON picture of the cluster: placement map,
// shard groups and their replicas, the expert load of the recent window and since start,
// tokens per second) and the page itself (router/web/index.html + ui.js, embedded into the
// binary at build time, served at / and /ui.js). router/main.cc adds these routes to the
// /metrics HTTP server (--metrics-port).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "expertmesh/v1/router.pb.h"
#include "router/load_window.h"

namespace expertmesh {

class MetricsHttpServer;
class RouterServiceImpl;

struct ClusterViewOptions {
  int32_t experts_per_token = 0;  // the config's num_experts_per_tok; 0 = unknown (no tokens/s)
  int32_t num_hidden_layers = 0;  // layers from here on are MTP layers; 0 = unknown
};

// /api/cluster for a status view and the load window's sums (taken together by
// RouterServiceImpl::Snapshot). The JSON:
//   model, placement_version, n_layers, n_routed_experts, experts_per_token,
//   num_hidden_layers (0 = unknown; layers from there on are the MTP module's),
//   load_window_s (configured length), load_span_s (what rates divide by),
//   window_expert_tokens / total_expert_tokens: (token, expert) assignments summed,
//   tokens_per_s: tokens through the busiest MoE layer per second in the window (its
//     assignments / experts_per_token / load_span_s; drafted tokens being verified count);
//     null when experts_per_token is unknown,
//   shard_groups: [{id, n_experts, experts: {"<layer>": [expert, ...]}, healthy_replicas (not
//     counting replicas still loading), replicas: [{id, address, healthy, loading, device_kind,
//     capacity_weight, capacity, outstanding_rows, last_heartbeat_ms_ago}], window_tokens,
//     total_tokens}]; an expert held by k groups adds 1/k of its tokens to each (the expected
//     share: the dispatcher spreads rows over the copies),
//   layers: [{layer, window: [E tokens], total: [E tokens], groups: [E lists of shard ids]}]
//     for every layer that has experts in the map, ascending; more than one group = copies,
//   rebalance: {automatic, threshold, window_s, imbalance, pending, changes, redundant_copies,
//     last_result, last_change_ms_ago} (router/rebalancer.h).
std::string ClusterJson(const v1::StatusResponse& status, const LoadWindow::Sums& window,
                        const ClusterViewOptions& options);

// The embedded page files: "/index.html" and "/ui.js" (generated from router/web/ at build
// time). Empty when there is no such file.
struct WebAsset {
  std::string_view path;
  std::string_view content_type;
  std::string_view body;
};
const std::vector<WebAsset>& WebAssets();

// Serves the page and /api/cluster (built from `router` on every request) on `http`.
// `router` must outlive the routes: destroy `http` (or stop serving) first.
void AddClusterPageRoutes(MetricsHttpServer& http, const RouterServiceImpl& router,
                          const ClusterViewOptions& options);

}  // namespace expertmesh
