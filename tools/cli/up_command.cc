// `expertmesh up`: starts a whole cluster on loopback (router, shards x replicas expert
// services, the attention service, optionally the gateway), prints the endpoints, and stops
// everything cleanly on Ctrl-C / SIGTERM. `expertmesh status`: the cluster as the router
// sees it (placement map, shard replicas and their health, expert load).
#include <signal.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "service-common/grpc_util.h"
#include "service-common/process.h"
#include "service-common/tls.h"
#include "spdlog/spdlog.h"
#include "tools/cli/commands.h"
#include "tools/launcher/cluster.h"
#include "tools/launcher/tls_flags.h"

namespace expertmesh {
namespace {

struct UpArgs {
  launcher::ClusterOptions cluster;
  int ready_timeout_s = 120;
  int stop_grace_s = 10;
};

int RunUp(const UpArgs& args) {
  if (absl::Status s = ValidateTlsFiles(args.cluster.tls); !s.ok()) {
    spdlog::error("{}", std::string(s.message()));
    return 2;
  }
  const launcher::ClusterOptions& c = args.cluster;
  if (c.gateway_http_tls_cert.empty() != c.gateway_http_tls_key.empty() ||
      (!c.gateway_http_tls_ca.empty() && c.gateway_http_tls_cert.empty())) {
    spdlog::error("--http-tls-cert and --http-tls-key go together (--http-tls-ca needs both)");
    return 2;
  }
  if (!c.gateway && !c.gateway_http_tls_cert.empty()) {
    spdlog::error("--http-tls-cert/--http-tls-key need --gateway");
    return 2;
  }
  // Termination signals are taken synchronously below; block them before any thread starts.
  if (absl::Status s = BlockTerminationSignals(); !s.ok()) {
    spdlog::error("{}", s.ToString());
    return 1;
  }
  launcher::ClusterOptions options = args.cluster;
  options.ready_timeout = absl::Seconds(args.ready_timeout_s);
  options.stop_grace = absl::Seconds(args.stop_grace_s);
  std::printf("starting: router, %d shard group(s) x %d replica(s), attention%s ...\n",
              options.shards, options.replicas, options.gateway ? ", gateway" : "");
  std::fflush(stdout);
  absl::StatusOr<std::unique_ptr<launcher::Cluster>> cluster = launcher::Cluster::Start(options);
  if (!cluster.ok()) {
    spdlog::error("cluster did not start: {}", cluster.status().ToString());
    return 1;
  }
  std::printf("cluster ready (logs in %s)\n", (*cluster)->log_dir().c_str());
  for (const launcher::Endpoint& e : (*cluster)->AllEndpoints()) {
    std::printf("  %-40s grpc %s", e.name.c_str(), e.grpc_address.c_str());
    if (e.metrics_port != 0) {
      const bool https = e.name == "gateway" && !options.gateway_http_tls_cert.empty();
      std::printf("  %s %s://%s:%d/metrics", e.name == "gateway" ? "http" : "metrics",
                  https ? "https" : "http", options.host.c_str(), e.metrics_port);
    }
    std::printf("\n");
  }
  const launcher::Endpoint& router = (*cluster)->router();
  if (router.metrics_port != 0) {
    std::printf("the router's page (shard groups, expert load, rebalancing): http://%s:%d/\n",
                options.host.c_str(), router.metrics_port);
  }
  std::printf("Ctrl-C or SIGTERM stops the cluster.\n");
  std::fflush(stdout);

  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  std::map<std::string, bool> reported;
  while (true) {
    timespec one_second{1, 0};
    const int sig = sigtimedwait(&set, nullptr, &one_second);
    if (sig == SIGTERM || sig == SIGINT) {
      std::printf("\n%s: stopping the cluster ...\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
      break;
    }
    for (const std::string& exit : (*cluster)->UnexpectedExits()) {
      if (!reported[exit]) spdlog::warn("{}", exit);
      reported[exit] = true;
    }
  }
  const absl::Status stopped = (*cluster)->Stop();
  if (!stopped.ok()) {
    spdlog::error("{}", stopped.ToString());
    return 1;
  }
  std::printf("all services stopped.\n");
  return 0;
}

int RunStatus(const std::string& router, int timeout_ms, const TlsFiles& tls) {
  if (absl::Status s = ValidateTlsFiles(tls); !s.ok()) {
    spdlog::error("{}", std::string(s.message()));
    return 2;
  }
  auto channel = MakeChannel(router, kDefaultMaxMessageBytes, MakeChannelCredentials(tls));
  auto stub = v1::RouterService::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  v1::StatusRequest req;
  v1::StatusResponse resp;
  const grpc::Status s = stub->GetStatus(&ctx, req, &resp);
  if (!s.ok()) {
    spdlog::error("GetStatus on {}: {}", router, FromGrpcStatus(s).ToString());
    if (s.error_code() == grpc::StatusCode::UNAVAILABLE) {
      spdlog::error(
          tls.enabled()
              ? "the router is unreachable, or refused this certificate or is not using TLS"
              : "the router is unreachable, or it requires mTLS: pass --tls-cert, --tls-key and "
                "--tls-ca");
    }
    return 1;
  }
  const v1::PlacementMap& map = resp.placement();
  std::printf(
      "model %s, placement map version %llu: %d layers x %d routed experts, %d shard "
      "group(s)\n",
      resp.model_name().c_str(), static_cast<unsigned long long>(map.version()), map.n_layers(),
      map.n_routed_experts(), map.shards_size());
  // An expert with copies in k groups counts 1/k of its tokens in each (the dispatcher spreads
  // its rows over the copies).
  std::map<int32_t, double> tokens_per_shard;
  std::map<std::pair<int32_t, int32_t>, std::vector<int32_t>> shards_of;
  for (const v1::ShardGroup& g : map.shards()) {
    for (const v1::LayerExpert& le : g.experts())
      shards_of[{le.layer(), le.expert()}].push_back(g.shard_id());
  }
  for (const v1::LayerExpertLoad& l : resp.expert_load()) {
    auto it = shards_of.find({l.layer(), l.expert()});
    if (it == shards_of.end()) continue;
    for (int32_t s : it->second) {
      tokens_per_shard[s] +=
          static_cast<double>(l.tokens()) / static_cast<double>(it->second.size());
    }
  }
  for (const v1::ShardGroup& g : map.shards()) {
    int healthy = 0;
    for (const v1::ShardReplica& r : g.replicas()) healthy += r.healthy() && !r.loading() ? 1 : 0;
    std::printf(
        "shard %d: %d (layer, expert) pairs, %d/%d replica(s) healthy, %llu routed "
        "tokens%s\n",
        g.shard_id(), g.experts_size(), healthy, g.replicas_size(),
        static_cast<unsigned long long>(std::llround(tokens_per_shard[g.shard_id()])),
        healthy == 0 ? "  << NO LIVE REPLICA" : "");
    for (const v1::ShardReplica& r : g.replicas()) {
      const std::string data =
          r.data_address().empty() ? std::string("data plane off") : "data " + r.data_address();
      std::printf(
          "  %-24s %-22s %-9s capacity %u, outstanding rows %u, heartbeat %llu ms ago, %s%s\n",
          r.replica_id().c_str(), r.address().c_str(), r.healthy() ? "healthy" : "UNHEALTHY",
          r.capacity(), r.outstanding_rows(),
          static_cast<unsigned long long>(r.last_heartbeat_ms_ago()), data.c_str(),
          r.loading() ? ", LOADING its experts (not in the map yet)" : "");
    }
  }
  const v1::RebalanceState& rb = resp.rebalance();
  std::printf(
      "rebalancing %s (threshold %.2f over a %u s window): imbalance %.3f, %u redundant "
      "copies, %llu placement change(s)%s%s%s\n",
      rb.automatic() ? "automatic" : "by hand only", rb.threshold(), rb.window_s(), rb.imbalance(),
      rb.redundant_copies(), static_cast<unsigned long long>(rb.rebalances()),
      rb.pending() ? ", a change is loading" : "",
      rb.last_result().empty() ? "" : "; last: ", rb.last_result().c_str());
  return 0;
}

int RunRebalance(const std::string& router, int timeout_ms, const TlsFiles& tls, bool dry_run,
                 bool force) {
  if (absl::Status s = ValidateTlsFiles(tls); !s.ok()) {
    spdlog::error("{}", std::string(s.message()));
    return 2;
  }
  auto stub = v1::RouterService::NewStub(
      MakeChannel(router, kDefaultMaxMessageBytes, MakeChannelCredentials(tls)));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  v1::RebalanceRequest req;
  req.set_dry_run(dry_run);
  req.set_force(force);
  v1::RebalanceResponse resp;
  if (const grpc::Status s = stub->Rebalance(&ctx, req, &resp); !s.ok()) {
    spdlog::error("Rebalance on {}: {}", router, FromGrpcStatus(s).ToString());
    return 1;
  }
  std::printf("%s: imbalance %.3f -> %.3f predicted, %u copies to load, %u redundant; %s\n",
              resp.started() ? "rebalancing" : (dry_run ? "dry run" : "no change"),
              resp.imbalance_before(), resp.imbalance_after(), resp.experts_moved(),
              resp.redundant_copies(), resp.reason().c_str());
  if (resp.started()) {
    std::printf(
        "target generation %llu is loading on the shards; `expertmesh status` shows when "
        "the new map is published\n",
        static_cast<unsigned long long>(resp.target_generation()));
  }
  return 0;
}

}  // namespace

void AddUpCommand(CLI::App& app) {
  auto args = std::make_shared<UpArgs>();
  CLI::App* up = app.add_subcommand(
      "up", "Start a whole cluster on loopback: router, expert shards, attention service");
  launcher::ClusterOptions& c = args->cluster;
  up->add_option("--model", c.model_dir, "Checkpoint directory (config.json, safetensors)")
      ->required()
      ->check(CLI::ExistingDirectory);
  up->add_option("--shards", c.shards, "Shard groups the routed experts are spread over")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  up->add_option("--replicas", c.replicas, "Replicas per shard group")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  up->add_flag("--gateway", c.gateway, "Also start the gateway");
  up->add_option("--http-port", c.gateway_http_port,
                 "The gateway's OpenAI HTTP port (0: a free port)")
      ->capture_default_str();
  up->add_option("--http-tls-cert", c.gateway_http_tls_cert,
                 "Serve HTTPS on the gateway's HTTP port with this PEM certificate chain")
      ->check(CLI::ExistingFile);
  up->add_option("--http-tls-key", c.gateway_http_tls_key, "PEM private key of --http-tls-cert")
      ->check(CLI::ExistingFile);
  up->add_option("--http-tls-ca", c.gateway_http_tls_ca,
                 "HTTPS clients must present a certificate chaining to this PEM CA (optional)")
      ->check(CLI::ExistingFile);
  up->add_option("--bin-dir", c.bin_dir, "Where the service binaries are (default: build tree)");
  up->add_option("--log-dir", c.log_dir, "One log file per service (default: a new /tmp dir)");
  up->add_option("--kv-blocks", c.kv_blocks, "Attention service KV blocks")->capture_default_str();
  up->add_option("--kv-block-size", c.kv_block_size, "Tokens per KV block")->capture_default_str();
  up->add_option("--max-batch", c.max_batch, "Sequences per step")->capture_default_str();
  up->add_option("--max-waiting", c.max_waiting, "Waiting queue bound")->capture_default_str();
  up->add_option("--prefill-chunk", c.prefill_chunk, "Prompt tokens per sequence per step")
      ->capture_default_str();
  up->add_option("--step-deadline-ms", c.step_deadline_ms, "Deadline of one MoE dispatch")
      ->capture_default_str();
  up->add_option("--combine", c.combine,
                 "exact: per-expert answers added in expert order (output independent of the "
                 "placement); partial: per-shard partial sums (fewer bytes)")
      ->check(CLI::IsMember({"exact", "partial"}))
      ->capture_default_str();
  up->add_option("--micro-batches", c.micro_batches,
                 "Split each step into this many micro-batches whose attention compute overlaps "
                 "the others' expert round trips (1 = off)")
      ->check(CLI::Range(1, 8))
      ->capture_default_str();
  up->add_option("--gateway-arg", c.extra_gateway_args,
                 "Extra gateway flag (repeatable; e.g. --gateway-arg=--max-running=512)");
  up->add_option("--router-arg", c.extra_router_args,
                 "Extra router-service flag (repeatable; e.g. --router-arg=--no-rebalance)");
  up->add_option("--expert-arg", c.extra_expert_args, "Extra expert-service flag (repeatable)");
  up->add_option("--attention-arg", c.extra_attention_args,
                 "Extra attention-service flag (repeatable)");
  AddTlsOptions(up, c.tls,
                "of every service (server and client side; must name the listen host, e.g. "
                "IP:127.0.0.1)");
  up->add_option("--ready-timeout-s", args->ready_timeout_s, "Wait this long for SERVING")
      ->capture_default_str();
  up->add_option("--stop-grace-s", args->stop_grace_s, "SIGTERM grace before SIGKILL")
      ->capture_default_str();
  up->callback([args] {
    const int rc = RunUp(*args);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });

  auto router = std::make_shared<std::string>();
  auto timeout_ms = std::make_shared<int>(5000);
  auto tls = std::make_shared<TlsFiles>();
  CLI::App* status = app.add_subcommand("status", "Print the cluster as the router sees it");
  status->add_option("--router", *router, "Router address host:port")->required();
  status->add_option("--timeout-ms", *timeout_ms, "RPC deadline")->capture_default_str();
  AddTlsOptions(status, *tls, "presented to the router (a cluster started with mTLS)");
  status->callback([router, timeout_ms, tls] {
    const int rc = RunStatus(*router, *timeout_ms, *tls);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });

  auto rb_router = std::make_shared<std::string>();
  auto rb_timeout_ms = std::make_shared<int>(5000);
  auto rb_tls = std::make_shared<TlsFiles>();
  auto dry_run = std::make_shared<bool>(false);
  auto force = std::make_shared<bool>(false);
  CLI::App* rebalance = app.add_subcommand(
      "rebalance",
      "Rebalance the experts now: a placement from the router's load window (redundant copies "
      "of the hottest), loaded by the shards while they serve, then published");
  rebalance->add_option("--router", *rb_router, "Router address host:port")->required();
  rebalance->add_option("--timeout-ms", *rb_timeout_ms, "RPC deadline")->capture_default_str();
  rebalance->add_flag("--dry-run", *dry_run, "Report what it would do, change nothing");
  rebalance->add_flag("--force", *force,
                      "Apply even below the threshold or the minimum predicted gain");
  AddTlsOptions(rebalance, *rb_tls, "presented to the router (a cluster started with mTLS)");
  rebalance->callback([rb_router, rb_timeout_ms, rb_tls, dry_run, force] {
    const int rc = RunRebalance(*rb_router, *rb_timeout_ms, *rb_tls, *dry_run, *force);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace expertmesh
