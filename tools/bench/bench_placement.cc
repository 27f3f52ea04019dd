// expertmesh-bench-placement: how many shard groups one token's MoE layer reaches, and the
// bytes that costs, for the even plan, the group-aligned plan and an EPLB plan, over several
// shard-group counts, at a real model's shape (default: DeepSeek-V3's config.json: 256 routed
// experts, n_group 8, topk_group 4, top-8, hidden 7168). Routes come from the real gate
// (core/model/gate.h, group-limited top-k) on random scores: s = sigmoid(z + bias * b[e]) with
// z ~ N(0, 1) per (token, expert) and b[e] ~ N(0, 1) fixed per expert (--bias 0: no skew).
// Copies are chosen per token by ChooseShards (placement/placement.h), row key = token index:
// CopyChoice::kFewerGroups, and for the EPLB plan also kSpread (rows "/spr").
//
// Per token and MoE layer, payload bytes without protobuf framing (H = hidden_size, k = top-k):
//   request  = shards * (H FP8 + 4 * ceil(H / 128) scale bytes + 4 row offset) + k * 8 (id, weight)
//   response = shards * 2H (partial: one BF16 sum per shard)   or   k * 2H (exact: per pair)
// Also: the largest group's share of the pairs / its fair share (max/mean, equal capacities),
// and experts held per shard group (memory). The EPLB plan is computed from a first window of
// tokens and measured on a second one, with --eplb-extra redundant slots per group.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "core/format/config.h"
#include "core/model/gate.h"
#include "placement/eplb.h"
#include "placement/placement.h"

