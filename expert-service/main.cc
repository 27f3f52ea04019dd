// expert-service: one replica of one expert shard group.
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "expert-service/expert_service.h"
#include "placement/placement.h"
#include "service-common/metrics_http.h"
#include "service-common/process.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  CLI::App app{"expert-service: serves the routed experts of one ExpertMesh shard group"};
  std::string model_dir, listen = "127.0.0.1:0", router, experts_text, advertise;
  std::string log_level = "info", metrics_host = "127.0.0.1", instance_id;
  int shard_id = -1, num_shards = -1, metrics_port = -1;
  uint64_t max_request_mib = 48;
  bool no_act_quant = false;
  std::string device = "cpu";
  app.add_option("--model", model_dir, "Checkpoint directory")->required();
  app.add_option("--shard-id", shard_id, "This replica's shard group (with --num-shards)");
  app.add_option("--num-shards", num_shards, "Shard groups of the even placement plan");
  app.add_option("--experts", experts_text,
                 "Explicit experts \"layer:e1,e2;layer:...\" (with --shard-id; the router "
                 "must use a placement file that agrees)");
  app.add_option("--listen", listen, "gRPC address host:port (port 0 = any)");
  app.add_option("--advertise", advertise, "Address given to the router (default: listen)");
  app.add_option("--router", router, "Router address host:port: register and heartbeat");
  app.add_option("--metrics-port", metrics_port, "Port of /metrics (0 = any, -1 = off)");
  app.add_option("--metrics-host", metrics_host, "Address /metrics binds");
  app.add_option("--max-request-mib", max_request_mib, "Largest accepted request message");
  app.add_option("--instance-id", instance_id, "Name in logs and handshakes");
  app.add_option("--device", device, "cpu, or cuda:N[,M...]: the experts spread over these GPUs")
      ->capture_default_str();
  app.add_flag("--no-act-quant", no_act_quant, "Do not quantize the intermediate activations");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error");
  CLI11_PARSE(app, argc, argv);

  if (absl::Status s = BlockTerminationSignals(); !s.ok()) return 1;
  if (absl::Status s = SetupLogging("expert", log_level); !s.ok()) {
    spdlog::error("{}", std::string(s.message()));
    return 2;
  }
  absl::StatusOr<ModelConfig> config = LoadModelConfig(model_dir + "/config.json");
  if (!config.ok()) {
    spdlog::error("{}", std::string(config.status().message()));
    return 1;
  }
  ExpertServerOptions options;
  options.model_dir = model_dir;
  options.device = device;
  if (!experts_text.empty()) {
    absl::StatusOr<std::vector<LayerExpert>> experts = ParseExpertList(experts_text);
    if (!experts.ok()) {
      spdlog::error("{}", std::string(experts.status().message()));
      return 2;
    }
    options.experts = *std::move(experts);
    options.shard_id = std::max(shard_id, 0);
  } else if (shard_id >= 0 && num_shards > 0) {
    absl::StatusOr<Placement> plan = EvenPlacement(*config, num_shards);
    if (!plan.ok() || shard_id >= num_shards) {
      spdlog::error("--shard-id {} --num-shards {}: {}", shard_id, num_shards,
                    plan.ok() ? "shard id out of range" : std::string(plan.status().message()));
      return 2;
    }
    options.experts = plan->ExpertsOf(shard_id);
    options.shard_id = shard_id;
  } else {
    spdlog::error("give --shard-id and --num-shards, or --experts");
    return 2;
  }
  options.server.listen = listen;
  options.advertise_address = advertise;
  options.router_address = router;
  options.instance_id =
      instance_id.empty() ? absl::StrCat("expert-shard", options.shard_id) : instance_id;
  options.limits.max_request_bytes = max_request_mib << 20;
  options.quantize_activations = !no_act_quant;
  MetricsRegistry metrics;
  options.metrics = &metrics;
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
  absl::StatusOr<std::unique_ptr<ExpertServer>> server = ExpertServer::Start(std::move(options));
  if (!server.ok()) {
    spdlog::error("{}", std::string(server.status().message()));
    return 1;
  }
  spdlog::info("expert-service ready on port {}", (*server)->port());
  const int sig = WaitForTerminationSignal();
  spdlog::info("signal {}: draining", sig);
  (*server)->Drain();
  return 0;
}
