#include "tests/cluster/cluster_test_util.h"

#include <stdlib.h>

#include <chrono>
#include <memory>

#include "core/decode/sampling.h"
#include "core/engine/engine.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/model/local_experts.h"
#include "core/model/model.h"
#include "core/numerics/numerics.h"
#include "tests/common/tiny_config.h"
#include "tools/make-checkpoint/random_checkpoint.h"

namespace expertmesh::testing {
namespace {

// LocalExperts seen through the partial-sum data plane of the even placement over num_shards
// groups: per shard group (in shard-id order) the rows that route to it, with only its
// pairs, computed by the same LocalExperts, rounded to BF16 (the wire's result format) and
// added into out. The even placement is restated here from its definition (expert e of E
// lives in shard floor(e * N / E)), independently of the router library.
class WireNumericsExperts final : public RoutedExperts {
 public:
  WireNumericsExperts(LocalExperts* experts, int32_t num_shards, int64_t n_routed_experts,
                      int64_t hidden_size)
      : experts_(experts),
        num_shards_(num_shards),
        n_routed_experts_(n_routed_experts),
        hidden_size_(hidden_size) {}
  absl::Status Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                   std::span<float> out) override {
    const int64_t H = hidden_size_;
    std::fill(out.begin(), out.end(), 0.0f);
    std::vector<float> part(out.size());
    for (int32_t shard = 0; shard < num_shards_; ++shard) {
      ExpertRoutes sub;
      std::vector<bool> has(static_cast<size_t>(routes.n_rows()), false);
      for (int64_t r = 0; r < routes.n_rows(); ++r) {
        std::vector<int32_t> e;
        std::vector<float> w;
        for (int32_t k = routes.offsets[r]; k < routes.offsets[r + 1]; ++k) {
          if (routes.experts[k] * num_shards_ / n_routed_experts_ == shard) {
            e.push_back(routes.experts[k]);
            w.push_back(routes.weights[k]);
          }
        }
        has[static_cast<size_t>(r)] = !e.empty();
        sub.AddRow(e, w);
      }
      if (absl::Status s = experts_->Run(layer, x, sub, part); !s.ok()) return s;
      for (int64_t r = 0; r < routes.n_rows(); ++r) {
        if (!has[static_cast<size_t>(r)]) continue;
        for (int64_t c = 0; c < H; ++c) {
          out[r * H + c] += Bf16ToFloat(FloatToBf16(part[r * H + c]));
        }
      }
    }
    return absl::OkStatus();
  }

 private:
  LocalExperts* experts_;
  int32_t num_shards_;
  int64_t n_routed_experts_;
  int64_t hidden_size_;
};

}  // namespace

absl::StatusOr<std::string> MakeClusterTestModel(double gate_skew) {
  char tmpl[] = "/tmp/expertmesh-cluster-model-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
  const std::string config_json = TinyConfigJson({});
  absl::StatusOr<ModelConfig> config = ParseModelConfig(config_json);
  if (!config.ok()) return config.status();
  if (absl::Status s =
          WriteRandomCheckpoint(*config, config_json, tmpl, /*seed=*/20261128, 2, gate_skew);
      !s.ok()) {
    return s;
  }
  return std::string(tmpl);
}

std::vector<std::vector<int32_t>> MakePrompts(int n, int max_len, int vocab, uint64_t seed) {
  Rng rng(seed);
  std::vector<std::vector<int32_t>> prompts(n);
  for (int i = 0; i < n; ++i) {
    // Lengths cycle through short and long (longer than a prefill chunk) prompts.
    const int len = 2 + static_cast<int>((static_cast<int64_t>(i) * 7919 + 3) % (max_len - 1));
    for (int j = 0; j < len; ++j) {
      prompts[i].push_back(2 + static_cast<int32_t>(rng.Next() % static_cast<uint64_t>(vocab - 2)));
    }
  }
  return prompts;
}

absl::StatusOr<std::vector<std::vector<int32_t>>> ReferenceGreedy(
    const std::string& model_dir, const std::vector<std::vector<int32_t>>& prompts, int max_tokens,
    int partial_shards) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(model_dir + "/config.json");
  if (!config.ok()) return config.status();
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(model_dir);
  if (!ckpt.ok()) return ckpt.status();
  ModelLoadOptions load;
  load.load_mtp = false;
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Create(**ckpt, *config, load);
  if (!model.ok()) return model.status();
  absl::StatusOr<std::unique_ptr<LocalExperts>> experts =
      LocalExperts::Create(**ckpt, *config, AllExperts(*config));
  if (!experts.ok()) return experts.status();
  RoutedExperts* routed = experts->get();
  std::unique_ptr<WireNumericsExperts> wire;
  if (partial_shards > 0) {
    wire = std::make_unique<WireNumericsExperts>(experts->get(), partial_shards,
                                                 config->n_routed_experts, config->hidden_size);
    routed = wire.get();
  }
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(**model, routed);
  if (!engine.ok()) return engine.status();

  std::vector<std::vector<int32_t>> out;
  for (const std::vector<int32_t>& prompt : prompts) {
    std::unique_ptr<ContiguousKvCache> cache = (*engine)->NewCache();
    std::vector<int32_t> generated;
    std::vector<int32_t> next = prompt;
    while (static_cast<int>(generated.size()) < max_tokens) {
      SequenceInput in;
      in.tokens = next;
      in.cache = cache.get();
      absl::StatusOr<std::vector<SequenceOutput>> o =
          (*engine)->Forward(std::span<const SequenceInput>(&in, 1));
      if (!o.ok()) return o.status();
      const int32_t t = Argmax((*o)[0].logits);
      generated.push_back(t);
      next = {t};
    }
    out.push_back(std::move(generated));
  }
  return out;
}

v1::SubmitRequest GreedyRequest(const std::string& id, const std::vector<int32_t>& prompt,
                                int max_tokens) {
  v1::SubmitRequest r;
  r.set_request_id(id);
  for (int32_t t : prompt) r.add_prompt_token_ids(t);
  r.set_max_tokens(static_cast<uint32_t>(max_tokens));
  r.set_ignore_eos(true);
  r.mutable_sampling()->set_temperature(0.0f);
  r.mutable_sampling()->set_has_seed(true);
  return r;
}

SubmitResult SubmitAndCollect(v1::AttentionService::Stub& stub, const v1::SubmitRequest& request,
                              int timeout_ms) {
  SubmitResult result;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  std::unique_ptr<grpc::ClientReader<v1::TokenEvent>> reader = stub.Submit(&ctx, request);
  v1::TokenEvent e;
  while (reader->Read(&e)) {
    result.tokens.insert(result.tokens.end(), e.token_ids().begin(), e.token_ids().end());
    if (e.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      result.finish = e.finish_reason();
      result.completion_tokens = e.completion_tokens();
    }
  }
  result.status = reader->Finish();
  return result;
}

}  // namespace expertmesh::testing
