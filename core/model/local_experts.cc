#include "core/model/local_experts.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <tuple>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/numerics/numerics.h"
#include "core/numerics/quant.h"

namespace expertmesh {

std::vector<LayerExpert> AllExperts(const ModelConfig& config) {
  std::vector<LayerExpert> all;
  const int64_t layers = config.num_hidden_layers + config.num_nextn_predict_layers;
  for (int32_t layer = 0; layer < layers; ++layer) {
    if (!config.IsMoeLayer(layer)) continue;
    for (int32_t e = 0; e < config.n_routed_experts; ++e) all.push_back({layer, e});
  }
  return all;
}

absl::StatusOr<std::unique_ptr<LocalExperts>> LocalExperts::Create(
    const Checkpoint& ckpt, const ModelConfig& config, std::span<const LayerExpert> experts,
    Options options) {
  std::unique_ptr<LocalExperts> le(new LocalExperts(config.hidden_size, std::move(options)));
  if (absl::Status s = le->Add(ckpt, config, experts); !s.ok()) return s;
  return le;
}

uint64_t LocalExperts::BytesOf(const MlpWeights& w) {
  uint64_t bytes = 0;
  for (const Linear* l : {&w.gate_proj, &w.up_proj, &w.down_proj}) {
    bytes += l->weight.size + l->scale_inv.size;
  }
  return bytes;
}

absl::Status LocalExperts::Add(const Checkpoint& ckpt, const ModelConfig& config,
                               std::span<const LayerExpert> experts) {
  if (config.hidden_size != hidden_size_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "experts: a config of hidden_size %d for experts of %d", config.hidden_size, hidden_size_));
  }
  const int64_t layers = config.num_hidden_layers + config.num_nextn_predict_layers;
  for (const LayerExpert& le_id : experts) {
    if (le_id.layer < 0 || le_id.layer >= layers || !config.IsMoeLayer(le_id.layer) ||
        le_id.expert < 0 || le_id.expert >= config.n_routed_experts) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "no routed expert %d in layer %d of this config", le_id.expert, le_id.layer));
    }
  }
  std::vector<LayerExpert> todo;
  {
    std::shared_lock<std::shared_mutex> lock(mu_);
    for (const LayerExpert& le_id : experts) {
      if (!experts_.contains(le_id)) todo.push_back(le_id);
    }
  }
  std::sort(todo.begin(), todo.end());
  todo.erase(std::unique(todo.begin(), todo.end()), todo.end());
  // Load and pack outside the lock: calls on the experts already held go on meanwhile.
  const BlockShape block = WeightBlockShape(config);
  const int64_t h = config.hidden_size;
  const int64_t inter = config.moe_intermediate_size;
  std::vector<std::pair<LayerExpert, MlpWeights>> loaded;
  loaded.reserve(todo.size());
  int64_t done = 0;
  for (const LayerExpert& le_id : todo) {
    const std::string p =
        absl::StrCat("model.layers.", le_id.layer, ".mlp.experts.", le_id.expert, ".");
    MlpWeights w;
    for (auto [name, out, in, dst] : {std::tuple{"gate_proj", inter, h, &w.gate_proj},
                                      std::tuple{"up_proj", inter, h, &w.up_proj},
                                      std::tuple{"down_proj", h, inter, &w.down_proj}}) {
      auto lin = LoadLinear(ckpt, p + name + ".weight", out, in, block);
      if (lin.ok()) lin->Pack();
      if (!lin.ok()) return lin.status();
      *dst = *std::move(lin);
    }
    loaded.emplace_back(le_id, std::move(w));
    if (options_.progress) options_.progress(++done, std::ssize(todo));
  }
  std::unique_lock<std::shared_mutex> lock(mu_);
  for (auto& [le_id, w] : loaded) {
    const uint64_t bytes = BytesOf(w);
    if (experts_.try_emplace(le_id, std::move(w)).second) bytes_mapped_ += bytes;
  }
  return absl::OkStatus();
}

void LocalExperts::Release(std::span<const LayerExpert> experts) {
  std::vector<MlpWeights> dropped;  // freed after the lock is let go
  {
    std::unique_lock<std::shared_mutex> lock(mu_);
    for (const LayerExpert& le_id : experts) {
      auto it = experts_.find(le_id);
      if (it == experts_.end()) continue;
      bytes_mapped_ -= BytesOf(it->second);
      dropped.push_back(std::move(it->second));
      experts_.erase(it);
    }
  }
  if (dropped.empty()) return;
  dropped.clear();
#ifdef __GLIBC__
  // Packed tiles below the mmap threshold (which glibc raises as large blocks are freed) sit in
  // the heap: hand the freed pages back so the resident set shrinks.
  malloc_trim(0);
#endif
}

std::vector<LayerExpert> LocalExperts::Held() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  std::vector<LayerExpert> held;
  held.reserve(experts_.size());
  for (const auto& [le_id, w] : experts_) held.push_back(le_id);
  return held;
}

bool LocalExperts::Holds(int layer, int expert) const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  return experts_.contains(LayerExpert{layer, expert});
}

