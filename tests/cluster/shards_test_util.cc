#include "tests/cluster/shards_test_util.h"

#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <mutex>
#include <numeric>

#include "core/decode/sampling.h"
#include "core/numerics/numerics.h"
#include "tests/common/tiny_config.h"
#include "tools/make-checkpoint/random_checkpoint.h"

namespace expertmesh::testing {
namespace {

double Normal(Rng& rng) {  // Box-Muller
  const double u1 = std::max(rng.Uniform(), 1e-300);
  const double u2 = rng.Uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace

absl::StatusOr<std::string> ShardTestModel() {
  // One model per test process, removed when the process exits.
  struct TempDir {
    std::string path;
    ~TempDir() {
      std::error_code ec;
      if (!path.empty()) std::filesystem::remove_all(path, ec);
    }
  };
  static std::mutex mu;
  static TempDir temp;
  std::string& dir = temp.path;
  std::lock_guard<std::mutex> lock(mu);
  if (!dir.empty()) return dir;
  char tmpl[] = "/tmp/expertmesh-shards-model-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
  const std::string config_json = TinyConfigJson({.vocab_size = 64,
                                                  .hidden_size = 320,
                                                  .moe_intermediate_size = 96,
                                                  .num_hidden_layers = 3,
                                                  .num_attention_heads = 2,
                                                  .kv_lora_rank = 64,
                                                  .q_lora_rank = 96,
                                                  .topk_group = 2,
                                                  .num_experts_per_tok = 4,
                                                  .max_position_embeddings = 128});
  absl::StatusOr<ModelConfig> config = ParseModelConfig(config_json);
  if (!config.ok()) return config.status();
  if (absl::Status s = WriteRandomCheckpoint(*config, config_json, tmpl, /*seed=*/4242, 3);
      !s.ok()) {
    return s;
  }
  dir = tmpl;
  return dir;
}

Batch RandomBatch(const ModelConfig& config, int64_t n_rows, uint64_t seed) {
  Rng rng(seed);
  const int64_t H = config.hidden_size;
  std::vector<float> x(n_rows * H);
  for (float& v : x) v = static_cast<float>(Normal(rng));
  Batch b;
  b.x = QuantizeActivations(x, n_rows, H);
  const int k = static_cast<int>(config.num_experts_per_tok);
  std::vector<int32_t> ids(config.n_routed_experts);
  for (int64_t r = 0; r < n_rows; ++r) {
    std::iota(ids.begin(), ids.end(), 0);
    for (int i = 0; i < k; ++i) {  // partial Fisher-Yates: k distinct experts
      const int j = i + static_cast<int>(rng.Next() % (ids.size() - i));
      std::swap(ids[i], ids[j]);
    }
    std::vector<int32_t> e(ids.begin(), ids.begin() + k);
    std::sort(e.begin(), e.end());
    std::vector<float> w(k);
    float sum = 0;
    for (float& v : w) sum += (v = 0.05f + static_cast<float>(rng.Uniform()));
    for (float& v : w) v = v / sum * static_cast<float>(config.routed_scaling_factor);
    b.routes.AddRow(e, w);
  }
  return b;
}

absl::StatusOr<std::vector<float>> ExpectedShardedOutput(LocalExperts& all,
                                                         const Placement& placement, int layer,
                                                         const Batch& batch, int64_t hidden_size,
                                                         CombineMode combine) {
  const int64_t R = batch.x.n_rows;
  std::vector<float> out(R * hidden_size, 0.0f);
  if (combine == CombineMode::kExact) {
    if (absl::Status st = all.Run(layer, batch.x, batch.routes, out); !st.ok()) return st;
    return out;
  }
  for (int32_t s = 0; s < placement.num_shards; ++s) {
    ExpertRoutes sub;  // every row, only shard s's pairs
    for (int64_t r = 0; r < R; ++r) {
      std::vector<int32_t> e;
      std::vector<float> w;
      for (int32_t p = batch.routes.offsets[r]; p < batch.routes.offsets[r + 1]; ++p) {
        if (placement.ShardOf(layer, batch.routes.experts[p]) == s) {
          e.push_back(batch.routes.experts[p]);
          w.push_back(batch.routes.weights[p]);
        }
      }
      sub.AddRow(e, w);
    }
    std::vector<float> part(R * hidden_size);
    if (absl::Status st = all.Run(layer, batch.x, sub, part); !st.ok()) return st;
    for (int64_t r = 0; r < R; ++r) {
      if (sub.offsets[r] == sub.offsets[r + 1]) continue;  // not sent to this shard
      for (int64_t c = 0; c < hidden_size; ++c) {
        out[r * hidden_size + c] += Bf16ToFloat(FloatToBf16(part[r * hidden_size + c]));
      }
    }
  }
  return out;
}

}  // namespace expertmesh::testing