namespace expertmesh {
namespace {

ExpertRoutes Routes(const GateParams& gp, int64_t E, int tokens, double bias,
                    const std::vector<double>& b, std::mt19937_64& rng) {
  std::normal_distribution<double> z(0.0, 1.0);
  std::vector<float> scores(static_cast<size_t>(tokens) * E);
  for (int t = 0; t < tokens; ++t) {
    for (int64_t e = 0; e < E; ++e) {
      scores[t * E + e] = static_cast<float>(1.0 / (1.0 + std::exp(-(z(rng) + bias * b[e]))));
    }
  }
  const std::vector<float> no_bias(E, 0.f);
  return SelectExperts(gp, scores, no_bias, tokens);
}

struct Figures {
  double shards_mean = 0;
  int shards_max = 0;
  double request = 0, partial = 0, exact = 0;
  double max_over_mean = 0;
  size_t experts_per_group_max = 0;
};

Figures Measure(const Placement& p, int layer, const ExpertRoutes& routes, int64_t H,
                CopyChoice choice = CopyChoice::kFewerGroups) {
  Figures f;
  std::vector<double> pairs(p.num_shards, 0.0);
  const int64_t n = routes.n_rows();
  double total_pairs = 0;
  const double row_bytes = static_cast<double>(H + 4 * ((H + 127) / 128) + 4);
  for (int64_t r = 0; r < n; ++r) {
    const std::span<const int32_t> ex(routes.experts.data() + routes.offsets[r],
                                      routes.offsets[r + 1] - routes.offsets[r]);
    std::vector<int32_t> s(ex.size());
    if (!ChooseShards(p, layer, ex, static_cast<uint64_t>(r), s, choice)) {
      std::fprintf(stderr, "bench-placement: an expert has no shard\n");
      std::exit(1);
    }
    for (int32_t g : s) pairs[g] += 1;
    std::sort(s.begin(), s.end());
    const int k = static_cast<int>(std::unique(s.begin(), s.end()) - s.begin());
    f.shards_mean += k;
    f.shards_max = std::max(f.shards_max, k);
    f.request += k * row_bytes + static_cast<double>(ex.size()) * 8;
    f.partial += k * 2.0 * H;
    f.exact += static_cast<double>(ex.size()) * 2.0 * H;
    total_pairs += static_cast<double>(ex.size());
  }
  f.shards_mean /= n;
  f.request /= n;
  f.partial /= n;
  f.exact /= n;
  f.max_over_mean = *std::max_element(pairs.begin(), pairs.end()) / (total_pairs / p.num_shards);
  for (int32_t g = 0; g < p.num_shards; ++g) {
    size_t held = 0;
    for (int64_t e = 0; e < p.n_routed_experts; ++e) {
      const std::span<const int32_t> c = p.ShardsOf(layer, e);
      held += std::count(c.begin(), c.end(), g);
    }
    f.experts_per_group_max = std::max(f.experts_per_group_max, held);
  }
  return f;
}

void Print(const char* name, int shards, const Figures& f) {
  std::printf("%-14s %6d %8.2f %4d %12.0f %14.0f %12.0f %9.3f %9zu\n", name, shards, f.shards_mean,
              f.shards_max, f.request, f.partial, f.exact, f.max_over_mean,
              f.experts_per_group_max);
}

int Main(int argc, char** argv) {
  CLI::App app{
      "Shard groups and bytes per token per MoE layer for the even, group-aligned and EPLB "
      "placements, with routes from the real group-limited gate on random scores."};
  std::string config_path = "tests/data/reference/deepseek-v3/config.json";
  std::vector<int> shard_counts = {8, 16, 32};
  int tokens = 20000;
  double bias = 0.0;
  int eplb_extra = 2;
  uint64_t seed = 1;
  app.add_option("--config", config_path, "the model's config.json")->check(CLI::ExistingFile);
  app.add_option("--shards", shard_counts, "shard-group counts to measure (e.g. 8,16,32)")
      ->delimiter(',')
      ->check(CLI::Range(1, 1 << 16));
  app.add_option("--tokens", tokens, "tokens per window")->check(CLI::Range(1, 1000000));
  app.add_option("--bias", bias, "expert skew: scale of a fixed per-expert logit offset (0: none)")
      ->check(CLI::Range(0.0, 10.0));
  app.add_option("--eplb-extra", eplb_extra, "EPLB: slots per group beyond n_routed_experts / N")
      ->check(CLI::Range(0, 1 << 16));
  app.add_option("--seed", seed, "random seed");
  CLI11_PARSE(app, argc, argv);

  absl::StatusOr<ModelConfig> loaded = LoadModelConfig(config_path);
  if (!loaded.ok()) {
    std::fprintf(stderr, "bench-placement: %s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  // One MoE layer is enough (every layer's gate is alike here): drop the others.
  ModelConfig config = *loaded;
  config.num_hidden_layers = config.first_k_dense_replace + 1;
  config.num_nextn_predict_layers = 0;
  const int layer = static_cast<int>(config.first_k_dense_replace);
  if (!config.IsMoeLayer(layer)) {
    std::fprintf(stderr, "bench-placement: layer %d of this config is not a MoE layer\n", layer);
    return 1;
  }
  absl::StatusOr<GateParams> gp = GateParams::FromConfig(config);
  if (!gp.ok()) {
    std::fprintf(stderr, "bench-placement: %s\n", std::string(gp.status().message()).c_str());
    return 1;
  }
  const int64_t E = config.n_routed_experts, H = config.hidden_size;
  std::mt19937_64 rng(seed);
  std::vector<double> b(E);
  std::normal_distribution<double> z(0.0, 1.0);
  for (double& x : b) x = z(rng);
  const ExpertRoutes window = Routes(*gp, E, tokens, bias, b, rng);  // EPLB's load window
  const ExpertRoutes routes = Routes(*gp, E, tokens, bias, b, rng);  // measured
  std::vector<double> load(E, 0.0);
  for (int32_t e : window.experts) load[e] += 1;

  std::printf(
      "config %s: %lld experts, n_group %lld, topk_group %lld, top-%lld, hidden %lld; "
      "%d tokens, bias %.2f, seed %llu\n",
      config_path.c_str(), static_cast<long long>(E), static_cast<long long>(config.n_group),
      static_cast<long long>(config.topk_group), static_cast<long long>(config.num_experts_per_tok),
      static_cast<long long>(H), tokens, bias, static_cast<unsigned long long>(seed));
  std::printf("bytes per token per MoE layer; max/mean = busiest group's pairs / fair share\n");
  std::printf("%-14s %6s %8s %4s %12s %14s %12s %9s %9s\n", "placement", "groups", "shards", "max",
              "request B", "resp partial B", "resp exact B", "max/mean", "experts/g");
  for (int n : shard_counts) {
    if (n > E) {
      std::fprintf(stderr, "bench-placement: %d shard groups > %lld experts: skipped\n", n,
                   static_cast<long long>(E));
      continue;
    }
    absl::StatusOr<Placement> even = EvenPlacement(config, n);
    bool aligned = false;
    absl::StatusOr<Placement> grouped = GroupAlignedPlacement(config, n, &aligned);
    EplbInput in;
    in.num_shards = n;
    in.load = {load};
    in.capacity.assign(n, 1.0);
    in.slots.assign(n, static_cast<int32_t>((E + n - 1) / n) + eplb_extra);
    absl::StatusOr<EplbResult> eplb = RebalanceExperts(config, in);
    if (!even.ok() || !grouped.ok() || !eplb.ok()) {
      std::fprintf(stderr, "bench-placement: %d groups: %s %s %s\n", n,
                   std::string(even.status().message()).c_str(),
                   std::string(grouped.status().message()).c_str(),
                   std::string(eplb.status().message()).c_str());
      return 1;
    }
    Print("even", n, Measure(*even, layer, routes, H));
    Print(aligned ? "group-aligned" : "aligned=even", n, Measure(*grouped, layer, routes, H));
    Print(eplb->hierarchical ? "eplb-hier" : "eplb-global", n,
          Measure(eplb->placement, layer, routes, H));
    Print(eplb->hierarchical ? "eplb-hier/spr" : "eplb-glob/spr", n,
          Measure(eplb->placement, layer, routes, H, CopyChoice::kSpread));
    std::printf("%-14s %6d predicted max/mean %.3f from the window, %d copies of %lld experts\n",
                "", n, eplb->imbalance[0], eplb->copies[0], static_cast<long long>(E));
  }
  return 0;
}

}  // namespace
}  // namespace expertmesh

int main(int argc, char** argv) { return expertmesh::Main(argc, argv); }
