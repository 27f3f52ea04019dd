#include "planner/planner.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <boost/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/base/json.h"
#include "core/base/status.h"
#include "core/engine/micro_batch_engine.h"
#include "core/format/wire.h"
#include "placement/eplb.h"

namespace expertmesh::planner {
namespace {

namespace jf = json_field;
constexpr double kGib = 1024.0 * 1024.0 * 1024.0;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Weight bytes and parameter count of a [out, in] linear layer: FP8 codes plus one float
// scale per 128 x 128 block when the checkpoint is FP8, else BF16.
struct Linear {
  int64_t bytes = 0;
  int64_t params = 0;
};
Linear LinearOf(const ModelConfig& c, int64_t out, int64_t in) {
  const bool fp8 = c.quantization_config.present;
  int64_t block_out = 128, block_in = 128;
  if (c.quantization_config.weight_block_size.size() == 2) {
    block_out = c.quantization_config.weight_block_size[0];
    block_in = c.quantization_config.weight_block_size[1];
  }
  Linear l;
  l.params = out * in;
  l.bytes = fp8 ? out * in + CeilDiv(out, block_out) * CeilDiv(in, block_in) * 4 : out * in * 2;
  return l;
}

// Per-card aggregates of one MoE layer at batch B.
struct CardLoad {
  double bytes = 0;          // expected weight bytes read (passes over the experts touched)
  double flops = 0;          // expected matmul FLOPs
  double log_untouched = 0;  // sum over its copies of log(1 - q): P(a row skips the card)
};

// The routing probability of one token to (layer, expert): k x share.
double Prob(const Plan& plan, int layer, int e) {
  return std::min(1.0, static_cast<double>(plan.config.num_experts_per_tok) * plan.share[layer][e]);
}

// Passes of the kernel over a matrix at exactly `rows` rows (rows_per_pass 0: one pass).
double Passes(int64_t rows, int rows_per_pass) {
  if (rows <= 0) return 0;
  return rows_per_pass > 0 ? std::ceil(static_cast<double>(rows) / rows_per_pass) : 1.0;
}

// E[Passes(R)] for R ~ Binomial(batch, q): the expected passes of the kernel over an expert's
// weights (rows_per_pass 0: P(R > 0) = 1 - (1 - q)^batch). The probabilities come from the
// ratio of successive terms in log space, from R = 1 up to where the tail past the mean is
// negligible.
double ExpectedPasses(int batch, double q, int rows_per_pass) {
  if (batch <= 0 || q <= 0) return 0;
  if (rows_per_pass <= 0) return 1.0 - std::pow(1.0 - std::min(q, 1.0), batch);
  if (q >= 1.0 - 1e-12) return Passes(batch, rows_per_pass);
  const double log_ratio = std::log(q) - std::log1p(-q);
  double log_p = batch * std::log1p(-q);  // P(R = 0)
  const double mean = batch * q;
  double passes = 0;
  for (int r = 1; r <= batch; ++r) {
    log_p += std::log(static_cast<double>(batch - r + 1) / r) + log_ratio;
    const double p = std::exp(log_p);
    passes += p * Passes(r, rows_per_pass);
    if (r > mean && p < 1e-15) break;
  }
  return passes;
}

std::vector<CardLoad> LayerLoads(const Plan& plan, int layer, int batch) {
  const int E = static_cast<int>(plan.config.n_routed_experts);
  std::vector<CardLoad> loads(plan.pool.cards.size());
  for (int e = 0; e < E; ++e) {
    const std::vector<int>& copies = plan.copies[static_cast<size_t>(layer) * E + e];
    if (copies.empty()) continue;
    // The dispatcher spreads an expert's rows over its copies (placement.h ChooseShards).
    const double q = Prob(plan, layer, e) / copies.size();
    for (int c : copies) {
      const double passes = ExpectedPasses(batch, q, plan.pool.cards[c].kind.rows_per_pass);
      loads[c].bytes += passes * plan.sizes.expert_bytes;
      // Rows beyond the first of each pass (the first is in the bytes term).
      loads[c].flops += (batch * q - passes) * plan.sizes.expert_flops_per_row;
      loads[c].log_untouched += std::log1p(-std::min(q, 1.0 - 1e-12));
    }
  }
  return loads;
}

// The time of one MoE layer at batch B, split by cause along its critical path.
struct LayerTime {
  double total_s = 0;
  double expert_s = 0, link_s = 0, latency_s = 0, dispatch_s = 0;
  bool compute_bound = false;
  int slowest_card = -1;
  int link_node = -1;  // the node whose link limits the slowest card; -1: the attention link
};

LayerTime TimeLayer(const Plan& plan, const std::vector<CardLoad>& loads, int batch) {
  const Pool& pool = plan.pool;
  const double out_row = plan.sizes.wire_out_bytes_per_row;
  const double back_row = plan.sizes.wire_back_bytes_per_row;
  std::vector<double> rows(loads.size());
  std::vector<double> node_rows(pool.nodes.size(), 0.0);
  double total_rows = 0;
  for (size_t c = 0; c < loads.size(); ++c) {
    rows[c] = batch * (1.0 - std::exp(loads[c].log_untouched));
    node_rows[pool.cards[c].node] += rows[c];
    total_rows += rows[c];
  }
  const double att_bps = pool.attention.link_gbps * 1e9 / 8;
  LayerTime best;
  double worst = -1;
  for (size_t c = 0; c < loads.size(); ++c) {
    if (rows[c] <= 0 && loads[c].bytes <= 0) continue;
    const Node& node = pool.nodes[pool.cards[c].node];
    const CardKind& k = pool.cards[c].kind;
    const double node_bps = node.link_gbps * 1e9 / 8;
    // The rows of every card of the node share its link; every row crosses the attention
    // node's link. Out and back each wait for the busier of the two.
    const double nr = node_rows[pool.cards[c].node];
    const bool node_limits = nr / node_bps >= total_rows / att_bps;
    const double link = (node_limits ? nr / node_bps : total_rows / att_bps) * (out_row + back_row);
    const double latency = 2 * (node.latency_us + pool.attention.latency_us) * 1e-6;
    const double mem = loads[c].bytes / (k.bandwidth_gbs * 1e9 * k.efficiency);
    const double comp = k.gflops > 0 ? loads[c].flops / (k.gflops * 1e9) : 0;
    const double t = link + latency + mem + comp;
    if (t > worst) {
      worst = t;
      best.link_s = link;
      best.latency_s = latency;
      best.expert_s = mem + comp;
      best.compute_bound = comp > mem;
      best.slowest_card = static_cast<int>(c);
      best.link_node = node_limits ? pool.cards[c].node : -1;
    }
  }
  if (worst < 0) worst = 0;
  best.dispatch_s = (pool.dispatch_overhead_us + batch * pool.dispatch_overhead_per_row_us) * 1e-6;
  best.total_s = worst + best.dispatch_s;
  return best;
}

// One attention node's time for a step (or micro-batch) of per_node rows.
double AttentionNodeSeconds(const Plan& plan, double per_node) {
  const AttentionNodes& a = plan.pool.attention;
  const ModelSizes& s = plan.sizes;
  // The weights are read once per pass of the kernel (the KV cache once); the first row of
  // each pass rides on the weight stream (M = 1), each further row adds its FLOPs at the
  // kind's marginal rate.
  const double passes = Passes(static_cast<int64_t>(per_node), a.kind.rows_per_pass);
  const double mem =
      (passes * s.attention_bytes + per_node * plan.pool.context * s.kv_bytes_per_token) /
      (a.kind.bandwidth_gbs * 1e9 * a.kind.efficiency);
  const double core = per_node * plan.pool.context * s.attention_flops_per_cached_token;
  const double comp =
      a.kind.gflops > 0
          ? ((per_node - passes) * s.attention_flops_per_token + core) / (a.kind.gflops * 1e9)
          : 0;
  return mem + comp;
}

// The micro-batches a step of `batch` decode rows (one per sequence) is split into, as the
// attention service splits it (SplitMicroBatches); a GPU attention node runs steps unsplit.
std::vector<int> MicroBatchSizes(const Pool& pool, int batch) {
  if (pool.attention.kind.gpu || batch < 1) return {batch};
  const std::vector<int64_t> rows(batch, 1);
  std::vector<int> sizes;
  size_t begin = 0;
  for (size_t end : SplitMicroBatches(rows, pool.micro_batches, pool.micro_batch_min_rows)) {
    sizes.push_back(static_cast<int>(end - begin));
    begin = end;
  }
  return sizes;
}

// The attention nodes' time for a step of `batch` rows: each node's micro-batches in turn.
double AttentionSeconds(const Plan& plan, int batch) {
  const AttentionNodes& a = plan.pool.attention;
  const int per_node = static_cast<int>(std::ceil(static_cast<double>(batch) / a.count));
  double s = 0;
  for (int rows : MicroBatchSizes(plan.pool, per_node)) s += AttentionNodeSeconds(plan, rows);
  return s;
}

int MaxBatch(const Pool& pool) {
  return *std::max_element(pool.batches.begin(), pool.batches.end());
}

double AttentionNeedGib(const Plan& plan) {
  const double per_node =
      std::ceil(static_cast<double>(MaxBatch(plan.pool)) / plan.pool.attention.count);
  return (plan.sizes.attention_bytes +
          per_node * plan.pool.context * plan.sizes.kv_bytes_per_token) /
             kGib +
         plan.pool.attention.kind.overhead_gib;
}

// The expert slots (whole experts) each card can hold after its fixed overhead.
std::vector<int64_t> Slots(const Pool& pool, int64_t expert_bytes) {
  std::vector<int64_t> slots;
  for (const Card& c : pool.cards) {
    const double free = std::max(0.0, (c.kind.memory_gib - c.kind.overhead_gib) * kGib);
    slots.push_back(static_cast<int64_t>(free / expert_bytes));
  }
  return slots;
}

}  // namespace

const char* BottleneckName(Bottleneck b) {
  switch (b) {
    case Bottleneck::kExpertBandwidth:
      return "expert card memory bandwidth";
    case Bottleneck::kExpertCompute:
      return "expert card compute";
    case Bottleneck::kLink:
      return "link bandwidth";
    case Bottleneck::kLatency:
      return "round trips (link latency)";
    case Bottleneck::kDispatch:
      return "dispatch overhead per layer";
    case Bottleneck::kAttention:
      return "attention node";
    case Bottleneck::kStepOverhead:
      return "attention service step overhead";
  }
  return "?";
}

ModelSizes SizesOf(const ModelConfig& c) {
  ModelSizes s;
  const int64_t H = c.hidden_size;
  const int64_t I = c.moe_intermediate_size;
  const Linear gate_up = LinearOf(c, I, H), down = LinearOf(c, H, I);
  s.expert_bytes = 2 * gate_up.bytes + down.bytes;
  s.expert_flops_per_row = 2 * (2 * gate_up.params + down.params);
  const int64_t n_layers = c.num_hidden_layers + c.num_nextn_predict_layers;
  for (int64_t l = 0; l < n_layers; ++l) {
    if (c.IsMoeLayer(l)) {
      s.moe_layers.push_back(static_cast<int>(l));
      if (l < c.num_hidden_layers) ++s.decode_moe_layers;
    }
  }
  // The attention node, per decode layer.
  const int64_t heads = c.num_attention_heads;
  int64_t bytes = 0, params = 0;
  auto add = [&](const Linear& l) {
    bytes += l.bytes;
    params += l.params;
  };
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (c.q_lora_rank > 0) {
      add(LinearOf(c, c.q_lora_rank, H));
      add(LinearOf(c, heads * c.qk_head_dim(), c.q_lora_rank));
      bytes += c.q_lora_rank * 2;
    } else {
      add(LinearOf(c, heads * c.qk_head_dim(), H));
    }
    add(LinearOf(c, c.kv_lora_rank + c.qk_rope_head_dim, H));
    // kv_b_proj: the absorbed attention reads it as float, dequantized once at load
    // (core/model/model.h MlaWeights::kv_b_absorbed): 4 bytes per weight.
    const int64_t kv_b = heads * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank;
    bytes += kv_b * 4;
    params += kv_b;
    add(LinearOf(c, H, heads * c.v_head_dim));
    bytes += (2 * H + c.kv_lora_rank) * 2;  // norms, BF16
    if (c.IsMoeLayer(l)) {
      const int64_t S = c.n_shared_experts * I;
      if (S > 0) {
        add(LinearOf(c, S, H));
        add(LinearOf(c, S, H));
        add(LinearOf(c, H, S));
      }
      bytes += c.n_routed_experts * (H + 1) * 4;  // gate weight and bias, float
      params += c.n_routed_experts * H;
    } else {
      add(LinearOf(c, c.intermediate_size, H));
      add(LinearOf(c, c.intermediate_size, H));
      add(LinearOf(c, H, c.intermediate_size));
    }
  }
  bytes += c.vocab_size * H * 2 + H * 2;  // lm_head (BF16) and the final norm
  params += c.vocab_size * H;
  s.attention_bytes = bytes;
  // Per token: 2 FLOPs per weight (the attention core over the context: below).
  s.attention_flops_per_token = 2 * params;
  // The MLA cache holds kv_lora_rank + qk_rope_head_dim values per token and layer (float here).
  s.kv_bytes_per_token = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4;
  s.attention_flops_per_cached_token =
      c.num_hidden_layers * c.num_attention_heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim) * 2;
  s.wire_out_bytes_per_row = static_cast<int64_t>(ActivationBytes(1, H) + ScaleBytes(1, H));
  s.wire_back_bytes_per_row = static_cast<int64_t>(OutputBytes(1, H));
  return s;
}

