#include "core/model/local_experts.h"

#include <algorithm>
#include <cmath>

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
  const int64_t layers = config.num_hidden_layers + config.num_nextn_predict_layers;
  std::unique_ptr<LocalExperts> le(new LocalExperts(config.hidden_size, std::move(options)));
  const BlockShape block = WeightBlockShape(config);
  const int64_t h = config.hidden_size;
  const int64_t inter = config.moe_intermediate_size;
  int64_t done = 0;
  for (const LayerExpert& le_id : experts) {
    if (le_id.layer < 0 || le_id.layer >= layers || !config.IsMoeLayer(le_id.layer) ||
        le_id.expert < 0 || le_id.expert >= config.n_routed_experts) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "no routed expert %d in layer %d of this config", le_id.expert, le_id.layer));
    }
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
      le->bytes_mapped_ += dst->weight.size + dst->scale_inv.size;
    }
    le->experts_[le_id] = std::move(w);
    if (le->options_.progress) le->options_.progress(++done, std::ssize(experts));
  }
  return le;
}

bool LocalExperts::Holds(int layer, int expert) const {
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
  for (int64_t p = 0; p < n_pairs; ++p) {
    if (!Holds(layer, routes.experts[p])) {
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
