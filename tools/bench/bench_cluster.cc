// expertmesh-bench-cluster: decode throughput of the distributed cluster and of the
// in-process reference engine on the same model, at batch 1 and batch 32 (or --batches), and
// the per-MoE-layer dispatch latency (p50 / p99) the attention service measured while the
// cluster decoded -- all in one run.
//
// In-process: one Engine with every expert local; B sequences prefilled, then decoded in
// lock-step batches of B; decode tokens/s = B * steps / time.
// Cluster: `expertmesh up`'s launcher starts router, shards x replicas expert services and the
// attention service as processes on loopback; B concurrent greedy Submits; per stream the
// decode rate is (tokens - 1) / (last token time - first token time); the cluster's rate is
// their sum. Dispatch latency: the attention service's expertmesh_dispatch_latency_seconds
// histogram, read from /metrics before and after each batch size, the difference's
// quantiles (linear interpolation inside the bucket, as Prometheus does).
//
// A model to run it on: the bundled one, or a random checkpoint of the small config beside
// this file (4 layers, 3 MoE with 8 experts):
//   expertmesh-make-checkpoint --config tools/bench/cluster_bench_config.json --out DIR --seed 1
//   expertmesh-bench-cluster --model DIR --shards 2 --replicas 1
// --combine exact|partial: the cluster's combine mode (attention-service --combine).
// --data-plane auto grpc: one cluster per value, in turn (attention-service --data-plane: the
// shards' framed TCP data plane, or their gRPC Compute streams), against the same in-process run.
// --attention HOST:PORT (with --attention-metrics HOST:PORT): measure a cluster that is already
// running (e.g. shards in network namespaces behind tools/netdelay, as tools/bench/link_bench.py
// starts them) instead of starting one; waits until it reports SERVING. --skip-in-process leaves
// out the in-process engine (its column then shows "-").
// Memory and load time: the in-process model's load time; the launcher's cluster start (router,
// shards, attention service until all report SERVING); after the runs, each shard's VmRSS and
// VmHWM (/proc/<pid>/status) against the expert bytes it holds (its
// expertmesh_expert_bytes_mapped gauge).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "core/base/proc_status.h"
#include "core/base/status.h"
#include "core/decode/sampling.h"
#include "core/engine/engine.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/model/local_experts.h"
#include "core/model/model.h"
#include "expertmesh/v1/attention.grpc.pb.h"
#include "service-common/grpc_util.h"
#include "service-common/metrics_http.h"
#include "spdlog/spdlog.h"
#include "tools/launcher/cluster.h"
#include "tools/launcher/tls_flags.h"

namespace expertmesh {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<std::vector<int32_t>> Prompts(int n, int len, int64_t vocab) {
  Rng rng(1234);
  std::vector<std::vector<int32_t>> out(n);
  for (auto& p : out) {
    for (int j = 0; j < len; ++j) p.push_back(2 + static_cast<int32_t>(rng.Next() % (vocab - 2)));
  }
  return out;
}

// decode tokens/s of the in-process engine at batch b.
absl::StatusOr<double> InProcessDecode(const Model& model, RoutedExperts* experts, int b,
                                       int prompt_len, int decode_tokens) {
  EM_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Create(model, experts));
  std::vector<std::vector<int32_t>> prompts = Prompts(b, prompt_len, model.config().vocab_size);
  std::vector<std::unique_ptr<ContiguousKvCache>> caches;
  std::vector<SequenceInput> batch(b);
  for (int i = 0; i < b; ++i) {
    caches.push_back(engine->NewCache());
    batch[i] = SequenceInput{prompts[i], caches.back().get(), false};
  }
  std::vector<std::vector<int32_t>> next(b);
  absl::StatusOr<std::vector<SequenceOutput>> out = engine->Forward(batch);  // prefill
  if (!out.ok()) return out.status();
  const auto start = Clock::now();
  for (int step = 0; step < decode_tokens; ++step) {
    for (int i = 0; i < b; ++i) {
      next[i] = {Argmax((*out)[i].logits)};
      batch[i].tokens = next[i];
    }
    out = engine->Forward(batch);
    if (!out.ok()) return out.status();
  }
  const double s = std::chrono::duration<double>(Clock::now() - start).count();
  return b * decode_tokens / s;
}

