// router-service: the cluster's control plane (membership, placement maps, load, status).
// With --metrics-port, that HTTP port also serves the operator page (/, /ui.js, /api/cluster;
// router/cluster_view.h).
#include <memory>
#include <string>

#include "core/format/config.h"
#include "placement/placement.h"
#include "router/cluster_view.h"
#include "router/router_service.h"
#include "service-common/bootstrap.h"
#include "service-common/handshake.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  ServiceMain main("router",
                   "router-service: ExpertMesh control plane (shard membership, placement maps)",
                   {.listen = "127.0.0.1:7000"});
  CLI::App& app = main.app();
  std::string model_dir, placement_file;
  int num_shards = 1, heartbeat_ms = 500, expiry_ms = 2000;
  app.add_option("--model", model_dir, "Checkpoint directory (config.json)")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--num-shards", num_shards, "Shard groups of the even placement plan")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  bool group_aligned = false;
  app.add_flag("--group-aligned", group_aligned,
               "Place whole expert groups on shard groups (a token then reaches at most "
               "topk_group of them; with more shard groups than expert groups each expert group "
               "is copied on several), instead of the even plan");
  app.add_option("--placement", placement_file, "JSON placement plan (overrides --num-shards)")
      ->check(CLI::ExistingFile);
  app.add_option("--heartbeat-interval-ms", heartbeat_ms, "Heartbeat interval told to replicas")
      ->check(CLI::Range(10, 600000))
      ->capture_default_str();
  app.add_option("--expiry-ms", expiry_ms, "Replica removed after this long without heartbeat")
      ->check(CLI::Range(10, 3600000))
      ->capture_default_str();
  RebalancerOptions rebalance;
  bool no_rebalance = false;
  double check_s = 10, interval_s = 0, cooldown_s = 60, change_timeout_s = 120;
  app.add_flag("--no-rebalance", no_rebalance,
               "No automatic rebalancing (expertmesh rebalance still applies one by hand)");
  app.add_option("--rebalance-threshold", rebalance.threshold,
                 "Rebalance when the mean over MoE layers of the busiest shard group's load / "
                 "its capacity share exceeds this (1 = perfectly even)")
      ->check(CLI::Range(1.0, 100.0))
      ->capture_default_str();
  app.add_option("--rebalance-min-gain", rebalance.min_gain,
                 "Apply a new placement only when it predicts this much less (relative)")
      ->check(CLI::Range(0.0, 0.99))
      ->capture_default_str();
  app.add_option("--rebalance-check-s", check_s, "How often the threshold is checked")
      ->check(CLI::Range(1.0, 86400.0))
      ->capture_default_str();
  app.add_option("--rebalance-interval-s", interval_s,
                 "Also rebalance this often below the threshold when it gains (0 = never)")
      ->check(CLI::Range(0.0, 604800.0))
      ->capture_default_str();
  app.add_option("--rebalance-cooldown-s", cooldown_s, "Least time between automatic changes")
      ->check(CLI::Range(0.0, 86400.0))
      ->capture_default_str();
  app.add_option("--rebalance-min-tokens", rebalance.min_tokens,
                 "Routed tokens the load window must hold before a rebalance")
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 50))
      ->capture_default_str();
  app.add_option("--extra-expert-slots", rebalance.extra_slots,
                 "Experts a shard group may hold per layer beyond its initial share (room for "
                 "redundant copies; each costs one expert's memory per layer)")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  app.add_option("--redundant-experts", rebalance.redundant_per_layer,
                 "Redundant copies per layer (-1 = every free slot)")
      ->check(CLI::Range(-1, 1 << 20))
      ->capture_default_str();
  app.add_option("--placement-change-timeout-s", change_timeout_s,
                 "A placement change not held by every replica by then is abandoned")
      ->check(CLI::Range(1.0, 86400.0))
      ->capture_default_str();
  if (std::optional<int> exit = main.Parse(argc, argv)) return *exit;
  rebalance.automatic = !no_rebalance;
  rebalance.check_every = absl::Seconds(check_s);
  rebalance.interval = absl::Seconds(interval_s);
  rebalance.cooldown = absl::Seconds(cooldown_s);
  if (expiry_ms <= heartbeat_ms) {
    spdlog::error("--expiry-ms ({}) must exceed --heartbeat-interval-ms ({})", expiry_ms,
                  heartbeat_ms);
    return kExitUsage;
  }

  absl::StatusOr<ModelConfig> config = LoadModelConfig(model_dir + "/config.json");
  if (!config.ok()) return main.StartFailed(config.status());
  if (group_aligned && !placement_file.empty()) {
    spdlog::error("--group-aligned and --placement exclude each other");
    return kExitUsage;
  }
  bool aligned = true;
  absl::StatusOr<Placement> placement =
      !placement_file.empty() ? LoadPlacementFile(placement_file, *config)
      : group_aligned         ? GroupAlignedPlacement(*config, num_shards, &aligned)
                              : EvenPlacement(*config, num_shards);
  if (group_aligned && placement.ok() && !aligned) {
    spdlog::warn(
        "--group-aligned: {} expert groups do not divide evenly over {} shard groups (or the "
        "reverse): using the even plan",
        config->n_group, num_shards);
  }
  if (!placement.ok()) return main.StartFailed(placement.status());
  MetricsRegistry metrics;
  RouterServerOptions options;
  options.server.listen = main.flags().listen;
  options.membership.heartbeat_interval = absl::Milliseconds(heartbeat_ms);
  options.membership.expiry = absl::Milliseconds(expiry_ms);
  options.membership.change_timeout = absl::Seconds(change_timeout_s);
  options.model = *config;
  options.rebalance = rebalance;
  options.metrics = &metrics;
  absl::StatusOr<v1::PeerIdentity> identity = MakeLocalIdentity(model_dir, "router", "router");
  if (!identity.ok()) return main.StartFailed(identity.status());
  options.identity = *identity;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> metrics_http = main.StartMetrics(&metrics);
  if (!metrics_http.ok()) return main.StartFailed(metrics_http.status());
  const int32_t shards = placement->num_shards;
  absl::StatusOr<std::unique_ptr<RouterServer>> server =
      RouterServer::Start(*std::move(placement), options);
  if (!server.ok()) return main.StartFailed(server.status());
  spdlog::info("router serving {} ({}) with {} shard groups on port {}", identity->model_name(),
               identity->model_fingerprint(), shards, (*server)->port());
  if (*metrics_http) {
    AddClusterPageRoutes(**metrics_http, (*server)->service(),
                         {.experts_per_token = static_cast<int32_t>(config->num_experts_per_tok),
                          .num_hidden_layers = static_cast<int32_t>(config->num_hidden_layers)});
    spdlog::info("operator page: http://{}:{}/", main.MetricsHost(), (*metrics_http)->port());
  }
  return main.RunUntilSignal([&] {
    metrics_http->reset();  // its page routes read the router service: stop serving them first
    (*server)->Shutdown();
  });
}