absl::StatusOr<LoadProfile> ParseLoadProfile(std::string_view json_text,
                                             const ModelConfig& config) {
  boost::system::error_code ec;
  boost::json::value root = boost::json::parse(json_text, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("load profile: not JSON: ", ec.message()));
  if (!root.is_object()) return absl::InvalidArgumentError("load profile: expected an object");
  const boost::json::value* loads = jf::Find(root.get_object(), "expert_load");
  if (loads == nullptr) loads = jf::Find(root.get_object(), "expertLoad");
  if (loads == nullptr || !loads->is_array()) {
    return absl::InvalidArgumentError(
        "load profile: expected \"expert_load\": [{\"layer\", \"expert\", \"tokens\"}, ...] (a "
        "router GetStatus response as JSON)");
  }
  const int64_t n_layers = config.num_hidden_layers + config.num_nextn_predict_layers;
  const int64_t E = config.n_routed_experts;
  std::vector<std::vector<double>> tokens(n_layers, std::vector<double>(E, 0.0));
  for (size_t i = 0; i < loads->get_array().size(); ++i) {
    const boost::json::value& v = loads->get_array()[i];
    const std::string where = absl::StrCat("load profile: expert_load[", i, "]");
    if (!v.is_object()) return absl::InvalidArgumentError(where + " must be an object");
    const boost::json::object& o = v.get_object();
    const boost::json::value* lv = jf::Find(o, "layer");
    const boost::json::value* ev = jf::Find(o, "expert");
    const boost::json::value* tv = jf::Find(o, "tokens");
    std::optional<int64_t> layer = lv ? jf::AsInt64(*lv) : std::optional<int64_t>(0);
    std::optional<int64_t> expert = ev ? jf::AsInt64(*ev) : std::optional<int64_t>(0);
    std::optional<double> t = tv ? jf::AsNumber(*tv) : std::optional<double>(0.0);
    if (tv != nullptr && tv->is_string()) {  // protobuf JSON writes uint64 as a string
      uint64_t u;
      t = absl::SimpleAtoi(std::string(tv->get_string()), &u) ? std::optional<double>(u)
                                                              : std::nullopt;
    }
    if (!layer || !expert || !t || *t < 0) {
      return absl::InvalidArgumentError(where + ": layer, expert and tokens must be integers");
    }
    if (*layer < 0 || *layer >= n_layers || !config.IsMoeLayer(*layer) || *expert < 0 ||
        *expert >= E) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": (layer ", *layer, ", expert ",
                                                     *expert, ") is not a routed expert"));
    }
    tokens[*layer][*expert] += *t;
  }
  LoadProfile p;
  p.share.assign(n_layers, {});
  for (int64_t l = 0; l < n_layers; ++l) {
    const double sum = std::accumulate(tokens[l].begin(), tokens[l].end(), 0.0);
    if (sum > 0) {
      p.share[l] = tokens[l];
      for (double& x : p.share[l]) x /= sum;
    }
  }
  return p;
}