// Cumulative bucket counts per layer of the dispatch histogram: layer -> (le -> count).
using Buckets = std::map<int, std::map<double, double>>;
// The histogram's buckets and its sum of seconds per layer (the buckets double in width, so
// the mean, sum / count, is the finer figure where a link adds a fixed delay).
struct DispatchScrape {
  Buckets buckets;
  std::map<int, double> sum;
};

absl::StatusOr<DispatchScrape> ScrapeDispatch(const std::string& metrics_host, int metrics_port) {
  EM_ASSIGN_OR_RETURN(std::string text, HttpGet(metrics_host, metrics_port, "/metrics"));
  DispatchScrape scrape;
  Buckets& out = scrape.buckets;
  const std::string prefix = "expertmesh_dispatch_latency_seconds_bucket{";
  const std::string sum_prefix = "expertmesh_dispatch_latency_seconds_sum{layer=\"";
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::StartsWith(line, sum_prefix)) {  // ..._sum{layer="3"} 0.0123
      int layer = -1;
      double sum = 0;
      const size_t quote = line.find('"', sum_prefix.size());
      const size_t close = line.find('}');
      if (quote != absl::string_view::npos && close != absl::string_view::npos &&
          absl::SimpleAtoi(line.substr(sum_prefix.size(), quote - sum_prefix.size()), &layer) &&
          absl::SimpleAtod(line.substr(close + 1), &sum)) {
        scrape.sum[layer] = sum;
      }
      continue;
    }
    if (!absl::StartsWith(line, prefix)) continue;
    // ..._bucket{layer="3",le="0.001"} 17
    const size_t close = line.find('}');
    const std::string labels(line.substr(prefix.size(), close - prefix.size()));
    int layer = -1;
    double le = 0, count = 0;
    for (absl::string_view kv : absl::StrSplit(labels, ',')) {
      std::pair<std::string, std::string> p = absl::StrSplit(kv, '=');
      std::string v = p.second;
      v.erase(std::remove(v.begin(), v.end(), '"'), v.end());
      if (p.first == "layer") (void)absl::SimpleAtoi(v, &layer);
      if (p.first == "le") le = v == "+Inf" ? 1e30 : std::stod(v);
    }
    (void)absl::SimpleAtod(line.substr(close + 2), &count);
    out[layer][le] = count;
  }
  return scrape;
}

// Quantile q of the difference after - before, per layer; linear inside the bucket.
double Quantile(const std::map<double, double>& before, const std::map<double, double>& after,
                double q) {
  std::vector<std::pair<double, double>> cum;  // (le, cumulative count)
  for (const auto& [le, c] : after) {
    auto it = before.find(le);
    cum.push_back({le, c - (it == before.end() ? 0.0 : it->second)});
  }
  if (cum.empty() || cum.back().second <= 0) return 0.0;
  const double rank = q * cum.back().second;
  double prev_le = 0, prev_c = 0;
  for (const auto& [le, c] : cum) {
    if (c >= rank) {
      if (le >= 1e30) return prev_le;
      return prev_le + (le - prev_le) * (c > prev_c ? (rank - prev_c) / (c - prev_c) : 0.0);
    }
    prev_le = le;
    prev_c = c;
  }
  return prev_le;
}

// VmRSS and VmHWM of a process in bytes, from /proc/<pid>/status.
absl::StatusOr<std::pair<double, double>> ProcessRss(pid_t pid) {
  const int64_t rss = base::ProcStatusBytes("VmRSS", pid),
                hwm = base::ProcStatusBytes("VmHWM", pid);
  if (rss < 0 || hwm < 0) {
    return absl::NotFoundError("no VmRSS/VmHWM for pid " + std::to_string(pid));
  }
  return std::make_pair(static_cast<double>(rss), static_cast<double>(hwm));
}

// The value of an unlabelled gauge on a /metrics page.
absl::StatusOr<double> ScrapeGauge(int metrics_port, const std::string& name) {
  EM_ASSIGN_OR_RETURN(std::string text, HttpGet("127.0.0.1", metrics_port, "/metrics"));
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    double v = 0;
    if (absl::StartsWith(line, name + " ") && absl::SimpleAtod(line.substr(name.size() + 1), &v)) {
      return v;
    }
  }
  return absl::NotFoundError(name + " not on the /metrics page");
}