absl::Status LocalExperts::Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                               std::span<float> out) {
  if (x.dim != hidden_size_) {
    return absl::InvalidArgumentError(
        absl::StrFormat("experts: activations of dim %d, hidden_size is %d", x.dim, hidden_size_));
  }
  std::vector<float> xf(x.n_rows * x.dim);
  DequantizeActivations(x, xf);
  return RunRows(layer, xf, routes, options_.round_expert_outputs_bf16 ? Sink::kBf16 : Sink::kFloat,
                 out, {});
}

absl::Status LocalExperts::RunPerExpert(int layer, const QuantizedActivations& x,
                                        const ExpertRoutes& routes, std::span<uint16_t> pair_out) {
  if (x.dim != hidden_size_) {
    return absl::InvalidArgumentError(
        absl::StrFormat("experts: activations of dim %d, hidden_size is %d", x.dim, hidden_size_));
  }
  std::vector<float> xf(x.n_rows * x.dim);
  DequantizeActivations(x, xf);
  return RunRows(layer, xf, routes, Sink::kPairBf16, {}, pair_out);
}

absl::Status LocalExperts::RunUnquantized(int layer, std::span<const float> x,
                                          const ExpertRoutes& routes, std::span<float> out) {
  return RunRows(layer, x, routes, Sink::kFloat, out, {});
}

absl::Status LocalExperts::RunRows(int layer, std::span<const float> x, const ExpertRoutes& routes,
                                   Sink sink, std::span<float> out, std::span<uint16_t> pair_out) {
  const int64_t D = hidden_size_;
  const int64_t n_rows = routes.n_rows();
  const int64_t n_pairs = std::ssize(routes.experts);
  const bool per_pair = sink == Sink::kPairBf16;
  if (static_cast<int64_t>(x.size()) != n_rows * D ||
      (!per_pair && static_cast<int64_t>(out.size()) != n_rows * D) ||
      (per_pair && static_cast<int64_t>(pair_out.size()) != n_pairs * D) ||
      std::ssize(routes.weights) != n_pairs || routes.offsets.back() != n_pairs) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "experts: %d routed rows (%d pairs) but %d input and %d output values (hidden_size %d)",
        n_rows, n_pairs, x.size(), per_pair ? pair_out.size() : out.size(), D));
  }
  std::shared_lock<std::shared_mutex> lock(mu_);  // one expert set for the whole call
  for (int64_t p = 0; p < n_pairs; ++p) {
    if (!experts_.contains(LayerExpert{layer, routes.experts[p]})) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "experts: expert %d of layer %d is not held here", routes.experts[p], layer));
    }
  }
  // Rows grouped by expert, experts in ascending order: each row still adds its experts'
  // outputs in ascending expert order, and each row is computed alone (Linear::Forward).
  std::map<int32_t, std::vector<std::pair<int64_t, int32_t>>> by_expert;  // expert -> (row, pair)
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int32_t p = routes.offsets[r]; p < routes.offsets[r + 1]; ++p) {
      by_expert[routes.experts[p]].emplace_back(r, p);
    }
  }
  if (!per_pair) std::fill(out.begin(), out.end(), 0.0f);
  std::vector<float> xs, gate, up, y;
  std::vector<uint16_t> y_bf16(sink == Sink::kBf16 ? D : 0);
  for (const auto& [expert, rows] : by_expert) {
    const MlpWeights& w = experts_.at(LayerExpert{layer, expert});
    const int64_t m = std::ssize(rows);
    const int64_t inter = w.gate_proj.out_features;
    xs.resize(m * D);
    for (int64_t i = 0; i < m; ++i) {
      std::copy_n(x.data() + rows[i].first * D, D, xs.data() + i * D);
    }
    gate.resize(m * inter);
    up.resize(m * inter);
    y.resize(m * D);
    // gate_proj / up_proj take x as given: Run() hands over the FP8 values exactly.
    w.gate_proj.Forward(xs.data(), m, gate.data(), /*quantize_activations=*/false, options_.kernel);
    w.up_proj.Forward(xs.data(), m, up.data(), /*quantize_activations=*/false, options_.kernel);
    for (int64_t i = 0; i < m * inter; ++i) {
      gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];  // silu(gate) * up
    }
    if (options_.quantize_activations) FakeQuantizeActivations(gate, m, inter);
    w.down_proj.Forward(gate.data(), m, y.data(), /*quantize_activations=*/false, options_.kernel);
    for (int64_t i = 0; i < m; ++i) {
      const auto [r, p] = rows[i];
      const std::span<const float> yi(y.data() + i * D, D);
      switch (sink) {
        case Sink::kFloat: {
          const float weight = routes.weights[p];
          for (int64_t d = 0; d < D; ++d) out[r * D + d] += weight * yi[d];
          break;
        }
        case Sink::kBf16:
          FloatToBf16(yi, y_bf16);
          AddWeightedBf16(out.subspan(r * D, D), routes.weights[p], y_bf16.data(), D);
          break;
        case Sink::kPairBf16:
          FloatToBf16(yi, pair_out.subspan(p * D, D));
          break;
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace expertmesh
