// expert-service: one replica of one expert shard group.
#include <algorithm>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/kernels/cpu/thread_pool.h"
#include "expert-service/expert_service.h"
#include "placement/placement.h"
#include "service-common/bootstrap.h"
#include "service-common/tls.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  ServiceMain main("expert",
                   "expert-service: serves the routed experts of one ExpertMesh shard group",
                   {.listen = "127.0.0.1:0"});
  CLI::App& app = main.app();
  std::string model_dir, router, experts_text, advertise, instance_id;
  int shard_id = -1, num_shards = -1;
  uint64_t max_request_mib = 48;
  bool no_act_quant = false;
  float capacity_weight = 1.0f;
  double release_grace_s = 10.0;
  std::string device = "cpu";
  std::string data_listen = "auto", data_advertise;
  uint32_t max_data_connections = 128;
  app.add_option("--model", model_dir, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--shard-id", shard_id, "This replica's shard group (with --num-shards)")
      ->check(CLI::Range(0, 4095));
  app.add_option("--num-shards", num_shards, "Shard groups of the even placement plan")
      ->check(CLI::Range(1, 4096));
  app.add_option("--experts", experts_text,
                 "Explicit experts \"layer:e1,e2;layer:...\" (with --shard-id; the router "
                 "must use a placement file that agrees)");
  app.add_option("--advertise", advertise, "Address given to the router (default: listen)");
  app.add_option("--data-listen", data_listen,
                 "The framed TCP data plane (expert requests without gRPC's thread hand-offs): "
                 "host:port (port 0 = any), auto (the --listen host, any port; off under mTLS), "
                 "or off")
      ->capture_default_str();
  app.add_option("--data-advertise", data_advertise,
                 "Data-plane address given to the router (default: the --advertise host, else "
                 "the data listen host, with the bound data port)");
  app.add_option("--max-data-connections", max_data_connections,
                 "Data-plane connections open at once (one thread each); more are refused")
      ->check(CLI::Range(1u, 4096u))
      ->capture_default_str();
  app.add_option("--router", router, "Router address host:port: register and heartbeat");
  app.add_option("--max-request-mib", max_request_mib, "Largest accepted request message")
      ->check(CLI::Range(uint64_t{1}, uint64_t{2047}))
      ->capture_default_str();
  app.add_option("--instance-id", instance_id, "Name in logs and handshakes");
  app.add_option("--device", device, "cpu, or cuda:N[,M...]: the experts spread over these GPUs")
      ->capture_default_str();
  app.add_option("--capacity-weight", capacity_weight,
                 "Expert throughput relative to a reference replica, for the router's "
                 "rebalancer: unequal cards get unequal shares (0 < w <= 1e6)")
      ->check(CLI::Range(1e-6, 1e6))
      ->capture_default_str();
  app.add_option("--release-grace-s", release_grace_s,
                 "Live placement: experts the router's committed target no longer lists are "
                 "released once no request has used them for this long (CPU only)")
      ->check(CLI::Range(0.0, 86400.0))
      ->capture_default_str();
  app.add_flag("--no-act-quant", no_act_quant, "Do not quantize the intermediate activations");
  app.add_option_function<int>(
         "--threads", [](int n) { expertmesh::cpu::SetKernelThreads(n); },
         "CPU kernel threads, 0 = every CPU this process may use (affinity and cgroup cpu.max)")
      ->check(CLI::Range(0, 1024));
  if (std::optional<int> exit = main.Parse(argc, argv)) return *exit;

  absl::StatusOr<ModelConfig> config = LoadModelConfig(model_dir + "/config.json");
  if (!config.ok()) return main.StartFailed(config.status());
  ExpertServerOptions options;
  options.model_dir = model_dir;
  options.device = device;
  if (!experts_text.empty()) {
    absl::StatusOr<std::vector<LayerExpert>> experts = ParseExpertList(experts_text);
    if (!experts.ok()) {
      spdlog::error("--experts: {}", experts.status());
      return kExitUsage;
    }
    options.experts = *std::move(experts);
    options.shard_id = std::max(shard_id, 0);
  } else if (shard_id >= 0 && num_shards > 0) {
    absl::StatusOr<Placement> plan = EvenPlacement(*config, num_shards);
    if (!plan.ok() || shard_id >= num_shards) {
      spdlog::error("--shard-id {} --num-shards {}: {}", shard_id, num_shards,
                    plan.ok() ? "shard id out of range" : std::string(plan.status().message()));
      return kExitUsage;
    }
    options.experts = plan->ExpertsOf(shard_id);
    options.shard_id = shard_id;
  } else {
    spdlog::error("give --shard-id and --num-shards, or --experts");
    return kExitUsage;
  }
  options.server.listen = main.flags().listen;
  options.advertise_address = advertise;
  if (data_listen == "auto") {
    if (ProcessTls().enabled()) {
      spdlog::info("mTLS is on: no framed TCP data plane (it is plaintext); requests come on gRPC");
    } else {
      options.data_listen = HostOf(main.flags().listen) + ":0";
      if (options.data_listen.find(':') != options.data_listen.rfind(':')) {
        options.data_listen = "[" + HostOf(main.flags().listen) + "]:0";
      }
    }
  } else if (data_listen != "off") {
    options.data_listen = data_listen;  // under mTLS ExpertServer::Start refuses it
  }
  options.data_advertise_address = data_advertise;
  options.limits.max_data_connections = max_data_connections;
  options.router_address = router;
  options.instance_id =
      instance_id.empty() ? absl::StrCat("expert-shard", options.shard_id) : instance_id;
  options.limits.max_request_bytes = max_request_mib << 20;
  options.quantize_activations = !no_act_quant;
  options.capacity_weight = capacity_weight;
  options.release_grace = absl::Seconds(release_grace_s);
  MetricsRegistry metrics;
  options.metrics = &metrics;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> metrics_http = main.StartMetrics(&metrics);
  if (!metrics_http.ok()) return main.StartFailed(metrics_http.status());
  absl::StatusOr<std::unique_ptr<ExpertServer>> server = ExpertServer::Start(std::move(options));
  if (!server.ok()) return main.StartFailed(server.status());
  spdlog::info("expert-service ready on port {}", (*server)->port());
  return main.RunUntilSignal([&] { (*server)->Drain(); });
}