// Each shard's memory against the expert bytes it holds.
void PrintMemory(launcher::Cluster& cluster, int shards, int replicas) {
  constexpr double kMiB = 1024.0 * 1024.0;
  for (int s = 0; s < shards; ++s) {
    for (int r = 0; r < replicas; ++r) {
      launcher::ChildProcess* p = cluster.expert_process(s, r);
      if (p == nullptr) continue;
      absl::StatusOr<std::pair<double, double>> rss = ProcessRss(p->pid());
      absl::StatusOr<double> held =
          ScrapeGauge(cluster.expert(s, r).metrics_port, "expertmesh_expert_bytes_mapped");
      if (!rss.ok() || !held.ok() || *held <= 0) {
        std::printf("shard %d replica %d: memory unreadable (%s)\n", s, r,
                    !rss.ok() ? rss.status().ToString().c_str() : "no expert bytes gauge");
        continue;
      }
      std::printf(
          "shard %d replica %d: expert bytes held %.1f MiB, RSS %.1f MiB (%.2fx), peak RSS %.1f "
          "MiB (%.2fx)\n",
          s, r, *held / kMiB, rss->first / kMiB, rss->first / *held, rss->second / kMiB,
          rss->second / *held);
    }
  }
}

struct ClusterRun {
  double decode_tokens_per_s = 0;
  int64_t tokens = 0;
};

absl::StatusOr<ClusterRun> ClusterDecode(const std::string& attention_address, int b,
                                         int prompt_len, int decode_tokens, int64_t vocab) {
  auto stub = v1::AttentionService::NewStub(MakeChannel(attention_address));
  std::vector<std::vector<int32_t>> prompts = Prompts(b, prompt_len, vocab);
  std::vector<double> rate(b, 0.0);
  std::vector<int64_t> count(b, 0);
  std::vector<std::string> errors(b);
  std::vector<std::thread> threads;
  for (int i = 0; i < b; ++i) {
    threads.emplace_back([&, i] {
      v1::SubmitRequest r;
      r.set_request_id("bench-" + std::to_string(b) + "-" + std::to_string(i));
      for (int32_t t : prompts[i]) r.add_prompt_token_ids(t);
      r.set_max_tokens(static_cast<uint32_t>(decode_tokens + 1));
      r.set_ignore_eos(true);
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(30));
      auto reader = stub->Submit(&ctx, r);
      v1::TokenEvent e;
      Clock::time_point first, last;
      while (reader->Read(&e)) {
        last = Clock::now();
        if (count[i] == 0) first = last;
        count[i] += e.token_ids_size();
      }
      const grpc::Status s = reader->Finish();
      if (!s.ok()) errors[i] = s.error_message();
      const double secs = std::chrono::duration<double>(last - first).count();
      if (count[i] > 1 && secs > 0) rate[i] = (count[i] - 1) / secs;
    });
  }
  for (std::thread& t : threads) t.join();
  ClusterRun run;
  for (int i = 0; i < b; ++i) {
    if (!errors[i].empty())
      return absl::InternalError("stream " + std::to_string(i) + ": " + errors[i]);
    run.decode_tokens_per_s += rate[i];
    run.tokens += count[i];
  }
  return run;
}

// A cluster already running (--attention), or empty: start one with the launcher.
struct External {
  std::string attention;     // host:port
  std::string metrics_host;  // of the attention service's /metrics
  int metrics_port = 0;
};