absl::StatusOr<Plan> MakePlan(const ModelConfig& config, const Pool& pool,
                              const PlanOptions& options) {
  if (config.n_routed_experts <= 0 || config.num_experts_per_tok <= 0) {
    return absl::InvalidArgumentError("the config has no routed experts to place");
  }
  if (pool.cards.empty()) return absl::InvalidArgumentError("the pool has no expert cards");
  Plan plan;
  plan.config = config;
  plan.sizes = SizesOf(config);
  plan.pool = pool;
  const int E = static_cast<int>(config.n_routed_experts);
  const int n_layers = static_cast<int>(config.num_hidden_layers + config.num_nextn_predict_layers);
  const int C = static_cast<int>(pool.cards.size());
  const int64_t eb = plan.sizes.expert_bytes;

  // Memory: every (layer, expert) once, on the expert cards.
  const int64_t needed = static_cast<int64_t>(plan.sizes.moe_layers.size()) * E;
  std::vector<int64_t> slots = Slots(pool, eb);
  const int64_t have = std::accumulate(slots.begin(), slots.end(), int64_t{0});
  if (have < needed) {
    double free_gib = 0;
    const CardKind* largest = &pool.cards[0].kind;
    for (const Card& c : pool.cards) {
      free_gib += std::max(0.0, c.kind.memory_gib - c.kind.overhead_gib);
      if (c.kind.memory_gib > largest->memory_gib) largest = &c.kind;
    }
    const double need_gib = static_cast<double>(needed) * eb / kGib;
    const int64_t per_card = std::max<int64_t>(
        1, static_cast<int64_t>((largest->memory_gib - largest->overhead_gib) * kGib / eb));
    return absl::FailedPreconditionError(absl::StrFormat(
        "the pool is too small: %d routed experts x %d MoE layers need %.1f GiB (%.1f MiB "
        "each), the %d expert cards hold %.1f GiB after %s per-card overhead: short by %.1f "
        "GiB, i.e. %d more expert slots (about %d more %s)",
        E, plan.sizes.moe_layers.size(), need_gib, eb / 1048576.0, C, free_gib, "their",
        need_gib - free_gib, needed - have, CeilDiv(needed - have, per_card), largest->name));
  }
  // The attention node holds every non-expert weight and the KV cache of its sequences.
  plan.attention_used_gib = AttentionNeedGib(plan);
  if (plan.attention_used_gib > pool.attention.kind.memory_gib) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "the attention node (%s, %.1f GiB) is too small: the non-expert weights take %.1f GiB, "
        "the KV cache of %d sequences x %d tokens %.1f GiB, overhead %.1f GiB: short by %.1f "
        "GiB (a larger attention kind, more attention nodes, or a smaller batch/context)",
        pool.attention.kind.name, pool.attention.kind.memory_gib, plan.sizes.attention_bytes / kGib,
        static_cast<int>(std::ceil(static_cast<double>(MaxBatch(pool)) / pool.attention.count)),
        pool.context,
        std::ceil(static_cast<double>(MaxBatch(pool)) / pool.attention.count) * pool.context *
            plan.sizes.kv_bytes_per_token / kGib,
        pool.attention.kind.overhead_gib,
        plan.attention_used_gib - pool.attention.kind.memory_gib));
  }

  // Routing shares: the profile where it has the layer, else uniform.
  plan.share.assign(n_layers, std::vector<double>(E, 1.0 / E));
  if (options.load != nullptr) {
    for (int l = 0; l < n_layers && l < static_cast<int>(options.load->share.size()); ++l) {
      if (static_cast<int>(options.load->share[l].size()) == E)
        plan.share[l] = options.load->share[l];
    }
  }

  // Single copies: placement/eplb.h (capacity = speed, slots = the card's memory slots / L
  // per layer, no redundant copies yet) when every card has a slot per layer; else (a pool too
  // tight for equal per-layer slots) the greedy below.
  plan.copies.assign(static_cast<size_t>(n_layers) * E, {});
  std::vector<int64_t> left = slots;
  const int64_t L = static_cast<int64_t>(plan.sizes.moe_layers.size());
  std::vector<double> speed(C);
  for (int c = 0; c < C; ++c) {
    speed[c] = pool.cards[c].kind.bandwidth_gbs * pool.cards[c].kind.efficiency;
  }
  {
    EplbInput in;
    in.num_shards = C;
    in.capacity = speed;
    in.redundant_per_layer = 0;
    int64_t per_layer = 0;
    bool fits = C <= E;
    for (int c = 0; c < C; ++c) {
      in.slots.push_back(static_cast<int32_t>(std::min<int64_t>(slots[c] / L, E)));
      fits = fits && in.slots.back() >= 1;
      per_layer += in.slots.back();
    }
    for (int l : plan.sizes.moe_layers) {
      in.load.push_back(plan.share[l]);
      for (double& x : in.load.back()) x *= 1e6;  // shares as token counts
    }
    if (fits && per_layer >= E) {
      absl::StatusOr<EplbResult> r = RebalanceExperts(config, in);
      if (r.ok()) {
        for (int l : plan.sizes.moe_layers) {
          for (int e = 0; e < E; ++e) {
            for (int32_t c : r->placement.ShardsOf(l, e)) {
              plan.copies[static_cast<size_t>(l) * E + e].push_back(c);
              --left[c];
            }
          }
        }
        plan.balancer =
            r->hierarchical ? "placement/eplb.h, expert groups packed whole" : "placement/eplb.h";
      }
    }
  }
  // The greedy: layer by layer, each card may take about slots / L experts per layer
  // (Bresenham-spread so every layer gets its share of the remainders), the hottest expert
  // first to the card whose load per unit of speed stays lowest (LPT, weighted by bandwidth x
  // efficiency). When no card has allowance left in a layer, any card with memory left.
  for (int64_t li = 0; plan.balancer.empty() && li < L; ++li) {
    const int l = plan.sizes.moe_layers[li];
    std::vector<int64_t> allowance(C);
    for (int c = 0; c < C; ++c) {
      allowance[c] = slots[c] * (li + 1) / L - slots[c] * li / L;
    }
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return plan.share[l][a] > plan.share[l][b]; });
    std::vector<double> load(C, 0.0);
    for (int e : order) {
      int best = -1;
      for (int pass = 0; pass < 2 && best < 0; ++pass) {
        double best_cost = 0;
        for (int c = 0; c < C; ++c) {
          if (left[c] <= 0 || (pass == 0 && allowance[c] <= 0)) continue;
          const double cost = (load[c] + plan.share[l][e] + 1e-9) / speed[c];
          // Ties (equal speed and load) go to the card with the most memory left, so that
          // cards beyond a layer's expert count take the next layers' experts.
          const double tie = 1e-9 * best_cost;
          if (best < 0 || cost < best_cost - tie ||
              (cost <= best_cost + tie && left[c] > left[best])) {
            best = c;
            best_cost = cost;
          }
        }
      }
      if (best < 0) return absl::InternalError("placement ran out of slots despite the check");
      plan.copies[static_cast<size_t>(l) * E + e].push_back(best);
      load[best] += plan.share[l][e] + 1e-9;
      --left[best];
      --allowance[best];
    }
  }

  if (plan.balancer.empty()) plan.balancer = "planner greedy (per-layer slots too few for eplb)";

  // Redundant copies of the hottest experts, where memory is left and the layer's predicted
  // time at the largest batch drops by at least 1% (a copy halves the rows of each copy but
  // is read too: under uniform routing it rarely pays). MTP layers are not decoded: no copies.
  if (options.redundant_copies) {
    const int batch = MaxBatch(pool);
    bool progress = true;
    while (progress) {
      progress = false;
      for (int l : plan.sizes.moe_layers) {
        if (l >= config.num_hidden_layers) continue;
        const double before = TimeLayer(plan, LayerLoads(plan, l, batch), batch).total_s;
        // The hottest expert with the fewest copies.
        int hot = -1;
        for (int e = 0; e < E; ++e) {
          const auto& ce = plan.copies[static_cast<size_t>(l) * E + e];
          if (hot < 0) {
            hot = e;
            continue;
          }
          const auto& ch = plan.copies[static_cast<size_t>(l) * E + hot];
          const double ve = plan.share[l][e] / ce.size(), vh = plan.share[l][hot] / ch.size();
          if (ve > vh) hot = e;
        }
        std::vector<int>& cp = plan.copies[static_cast<size_t>(l) * E + hot];
        int best = -1;
        double best_t = before * 0.99;
        for (int c = 0; c < C; ++c) {
          if (left[c] <= 0 || std::find(cp.begin(), cp.end(), c) != cp.end()) continue;
          cp.push_back(c);
          const double t = TimeLayer(plan, LayerLoads(plan, l, batch), batch).total_s;
          cp.pop_back();
          if (t < best_t) {
            best_t = t;
            best = c;
          }
        }
        if (best >= 0) {
          cp.push_back(best);
          std::sort(cp.begin(), cp.end());
          --left[best];
          ++plan.redundant_copies;
          progress = true;
        }
      }
    }
  }

  plan.cards.resize(C);
  for (int c = 0; c < C; ++c) plan.cards[c].card = c;
  for (int l = 0; l < n_layers; ++l) {
    for (int e = 0; e < E; ++e) {
      for (int c : plan.copies[static_cast<size_t>(l) * E + e]) {
        plan.cards[c].experts.push_back({l, e});
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    plan.cards[c].expert_gib = static_cast<double>(plan.cards[c].experts.size()) * eb / kGib;
    plan.cards[c].used_gib = plan.cards[c].expert_gib + pool.cards[c].kind.overhead_gib;
  }
  return plan;
}

Prediction Predict(const Plan& plan, int batch) {
  Prediction p;
  p.batch = batch;
  double expert = 0, link = 0, latency = 0, dispatch = 0, bw_part = 0, comp_part = 0;
  std::vector<double> card_critical(plan.cards.size(), 0.0);
  std::vector<double> link_by_node(plan.pool.nodes.size() + 1, 0.0);  // [0]: attention link
  // Each micro-batch dispatches every MoE layer on its own; the micro-batches' times add up
  // (their overlap with each other's attention compute is not modelled).
  const std::vector<int> micro = MicroBatchSizes(plan.pool, batch);
  for (int l : plan.sizes.moe_layers) {
    if (l >= plan.config.num_hidden_layers) continue;  // MTP: not in a plain decode step
    for (int rows : micro) {
      const LayerTime t = TimeLayer(plan, LayerLoads(plan, l, rows), rows);
      expert += t.expert_s;
      (t.compute_bound ? comp_part : bw_part) += t.expert_s;
      link += t.link_s;
      latency += t.latency_s;
      dispatch += t.dispatch_s;
      if (t.slowest_card >= 0) card_critical[t.slowest_card] += t.expert_s;
      link_by_node[t.link_node + 1] += t.link_s;
    }
  }
  const double attention = AttentionSeconds(plan, batch);
  const double overhead =
      (plan.pool.step_overhead_us + batch * plan.pool.step_overhead_per_row_us) * 1e-6;
  const double step = expert + link + latency + dispatch + attention + overhead;
  p.step_ms = step * 1e3;
  p.tokens_per_s = step > 0 ? batch / step : 0;
  p.expert_ms = expert * 1e3;
  p.link_ms = link * 1e3;
  p.latency_ms = latency * 1e3;
  p.dispatch_ms = dispatch * 1e3;
  p.attention_ms = attention * 1e3;
  p.overhead_ms = overhead * 1e3;
  struct Part {
    double s;
    Bottleneck b;
  };
  const Part parts[] = {{bw_part, Bottleneck::kExpertBandwidth},
                        {comp_part, Bottleneck::kExpertCompute},
                        {link, Bottleneck::kLink},
                        {latency, Bottleneck::kLatency},
                        {dispatch, Bottleneck::kDispatch},
                        {attention, Bottleneck::kAttention},
                        {overhead, Bottleneck::kStepOverhead}};
  const Part* top = &parts[0];
  for (const Part& part : parts) {
    if (part.s > top->s) top = &part;
  }
  p.bottleneck = top->b;
  const int slow = static_cast<int>(std::max_element(card_critical.begin(), card_critical.end()) -
                                    card_critical.begin());
  const Pool& pool = plan.pool;
  switch (p.bottleneck) {
    case Bottleneck::kExpertBandwidth:
    case Bottleneck::kExpertCompute:
      p.bottleneck_detail = absl::StrFormat(
          "%s (card %d, %s%s)", BottleneckName(p.bottleneck), slow, pool.cards[slow].kind.name,
          pool.cards[slow].kind.fp8 || !pool.cards[slow].kind.gpu ? "" : ", FP8 widened");
      break;
    case Bottleneck::kLink: {
      // The link that held the critical path longest.
      const int w = static_cast<int>(std::max_element(link_by_node.begin(), link_by_node.end()) -
                                     link_by_node.begin());
      const std::string where =
          w == 0 ? absl::StrFormat("attention link %g Gbit/s", pool.attention.link_gbps)
                 : absl::StrFormat("%s link %g Gbit/s", pool.nodes[w - 1].name,
                                   pool.nodes[w - 1].link_gbps);
      p.bottleneck_detail = absl::StrCat(BottleneckName(p.bottleneck), " (", where, ")");
      break;
    }
    case Bottleneck::kAttention:
      p.bottleneck_detail =
          absl::StrFormat("%s (%s)", BottleneckName(p.bottleneck), pool.attention.kind.name);
      break;
    default:
      p.bottleneck_detail = BottleneckName(p.bottleneck);
  }
  return p;
}

std::string PlanTable(const Plan& plan, const std::vector<Prediction>& predictions) {
  const ModelConfig& c = plan.config;
  const Pool& pool = plan.pool;
  std::string out = absl::StrFormat(
      "model: %d layers (%d MoE, %d of them MTP), %d routed experts, top-%d; expert %.1f MiB "
      "(%s), %.2f GiB of routed experts\n",
      c.num_hidden_layers + c.num_nextn_predict_layers, plan.sizes.moe_layers.size(),
      plan.sizes.moe_layers.size() - plan.sizes.decode_moe_layers, c.n_routed_experts,
      c.num_experts_per_tok, plan.sizes.expert_bytes / 1048576.0,
      c.quantization_config.present ? "FP8 weights + block scales" : "BF16",
      static_cast<double>(plan.sizes.moe_layers.size()) * c.n_routed_experts *
          plan.sizes.expert_bytes / kGib);
  absl::StrAppendFormat(&out,
                        "attention: %d x %s, %.1f / %.1f GiB each (non-expert weights %.2f GiB, "
                        "KV cache, %.2f GiB overhead)\n",
                        pool.attention.count, pool.attention.kind.name, plan.attention_used_gib,
                        pool.attention.kind.memory_gib, plan.sizes.attention_bytes / kGib,
                        pool.attention.kind.overhead_gib);
  absl::StrAppendFormat(&out,
                        "placement: %d shard groups (one per card), balanced by %s, %d redundant "
                        "copies\n\n",
                        pool.cards.size(), plan.balancer, plan.redundant_copies);
  absl::StrAppendFormat(&out, "%-5s %-10s %-10s %-4s %8s %10s %13s %9s\n", "card", "node", "kind",
                        "fp8", "experts", "expert GiB", "used/total", "GB/s x eff");
  for (size_t i = 0; i < plan.cards.size(); ++i) {
    const Card& card = pool.cards[i];
    absl::StrAppendFormat(&out, "%-5d %-10s %-10s %-4s %8d %10.2f %6.1f/%-6.1f %5.0fx%.2f\n", i,
                          pool.nodes[card.node].name, card.kind.name, card.kind.fp8 ? "yes" : "no",
                          plan.cards[i].experts.size(), plan.cards[i].expert_gib,
                          plan.cards[i].used_gib, card.kind.memory_gib, card.kind.bandwidth_gbs,
                          card.kind.efficiency);
  }
  absl::StrAppendFormat(&out, "\n%-6s %8s %8s %8s %8s %8s %8s %9s %8s  %s\n", "batch", "tok/s",
                        "step ms", "experts", "link", "latency", "dispatch", "attention",
                        "step ovh", "bottleneck");
  for (const Prediction& p : predictions) {
    absl::StrAppendFormat(&out, "%-6d %8.1f %8.2f %8.2f %8.2f %8.2f %8.2f %9.2f %8.2f  %s\n",
                          p.batch, p.tokens_per_s, p.step_ms, p.expert_ms, p.link_ms, p.latency_ms,
                          p.dispatch_ms, p.attention_ms, p.overhead_ms, p.bottleneck_detail);
  }
  return out;
}

std::string PlanJson(const Plan& plan, const std::vector<Prediction>& predictions) {
  boost::json::object root;
  root["expert_bytes"] = plan.sizes.expert_bytes;
  root["moe_layers"] = static_cast<int64_t>(plan.sizes.moe_layers.size());
  root["redundant_copies"] = plan.redundant_copies;
  root["balancer"] = plan.balancer;
  root["attention"] = {{"kind", plan.pool.attention.kind.name},
                       {"count", plan.pool.attention.count},
                       {"used_gib", plan.attention_used_gib},
                       {"memory_gib", plan.pool.attention.kind.memory_gib},
                       {"weight_bytes", plan.sizes.attention_bytes}};
  boost::json::array cards;
  for (size_t i = 0; i < plan.cards.size(); ++i) {
    const Card& card = plan.pool.cards[i];
    boost::json::array experts;
    for (const auto& [l, e] : plan.cards[i].experts) experts.push_back(boost::json::array{l, e});
    cards.push_back(boost::json::object{{"card", static_cast<int64_t>(i)},
                                        {"shard", static_cast<int64_t>(i)},
                                        {"node", plan.pool.nodes[card.node].name},
                                        {"kind", card.kind.name},
                                        {"fp8", card.kind.fp8},
                                        {"memory_gib", card.kind.memory_gib},
                                        {"used_gib", plan.cards[i].used_gib},
                                        {"expert_gib", plan.cards[i].expert_gib},
                                        {"overhead_gib", card.kind.overhead_gib},
                                        {"experts", std::move(experts)}});
  }
  root["cards"] = std::move(cards);
  boost::json::array preds;
  for (const Prediction& p : predictions) {
    preds.push_back(boost::json::object{{"batch", p.batch},
                                        {"tokens_per_s", p.tokens_per_s},
                                        {"step_ms", p.step_ms},
                                        {"expert_ms", p.expert_ms},
                                        {"link_ms", p.link_ms},
                                        {"latency_ms", p.latency_ms},
                                        {"dispatch_ms", p.dispatch_ms},
                                        {"attention_ms", p.attention_ms},
                                        {"step_overhead_ms", p.overhead_ms},
                                        {"bottleneck", BottleneckName(p.bottleneck)},
                                        {"bottleneck_detail", p.bottleneck_detail}});
  }
  root["predictions"] = std::move(preds);
  return boost::json::serialize(root) + "\n";
}

}  // namespace expertmesh::planner
