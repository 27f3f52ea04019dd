// router-service: the cluster's control plane (membership, placement maps, load, status).
#include <csignal>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "core/format/config.h"
#include "placement/placement.h"
#include "router/router_service.h"
#include "service-common/handshake.h"
#include "service-common/metrics_http.h"
#include "service-common/process.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  CLI::App app{"router-service: ExpertMesh control plane (shard membership, placement maps)"};
  std::string model_dir, listen = "127.0.0.1:7000", placement_file, log_level = "info";
  std::string metrics_host = "127.0.0.1";
  int num_shards = 1, metrics_port = -1, heartbeat_ms = 500, expiry_ms = 2000;
  app.add_option("--model", model_dir, "Checkpoint directory (config.json)")->required();
  app.add_option("--num-shards", num_shards, "Shard groups of the even placement plan");
  app.add_option("--placement", placement_file, "JSON placement plan (overrides --num-shards)");
  app.add_option("--listen", listen, "gRPC address host:port (port 0 = any)");
  app.add_option("--metrics-port", metrics_port, "Port of /metrics (0 = any, -1 = off)");
  app.add_option("--metrics-host", metrics_host, "Address /metrics binds");
  app.add_option("--heartbeat-interval-ms", heartbeat_ms, "Heartbeat interval told to replicas");
  app.add_option("--expiry-ms", expiry_ms, "Replica removed after this long without heartbeat");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error");
  CLI11_PARSE(app, argc, argv);

  if (absl::Status s = BlockTerminationSignals(); !s.ok()) return 1;
  if (absl::Status s = SetupLogging("router", log_level); !s.ok()) {
    spdlog::error("{}", std::string(s.message()));
    return 2;
  }
  absl::StatusOr<ModelConfig> config = LoadModelConfig(model_dir + "/config.json");
  if (!config.ok()) {
    spdlog::error("{}", std::string(config.status().message()));
    return 1;
  }
  absl::StatusOr<Placement> placement = placement_file.empty()
                                            ? EvenPlacement(*config, num_shards)
                                            : LoadPlacementFile(placement_file, *config);
  if (!placement.ok()) {
    spdlog::error("{}", std::string(placement.status().message()));
    return 1;
  }
  MetricsRegistry metrics;
  RouterServerOptions options;
  options.server.listen = listen;
  options.membership.heartbeat_interval = absl::Milliseconds(heartbeat_ms);
  options.membership.expiry = absl::Milliseconds(expiry_ms);
  options.metrics = &metrics;
  absl::StatusOr<v1::PeerIdentity> identity = MakeLocalIdentity(model_dir, "router", "router");
  if (!identity.ok()) {
    spdlog::error("{}", std::string(identity.status().message()));
    return 1;
  }
  options.identity = *identity;
  std::unique_ptr<MetricsHttpServer> metrics_http;
  if (metrics_port >= 0) {
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> m =
        MetricsHttpServer::Start(&metrics, metrics_host, metrics_port);
    if (!m.ok()) {
      spdlog::error("{}", std::string(m.status().message()));
      return 1;
    }
    metrics_http = *std::move(m);
  }
  const int32_t shards = placement->num_shards;
  absl::StatusOr<std::unique_ptr<RouterServer>> server =
      RouterServer::Start(*std::move(placement), options);
  if (!server.ok()) {
    spdlog::error("{}", std::string(server.status().message()));
    return 1;
  }
  spdlog::info("router serving {} ({}) with {} shard groups on port {}", identity->model_name(),
               identity->model_fingerprint(), shards, (*server)->port());
  const int sig = WaitForTerminationSignal();
  spdlog::info("signal {}: shutting down", sig);
  (*server)->Shutdown();
  return 0;
}
