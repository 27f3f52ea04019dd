#include "tests/cluster/cluster_test_util.h"

#include <stdlib.h>

#include <chrono>
#include <memory>

#include "core/config.h"
#include "core/engine.h"
#include "core/local_experts.h"
#include "core/model.h"
#include "core/safetensors.h"
#include "core/sampling.h"
#include "tools/make-checkpoint/random_checkpoint.h"

namespace expertmesh::testing {
namespace {

constexpr char kConfig[] = R"({
  "architectures": ["DeepseekV3ForCausalLM"],
  "model_type": "deepseek_v3",
  "vocab_size": 320,
  "hidden_size": 256,
  "intermediate_size": 192,
  "moe_intermediate_size": 64,
  "num_hidden_layers": 4,
  "num_nextn_predict_layers": 0,
  "num_attention_heads": 4,
  "num_key_value_heads": 4,
  "n_shared_experts": 1,
  "n_routed_experts": 8,
  "routed_scaling_factor": 2.5,
  "kv_lora_rank": 96,
  "q_lora_rank": 128,
  "qk_rope_head_dim": 16,
  "v_head_dim": 32,
  "qk_nope_head_dim": 32,
  "topk_method": "noaux_tc",
  "n_group": 2,
  "topk_group": 1,
  "num_experts_per_tok": 2,
  "moe_layer_freq": 1,
  "first_k_dense_replace": 1,
  "norm_topk_prob": true,
  "scoring_func": "sigmoid",
  "hidden_act": "silu",
  "max_position_embeddings": 256,
  "initializer_range": 0.02,
  "rms_norm_eps": 1e-06,
  "use_cache": true,
  "rope_theta": 10000,
  "rope_scaling": null,
  "attention_bias": false,
  "attention_dropout": 0.0,
  "tie_word_embeddings": false,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "torch_dtype": "bfloat16",
  "quantization_config": {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128]
  }
}
)";

}  // namespace

absl::StatusOr<std::string> MakeClusterTestModel() {
  char tmpl[] = "/tmp/expertmesh-cluster-model-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
  absl::StatusOr<ModelConfig> config = ParseModelConfig(kConfig);
  if (!config.ok()) return config.status();
  if (absl::Status s = WriteRandomCheckpoint(*config, kConfig, tmpl, /*seed=*/20261128, 2);
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
    const std::string& model_dir, const std::vector<std::vector<int32_t>>& prompts,
    int max_tokens) {
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
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(**model, experts->get());
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