int Run(const std::string& model_dir, int shards, int replicas, std::vector<int> batches,
        int prompt_len, int decode_tokens, const std::string& combine, const External& external,
        bool skip_in_process, int attempt_timeout_ms, int shard_threads,
        const std::vector<std::string>& data_planes) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(model_dir + "/config.json");
  if (!config.ok()) {
    spdlog::error("{}", config.status().ToString());
    return 1;
  }
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(model_dir);
  if (!ckpt.ok()) {
    spdlog::error("{}", ckpt.status().ToString());
    return 1;
  }
  const auto load_start = Clock::now();
  ModelLoadOptions load;
  load.load_mtp = false;
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Create(**ckpt, *config, load);
  absl::StatusOr<std::unique_ptr<LocalExperts>> experts =
      LocalExperts::Create(**ckpt, *config, AllExperts(*config));
  if (!model.ok() || !experts.ok()) {
    spdlog::error("loading {} failed", model_dir);
    return 1;
  }
  const double load_s = std::chrono::duration<double>(Clock::now() - load_start).count();
  std::printf("model %s: hidden %lld, %lld layers (%lld dense), %lld routed experts, top-%lld\n",
              model_dir.c_str(), static_cast<long long>(config->hidden_size),
              static_cast<long long>(config->num_hidden_layers),
              static_cast<long long>(config->first_k_dense_replace),
              static_cast<long long>(config->n_routed_experts),
              static_cast<long long>(config->num_experts_per_tok));
  std::printf("in-process load (model and every expert): %.2f s\n", load_s);
  std::map<int, double> in_process;
  for (int b : batches) {
    if (skip_in_process) break;
    absl::StatusOr<double> r =
        InProcessDecode(**model, experts->get(), b, prompt_len, decode_tokens);
    if (!r.ok()) {
      spdlog::error("{}", r.status().ToString());
      return 1;
    }
    in_process[b] = *r;
  }

  // One cluster per --data-plane value (in turn; the in-process figures above are shared).
  const size_t n_clusters = external.attention.empty() ? data_planes.size() : 1;
  for (size_t run_index = 0; run_index < n_clusters; ++run_index) {
    std::unique_ptr<launcher::Cluster> cluster;
    std::string attention = external.attention, metrics_host = external.metrics_host;
    int metrics_port = external.metrics_port;
    const std::string& data_plane = data_planes[run_index];
    if (attention.empty()) {
      launcher::ClusterOptions o;
      o.tls = ProcessTls();  // --tls-*: every service on mTLS, our channels too
      o.model_dir = model_dir;
      o.shards = shards;
      o.replicas = replicas;
      o.max_batch = *std::max_element(batches.begin(), batches.end());
      o.kv_blocks = 4096;
      o.step_deadline_ms = 30000;
      o.combine = combine;
      o.extra_attention_args = {"--attempt-timeout-ms", std::to_string(attempt_timeout_ms),
                                "--data-plane", data_plane};
      if (shard_threads > 0) o.extra_expert_args = {"--threads", std::to_string(shard_threads)};
      const auto start = Clock::now();
      absl::StatusOr<std::unique_ptr<launcher::Cluster>> started = launcher::Cluster::Start(o);
      if (!started.ok()) {
        spdlog::error("{}", started.status().ToString());
        return 1;
      }
      cluster = *std::move(started);
      attention = cluster->attention().grpc_address;
      metrics_host = "127.0.0.1";
      metrics_port = cluster->attention().metrics_port;
      std::printf(
          "cluster: router + %d shard group(s) x %d replica(s) + attention service, %s combine, "
          "--data-plane %s\n",
          shards, replicas, combine.c_str(), data_plane.c_str());
      std::printf("cluster start (processes loaded and SERVING): %.2f s\n",
                  std::chrono::duration<double>(Clock::now() - start).count());
    } else {
      const absl::Status up = launcher::WaitServing(attention, absl::Minutes(3), nullptr,
                                                    MakeChannelCredentials(ProcessTls()));
      if (!up.ok()) {
        spdlog::error("attention service {}: {}", attention, up.ToString());
        return 1;
      }
      std::printf("cluster: already running, attention service at %s\n", attention.c_str());
    }
    std::printf("%-6s %-22s %-22s %s\n", "batch", "in-process tok/s", "cluster tok/s",
                "dispatch latency per MoE layer (p50 / p99 ms; mean over layers ms)");
    for (int b : batches) {
      absl::StatusOr<DispatchScrape> before = ScrapeDispatch(metrics_host, metrics_port);
      absl::StatusOr<ClusterRun> run =
          ClusterDecode(attention, b, prompt_len, decode_tokens, config->vocab_size);
      absl::StatusOr<DispatchScrape> after = ScrapeDispatch(metrics_host, metrics_port);
      if (!run.ok() || !before.ok() || !after.ok()) {
        spdlog::error("cluster run at batch {} failed: {}", b,
                      !run.ok() ? run.status().ToString() : "metrics unreadable");
        return 1;
      }
      std::string lat;
      double sum = 0, count = 0;  // over all MoE layers, this batch size only
      for (const auto& [layer, buckets] : after->buckets) {
        const std::map<double, double>& old = before->buckets[layer];
        if (buckets.empty() || buckets.rbegin()->second <= (old.empty() ? 0 : old.rbegin()->second))
          continue;  // a layer that took no dispatch (e.g. dense)
        char buf[96];
        std::snprintf(buf, sizeof buf, "L%d %.2f/%.2f  ", layer, 1e3 * Quantile(old, buckets, 0.5),
                      1e3 * Quantile(old, buckets, 0.99));
        lat += buf;
        count += buckets.rbegin()->second - (old.empty() ? 0 : old.rbegin()->second);
        sum += after->sum[layer] - before->sum[layer];
      }
      if (count > 0) lat += absl::StrFormat("mean %.2f", 1e3 * sum / count);
      const std::string in_proc =
          skip_in_process ? std::string("-") : absl::StrFormat("%.1f", in_process[b]);
      std::printf("%-6d %-22s %-22.1f %s\n", b, in_proc.c_str(), run->decode_tokens_per_s,
                  lat.c_str());
      std::fflush(stdout);
    }
    if (cluster == nullptr) return 0;
    PrintMemory(*cluster, shards, replicas);
    if (!cluster->Stop().ok()) return 1;
  }
  return 0;
}

}  // namespace
}  // namespace expertmesh

