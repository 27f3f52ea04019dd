#include "placement/eplb.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace expertmesh {
namespace {

// One layer's packing state: copies (items) assigned to shard groups.
struct Packing {
  struct Item {
    int32_t expert;
    double load;  // L[e] / n[e]
    bool home;    // a home copy of the hierarchical plan: never moved
    int32_t group = -1;
  };
  int32_t N, E;
  std::vector<double> share;  // [N] c[g]
  std::vector<int32_t> room;  // [N] free slots
  std::vector<double> load;   // [N]
  std::vector<char> holds;    // [N, E]
  std::vector<Item> items;

  double Norm(int32_t g, double l) const { return l / share[g]; }
  bool Holds(int32_t g, int32_t e) const { return holds[static_cast<size_t>(g) * E + e] != 0; }
  void Put(size_t i, int32_t g) {
    Item& it = items[i];
    it.group = g;
    load[g] += it.load;
    --room[g];
    holds[static_cast<size_t>(g) * E + it.expert] = 1;
  }
  void Take(size_t i) {
    Item& it = items[i];
    load[it.group] -= it.load;
    ++room[it.group];
    holds[static_cast<size_t>(it.group) * E + it.expert] = 0;
    it.group = -1;
  }
  // The group that, with item i added, has the smallest load / share among those with room
  // that lack the expert; -1 when none (ties: lowest id).
  int32_t Lightest(size_t i) const {
    int32_t best = -1;
    double best_norm = 0;
    for (int32_t g = 0; g < N; ++g) {
      if (room[g] <= 0 || Holds(g, items[i].expert)) continue;
      const double n = Norm(g, load[g] + items[i].load);
      if (best < 0 || n < best_norm) {
        best = g;
        best_norm = n;
      }
    }
    return best;
  }
  int32_t Top() const {
    int32_t top = 0;
    for (int32_t g = 1; g < N; ++g) {
      if (Norm(g, load[g]) > Norm(top, load[top])) top = g;
    }
    return top;
  }
  // Up to `budget` extra copies, each of an expert in the most loaded group, into the group
  // with room (lacking the expert) where it lowers the highest load / share the most (ties:
  // the sum of squares); all copies of an expert carry L[e] / n[e]. Stops when no copy helps.
  void AddCopies(int64_t budget, const std::vector<double>& L, std::vector<int32_t>& n) {
    std::vector<double> after(N);
    const auto score = [&](double* max_out) {
      double mx = 0, sq = 0;
      for (int32_t g = 0; g < N; ++g) {
        const double x = Norm(g, after[g]);
        mx = std::max(mx, x);
        sq += x * x;
      }
      *max_out = mx;
      return sq;
    };
    for (int64_t r = 0; r < budget; ++r) {
      const int32_t top = Top();
      after = load;
      double cur_max;
      const double cur_sq = score(&cur_max);
      double best_max = cur_max, best_sq = cur_sq;
      int32_t best_e = -1, best_h = -1;
      for (int32_t e = 0; e < E; ++e) {
        if (!Holds(top, e) || n[e] >= N || L[e] <= 0) continue;
        const double was = L[e] / n[e], now = L[e] / (n[e] + 1);
        for (int32_t h = 0; h < N; ++h) {
          if (room[h] <= 0 || Holds(h, e)) continue;
          for (int32_t g = 0; g < N; ++g) {
            after[g] = load[g] - (Holds(g, e) ? was - now : 0.0) + (g == h ? now : 0.0);
          }
          double mx;
          const double sq = score(&mx);
          if (mx < best_max * (1 - 1e-12) || (mx <= best_max * (1 + 1e-12) && sq < best_sq)) {
            best_max = mx, best_sq = sq, best_e = e, best_h = h;
          }
        }
      }
      if (best_e < 0) return;
      const double now = L[best_e] / (n[best_e] + 1);
      for (size_t i = 0; i < items.size(); ++i) {
        if (items[i].expert != best_e) continue;
        load[items[i].group] += now - items[i].load;
        items[i].load = now;
      }
      ++n[best_e];
      items.push_back({best_e, now, /*home=*/false});
      Put(items.size() - 1, best_h);
    }
  }
  // Moves and swaps of movable copies out of the most loaded group while that lowers it.
  void Refine() {
    for (int iter = 0; iter < 4 * static_cast<int>(items.size()) + 64; ++iter) {
      int32_t top = 0;
      for (int32_t g = 1; g < N; ++g) {
        if (Norm(g, load[g]) > Norm(top, load[top])) top = g;
      }
      const double current = Norm(top, load[top]);
      double best = current * (1 - 1e-9);
      size_t best_i = 0, best_j = 0;
      int32_t best_h = -1;
      bool swap = false;
      for (size_t i = 0; i < items.size(); ++i) {
        const Item& a = items[i];
        if (a.group != top || a.home) continue;
        for (int32_t h = 0; h < N; ++h) {  // move a to a group with room
          if (h == top || room[h] <= 0 || Holds(h, a.expert)) continue;
          const double n = std::max(Norm(top, load[top] - a.load), Norm(h, load[h] + a.load));
          if (n < best) best = n, best_i = i, best_h = h, swap = false;
        }
        for (size_t j = 0; j < items.size(); ++j) {  // swap a with a lighter copy b elsewhere
          const Item& b = items[j];
          const int32_t h = b.group;
          if (h < 0 || h == top || b.home || b.load >= a.load || Holds(top, b.expert) ||
              Holds(h, a.expert)) {
            continue;
          }
          const double n =
              std::max(Norm(top, load[top] - a.load + b.load), Norm(h, load[h] - b.load + a.load));
          if (n < best) best = n, best_i = i, best_j = j, best_h = h, swap = true;
        }
      }
      if (best_h < 0) return;
      Take(best_i);
      if (swap) {
        Take(best_j);
        Put(best_j, top);
      }
      Put(best_i, best_h);
    }
  }
};

absl::Status Validate(const ModelConfig& config, const EplbInput& in, size_t n_moe) {
  const int32_t N = in.num_shards;
  const int64_t E = config.n_routed_experts;
  if (E <= 0) return absl::InvalidArgumentError("eplb: the model has no routed experts");
  if (N < 1 || N > E) {
    return absl::InvalidArgumentError(
        absl::StrCat("eplb: num_shards ", N, " must be in [1, ", E, "] (n_routed_experts)"));
  }
  if (in.capacity.size() != static_cast<size_t>(N) || in.slots.size() != static_cast<size_t>(N)) {
    return absl::InvalidArgumentError(
        absl::StrCat("eplb: capacity and slots must have num_shards (", N, ") entries, not ",
                     in.capacity.size(), " and ", in.slots.size()));
  }
  int64_t total_slots = 0;
  for (int32_t g = 0; g < N; ++g) {
    if (!(in.capacity[g] > 0) || !std::isfinite(in.capacity[g])) {
      return absl::InvalidArgumentError(
          absl::StrCat("eplb: capacity of shard group ", g, " must be positive"));
    }
    if (in.slots[g] < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("eplb: shard group ", g, " must have at least one slot"));
    }
    total_slots += in.slots[g];
  }
  if (total_slots < E) {
    return absl::InvalidArgumentError(
        absl::StrCat("eplb: ", total_slots, " slots per layer cannot hold ", E, " experts"));
  }
  if (in.load.size() != n_moe) {
    return absl::InvalidArgumentError(absl::StrCat("eplb: load has ", in.load.size(),
                                                   " layers, the model ", n_moe, " MoE layers"));
  }
  for (size_t li = 0; li < n_moe; ++li) {
    if (in.load[li].size() != static_cast<size_t>(E)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "eplb: load of MoE layer #", li, " has ", in.load[li].size(), " experts, the model ", E));
    }
    for (double x : in.load[li]) {
      if (!(x >= 0) || !std::isfinite(x)) {
        return absl::InvalidArgumentError(
            absl::StrCat("eplb: load of MoE layer #", li, " has a negative or non-finite value"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<int32_t> MoeLayers(const ModelConfig& config) {
  std::vector<int32_t> out;
  const int64_t n = config.num_hidden_layers + config.num_nextn_predict_layers;
  for (int32_t l = 0; l < n; ++l) {
    if (config.IsMoeLayer(l)) out.push_back(l);
  }
  return out;
}

absl::StatusOr<std::vector<double>> PlacementImbalance(
    const Placement& placement, const ModelConfig& config,
    const std::vector<std::vector<double>>& load, const std::vector<double>& capacity,
    std::vector<std::vector<double>>* group_load) {
  const std::vector<int32_t> layers = MoeLayers(config);
  const int32_t N = placement.num_shards;
  if (load.size() != layers.size() || capacity.size() != static_cast<size_t>(N) ||
      placement.n_routed_experts != config.n_routed_experts) {
    return absl::InvalidArgumentError(
        "placement imbalance: load, capacity and placement do not match the model");
  }
  const double cap_sum = std::accumulate(capacity.begin(), capacity.end(), 0.0);
  if (!(cap_sum > 0)) return absl::InvalidArgumentError("placement imbalance: no capacity");
  std::vector<double> out;
  if (group_load) group_load->clear();
  for (size_t li = 0; li < layers.size(); ++li) {
    if (load[li].size() != static_cast<size_t>(placement.n_routed_experts)) {
      return absl::InvalidArgumentError("placement imbalance: a layer's load has the wrong size");
    }
    std::vector<double> g(N, 0.0);
    double total = 0;
    for (int32_t e = 0; e < placement.n_routed_experts; ++e) {
      const std::span<const int32_t> s = placement.ShardsOf(layers[li], e);
      if (s.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("placement imbalance: layer ", layers[li],
                                                       " expert ", e, " has no shard"));
      }
      for (int32_t x : s) g[x] += load[li][e] / static_cast<double>(s.size());
      total += load[li][e];
    }
    double worst = 0;
    for (int32_t x = 0; x < N; ++x) {
      if (total > 0) worst = std::max(worst, g[x] / (capacity[x] / cap_sum * total));
    }
    out.push_back(total > 0 ? worst : 1.0);
    if (group_load) group_load->push_back(std::move(g));
  }
  return out;
}

absl::StatusOr<EplbResult> RebalanceExperts(const ModelConfig& config, const EplbInput& in) {
  const std::vector<int32_t> layers = MoeLayers(config);
  if (absl::Status st = Validate(config, in, layers.size()); !st.ok()) return st;
  const int32_t N = in.num_shards;
  const int32_t E = static_cast<int32_t>(config.n_routed_experts);
  const int64_t total_slots = std::accumulate(in.slots.begin(), in.slots.end(), int64_t{0});
  const int64_t free_slots = std::min<int64_t>(total_slots - E, static_cast<int64_t>(E) * (N - 1));
  const int64_t redundant = in.redundant_per_layer < 0
                                ? free_slots
                                : std::min<int64_t>(in.redundant_per_layer, free_slots);
  const double cap_sum = std::accumulate(in.capacity.begin(), in.capacity.end(), 0.0);

  // Hierarchical when the gate limits a token to topk_group < n_group expert groups and whole
  // expert groups fit on the shard groups' slots (at least one each).
  const int64_t n_group = config.n_group;
  const int32_t per_group = n_group > 0 ? static_cast<int32_t>(E / n_group) : E;
  std::vector<int32_t> max_groups(N, 0);  // whole expert groups each shard group has room for
  bool hierarchical =
      N > 1 && n_group > 1 && config.topk_group < n_group && E % n_group == 0 && N <= n_group;
  int64_t fit = 0;
  for (int32_t g = 0; hierarchical && g < N; ++g) {
    max_groups[g] = in.slots[g] / per_group;
    hierarchical = max_groups[g] >= 1;
    fit += max_groups[g];
  }
  hierarchical = hierarchical && fit >= n_group;

  EplbResult result;
  result.hierarchical = hierarchical;
  Placement& p = result.placement;
  p.num_shards = N;
  p.n_layers = static_cast<int32_t>(config.num_hidden_layers + config.num_nextn_predict_layers);
  p.n_routed_experts = E;
  std::vector<std::vector<int32_t>> copies(static_cast<size_t>(p.n_layers) * E);

  for (size_t li = 0; li < layers.size(); ++li) {
    std::vector<double> L = in.load[li];
    if (std::accumulate(L.begin(), L.end(), 0.0) <= 0) std::fill(L.begin(), L.end(), 1.0);

    // Global: replicate first, each extra copy to the expert with the largest load per copy
    // (EPLB's replicate_experts). Hierarchical: the copies come after the home packing.
    std::vector<int32_t> n(E, 1);
    for (int64_t r = 0; r < (hierarchical ? 0 : redundant); ++r) {
      int32_t best = -1;
      for (int32_t e = 0; e < E; ++e) {
        if (n[e] >= N || L[e] <= 0) continue;
        if (best < 0 || L[e] / n[e] > L[best] / n[best]) best = e;
      }
      if (best < 0) break;
      ++n[best];
    }

    Packing pk;
    pk.N = N;
    pk.E = E;
    pk.share.resize(N);
    for (int32_t g = 0; g < N; ++g) pk.share[g] = in.capacity[g] / cap_sum;
    pk.room = in.slots;
    pk.load.assign(N, 0.0);
    pk.holds.assign(static_cast<size_t>(N) * E, 0);

    if (hierarchical) {
      // Whole expert groups onto shard groups, heaviest first, each into the group lightest
      // relative to its share that has room for it (every group gets at least one); each
      // expert's first copy is its home copy, never moved.
      std::vector<double> w(n_group, 0.0);
      for (int32_t e = 0; e < E; ++e) w[e / per_group] += L[e];
      std::vector<int32_t> order(n_group);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return w[a] > w[b]; });
      std::vector<int32_t> count(N, 0);
      int32_t empty = N;
      for (size_t k = 0; k < order.size(); ++k) {
        const int32_t G = order[k];
        const bool only_empty = static_cast<int32_t>(order.size() - k) <= empty;
        int32_t best = -1;
        for (int32_t g = 0; g < N; ++g) {
          if (count[g] >= max_groups[g] || (only_empty && count[g] > 0)) continue;
          if (best < 0 || pk.Norm(g, pk.load[g] + w[G]) < pk.Norm(best, pk.load[best] + w[G])) {
            best = g;
          }
        }
        if (count[best]++ == 0) --empty;
        for (int32_t e = G * per_group; e < (G + 1) * per_group; ++e) {
          pk.items.push_back({e, L[e] / n[e], /*home=*/true});
          pk.Put(pk.items.size() - 1, best);
        }
      }
    }
    if (hierarchical) pk.AddCopies(redundant, L, n);
    // Global: every copy, heaviest first.
    std::vector<size_t> pending;
    for (int32_t e = 0; e < E && !hierarchical; ++e) {
      for (int32_t c = 0; c < n[e]; ++c) {
        pk.items.push_back({e, L[e] / n[e], /*home=*/false});
        pending.push_back(pk.items.size() - 1);
      }
    }
    std::stable_sort(pending.begin(), pending.end(),
                     [&](size_t a, size_t b) { return pk.items[a].load > pk.items[b].load; });
    for (size_t i : pending) {
      const int32_t g = pk.Lightest(i);
      if (g >= 0) pk.Put(i, g);  // else dropped: every group with room holds this expert
    }
    pk.Refine();

    const size_t row = static_cast<size_t>(layers[li]) * E;
    int32_t placed = 0;
    for (const Packing::Item& it : pk.items) {
      if (it.group < 0) continue;
      copies[row + it.expert].push_back(it.group);
      ++placed;
    }
    for (int32_t e = 0; e < E; ++e) std::sort(copies[row + e].begin(), copies[row + e].end());
    result.copies.push_back(placed);
  }
  if (absl::Status st = p.SetCopies(copies); !st.ok()) return st;
  for (int32_t g = 0; g < N; ++g) {
    if (!layers.empty() && p.ExpertsOf(g).empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("eplb: shard group ", g,
                       " would hold no expert (its capacity share is too small for "
                       "this load); give it a larger capacity or remove it"));
    }
  }
  absl::StatusOr<std::vector<double>> imb =
      PlacementImbalance(p, config, in.load, in.capacity, &result.group_load);
  if (!imb.ok()) return imb.status();
  result.imbalance = *std::move(imb);
  return result;
}

}  // namespace expertmesh
