// `expertmesh run`: loads a checkpoint into the reference engine (with a progress bar),
// generates from a prompt (token ids, or text through the checkpoint's tokenizer.json) and
// prints the tokens and the prefill and decode speeds. With a checkpoint that carries the
// multi-token-prediction module, decoding is speculative by default (--no-mtp: off; --draft-k
// drafts per step); the acceptance rate is printed beside the speed.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "core/decode/generate.h"
#include "core/decode/sampling.h"
#include "core/engine/engine.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/kernels/cpu/thread_pool.h"
#include "core/model/local_experts.h"
#include "core/model/model.h"
#include "core/text/tokenizer.h"
#include "spdlog/spdlog.h"
#include "tools/cli/commands.h"

namespace expertmesh {
namespace {

struct RunArgs {
  std::string model_dir;
  std::string prompt_ids;
  std::string prompt;
  int max_tokens = 32;
  float temperature = 0.0f;
  float top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
  bool no_act_quant = false;
  bool naive_attention = false;
  bool ignore_eos = false;
  bool mtp = true;
  int draft_k = 1;
  bool mtp_always = false;
};

// "\r<label> [#####     ]  45% (n/total)" on stderr; a newline when done.
void ProgressBar(const char* label, int64_t done, int64_t total) {
  constexpr int kWidth = 40;
  const int filled = total > 0 ? static_cast<int>(kWidth * done / total) : kWidth;
  std::fprintf(stderr, "\r%-8s [%s%s] %3d%% (%lld/%lld)", label, std::string(filled, '#').c_str(),
               std::string(kWidth - filled, ' ').c_str(),
               total > 0 ? static_cast<int>(100 * done / total) : 100, static_cast<long long>(done),
               static_cast<long long>(total));
  if (done >= total) std::fprintf(stderr, "\n");
}

int Run(const RunArgs& args) {
  using Clock = std::chrono::steady_clock;
  auto config = LoadModelConfig(args.model_dir + "/config.json");
  if (!config.ok()) {
    spdlog::error("{}", config.status().ToString());
    return 1;
  }
  auto ckpt = Checkpoint::Open(args.model_dir);
  if (!ckpt.ok()) {
    spdlog::error("{}", ckpt.status().ToString());
    return 1;
  }
  const auto t_load = Clock::now();
  ModelLoadOptions load;
  load.load_mtp = args.mtp;
  load.progress = [](int64_t d, int64_t t) { ProgressBar("model", d, t); };
  auto model = Model::Create(**ckpt, *config, load);
  if (!model.ok()) {
    spdlog::error("{}", model.status().ToString());
    return 1;
  }
  std::vector<LayerExpert> all;
  for (const LayerExpert& e : AllExperts(*config)) {
    if (args.mtp || e.layer < config->num_hidden_layers) all.push_back(e);
  }
  LocalExperts::Options expert_options;
  expert_options.quantize_activations = !args.no_act_quant;
  expert_options.progress = [](int64_t d, int64_t t) { ProgressBar("experts", d, t); };
  auto experts = LocalExperts::Create(**ckpt, *config, all, expert_options);
  if (!experts.ok()) {
    spdlog::error("{}", experts.status().ToString());
    return 1;
  }
  spdlog::info("loaded {} in {:.2f} s: {:.1f} MiB mapped", args.model_dir,
               std::chrono::duration<double>(Clock::now() - t_load).count(),
               (*ckpt)->bytes_mapped() / 1048576.0);

  // The prompt: ids, or text through the checkpoint's tokenizer.
  std::unique_ptr<Tokenizer> tokenizer;
  const std::string tokenizer_path = args.model_dir + "/tokenizer.json";
  if (std::filesystem::exists(tokenizer_path)) {
    auto tok = Tokenizer::Load(tokenizer_path);
    if (!tok.ok()) {
      spdlog::error("{}", tok.status().ToString());
      return 1;
    }
    tokenizer = *std::move(tok);
  }
  std::vector<int32_t> prompt;
  if (!args.prompt.empty()) {
    if (tokenizer == nullptr) {
      spdlog::error("--prompt needs {}; give --prompt-ids instead", tokenizer_path);
      return 1;
    }
    auto ids = tokenizer->Encode(args.prompt, /*add_bos=*/true);
    if (!ids.ok()) {
      spdlog::error("{}", ids.status().ToString());
      return 1;
    }
    prompt = *ids;
  } else {
    for (const std::string& piece :
         std::vector<std::string>(absl::StrSplit(args.prompt_ids, ',', absl::SkipWhitespace()))) {
      int32_t id;
      if (!absl::SimpleAtoi(piece, &id)) {
        spdlog::error("--prompt-ids: '{}' is not a token id", piece);
        return 1;
      }
      prompt.push_back(id);
    }
  }
  if (prompt.empty()) {
    spdlog::error("give --prompt-ids 1,2,3 or --prompt TEXT");
    return 1;
  }

  EngineOptions options;
  options.quantize_activations = !args.no_act_quant;
  options.attention = args.naive_attention ? AttentionForm::kNaive : AttentionForm::kAbsorbed;
  auto engine = Engine::Create(**model, experts->get(), options);
  if (!engine.ok()) {
    spdlog::error("{}", engine.status().ToString());
    return 1;
  }
  BatchRequest request;
  request.prompt = prompt;
  request.max_tokens = args.max_tokens;
  request.ignore_eos = args.ignore_eos;
  request.sampling.temperature = args.temperature;
  request.sampling.top_p = args.top_p;
  request.sampling.top_k = args.top_k;
  request.sampling.seed = args.seed;
  if (absl::StatusOr<Sampler> s = Sampler::Create(request.sampling); !s.ok()) {
    spdlog::error("{}", s.status().ToString());
    return 1;
  }
  BatchGeneratorOptions gen_options;
  gen_options.mtp = args.mtp;
  gen_options.draft_k = args.draft_k;
  gen_options.policy.adaptive = !args.mtp_always;
  auto generator = BatchGenerator::Create(engine->get(), gen_options);
  if (!generator.ok()) {
    spdlog::error("{}", generator.status().ToString());
    return 1;
  }
  if (args.mtp && !(*generator)->mtp()) {
    spdlog::info("{} has no MTP module: decoding without drafts", args.model_dir);
  }

  std::unique_ptr<Tokenizer::StreamDecoder> text;
  if (tokenizer != nullptr)
    text = std::make_unique<Tokenizer::StreamDecoder>(tokenizer.get(), false);
  std::vector<int32_t> generated;
  BatchStats stats;
  auto result = (*generator)
                    ->Generate(std::span<const BatchRequest>(&request, 1), &stats,
                               [&](size_t, std::span<const SampledToken> tokens) {
                                 for (const SampledToken& tok : tokens) {
                                   generated.push_back(tok.token);
                                   std::printf("%d%s", tok.token, text ? "" : " ");
                                   if (text) std::printf(" (%s) ", text->Push(tok.token).c_str());
                                 }
                                 std::fflush(stdout);
                               });
  if (!result.ok()) {
    spdlog::error("{}", result.status().ToString());
    return 1;
  }
  std::printf("\n");
  if (tokenizer != nullptr) {
    std::printf("text: %s\n", tokenizer->Decode(generated, true).c_str());
  }
  std::printf("prefill: %zu tokens in %.3f s (%.1f tokens/s)\n", prompt.size(),
              stats.prefill_seconds, prompt.size() / stats.prefill_seconds);
  std::printf("decode: %lld tokens in %.3f s (%.1f tokens/s), %lld forward steps\n",
              static_cast<long long>(stats.decode_tokens), stats.decode_seconds,
              stats.decode_seconds > 0 ? stats.decode_tokens / stats.decode_seconds : 0.0,
              static_cast<long long>(stats.decode_steps));
  if ((*generator)->mtp()) {
    std::printf("mtp: %lld drafts in %lld steps, %lld accepted (%.1f%%)\n",
                static_cast<long long>(stats.drafted), static_cast<long long>(stats.draft_steps),
                static_cast<long long>(stats.accepted),
                stats.drafted > 0 ? 100.0 * stats.accepted / stats.drafted : 0.0);
  }
  return 0;
}

}  // namespace

void AddRunCommand(CLI::App& app) {
  auto args = std::make_shared<RunArgs>();
  CLI::App* cmd =
      app.add_subcommand("run", "Generate from a prompt with the reference engine (CPU)");
  cmd->add_option("--model", args->model_dir, "checkpoint directory (config.json, safetensors)")
      ->required()
      ->check(CLI::ExistingDirectory);
  auto* ids = cmd->add_option("--prompt-ids", args->prompt_ids, "prompt token ids: 1,2,3");
  cmd->add_option("--prompt", args->prompt, "prompt text (needs MODEL/tokenizer.json)")
      ->excludes(ids);
  cmd->add_option("--max-tokens", args->max_tokens, "tokens to generate")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--temperature", args->temperature, "0: greedy")->capture_default_str();
  cmd->add_option("--top-p", args->top_p, "nucleus sampling mass")->capture_default_str();
  cmd->add_option("--top-k", args->top_k, "0: off")->capture_default_str();
  cmd->add_option("--seed", args->seed, "sampling seed")->capture_default_str();
  cmd->add_flag("--no-act-quant", args->no_act_quant,
                "plain float activations into FP8 weights (default: per-token-per-128 FP8)");
  cmd->add_flag("--naive-attention", args->naive_attention,
                "expand kv_b_proj per cached token instead of the absorbed form");
  cmd->add_flag("--ignore-eos", args->ignore_eos, "keep generating after eos_token_id");
  cmd->add_flag("--mtp,!--no-mtp", args->mtp,
                "speculative decoding with the checkpoint's MTP module (when it has one)")
      ->capture_default_str();
  cmd->add_option("--draft-k", args->draft_k, "MTP drafts per step")
      ->capture_default_str()
      ->check(CLI::Range(1, kMaxDraftTokens));
  cmd->add_flag("--mtp-always", args->mtp_always,
                "draft every step (default: adaptive, drafting only when it pays)");
  cmd->add_option_function<int>(
         "--threads", [](int n) { expertmesh::cpu::SetKernelThreads(n); },
         "CPU kernel threads, 0 = every CPU this process may use (affinity and cgroup cpu.max)")
      ->check(CLI::Range(0, 1024));
  cmd->callback([args]() {
    const int rc = Run(*args);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace expertmesh