int main(int argc, char** argv) {
  CLI::App app{"Decode tokens/s of the cluster and the in-process engine; MoE dispatch latency"};
  std::string model;
  int shards = 2, replicas = 1, prompt_len = 16, decode_tokens = 64;
  std::vector<int> batches = {1, 32};
  std::string combine = "exact";
  app.add_option("--model", model, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--shards", shards, "Shard groups")->capture_default_str();
  app.add_option("--replicas", replicas, "Replicas per shard group")->capture_default_str();
  app.add_option("--batches", batches, "Batch sizes")->capture_default_str();
  app.add_option("--prompt-len", prompt_len, "Prompt tokens per sequence")->capture_default_str();
  app.add_option("--decode-tokens", decode_tokens, "Decode steps measured")->capture_default_str();
  app.add_option("--combine", combine, "The cluster's combine mode: exact or partial")
      ->check(CLI::IsMember({"exact", "partial"}))
      ->capture_default_str();
  expertmesh::External external;
  std::string attention_metrics;
  bool skip_in_process = false;
  auto* attention_opt =
      app.add_option("--attention", external.attention,
                     "host:port of an attention service already running: measure that cluster "
                     "instead of starting one (--shards/--replicas are then only reported)");
  app.add_option("--attention-metrics", attention_metrics,
                 "host:port of that attention service's /metrics (for the dispatch latency)")
      ->needs(attention_opt);
  attention_opt->needs("--attention-metrics");
  app.add_flag("--skip-in-process", skip_in_process, "Do not measure the in-process engine");
  int attempt_timeout_ms = 3000;
  app.add_option("--attempt-timeout-ms", attempt_timeout_ms,
                 "The started attention service's wait for one shard's answer before failover "
                 "(raise it where a shard computes a large batch at DeepSeek-V3 widths for longer)")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  std::vector<std::string> data_planes = {"auto"};
  app.add_option("--data-plane", data_planes,
                 "The started attention service's --data-plane: auto (the shards' framed TCP data "
                 "plane) or grpc (the Compute streams); several values: one cluster each, in turn")
      ->check(CLI::IsMember({"auto", "grpc"}))
      ->capture_default_str();
  int shard_threads = 0;
  app.add_option("--shard-threads", shard_threads,
                 "CPU kernel threads of each started shard replica (its --threads); 0 = every CPU "
                 "(the default: shard processes on one machine then share its cores)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  expertmesh::TlsFiles tls;
  expertmesh::AddTlsOptions(
      &app, tls, "of every service and this benchmark (SAN IP:127.0.0.1, server and client use)");
  CLI11_PARSE(app, argc, argv);
  if (int rc = expertmesh::ApplyTlsOptions(tls); rc != 0) return rc;
  if (!attention_metrics.empty()) {
    const size_t colon = attention_metrics.rfind(':');
    if (colon == std::string::npos || colon == 0 ||
        !absl::SimpleAtoi(attention_metrics.substr(colon + 1), &external.metrics_port) ||
        external.metrics_port < 1 || external.metrics_port > 65535) {
      std::fprintf(stderr, "--attention-metrics: '%s' is not host:port\n",
                   attention_metrics.c_str());
      return 2;
    }
    external.metrics_host = attention_metrics.substr(0, colon);
  }
  return expertmesh::Run(model, shards, replicas, batches, prompt_len, decode_tokens, combine,
                         external, skip_in_process, attempt_timeout_ms, shard_threads, data_planes);
}
