// `expertmesh eval --model DIR --text FILE`: how good a checkpoint is, measured with the
// reference engine (core/engine/engine.h) and the C++ tokenizer:
//   * perplexity of the main model on the text,
//   * the multi-token-prediction module: top-1 accuracy of its next-next-token prediction on
//     the text, and its acceptance rate under greedy decoding (the fraction of steps where the
//     MTP head's argmax equals the main model's greedy token at the following step: what a
//     depth-1 speculative decoder with greedy verification accepts),
//   * routed-expert load per MoE layer over the text (max/mean tokens per expert).
// The text is read as tools/train/train.py reads the corpus: documents separated by an empty
// line, each tokenized as [bos] document [eos] and concatenated; the stream is scored in
// independent windows of --context tokens (each from an empty KV cache).
// tools/train/eval_reference.py computes the same figures with PyTorch, as a cross-check.
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"
#include "core/base/file.h"
#include "core/base/status.h"
#include "core/decode/sampling.h"
#include "core/engine/engine.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/model/experts.h"
#include "core/model/local_experts.h"
#include "core/model/model.h"
#include "core/text/tokenizer.h"
#include "spdlog/spdlog.h"
#include "tools/cli/commands.h"

namespace expertmesh {
namespace {

struct EvalArgs {
  std::string model_dir;
  std::string text_path;
  int context = 256;       // tokens per scored window
  int64_t max_tokens = 0;  // stop after this many tokens of the stream (0: all)
  int prompts = 16;        // greedy-acceptance prompts (the first documents)
  int prompt_tokens = 16;  // tokens of each document used as its prompt
  int gen_tokens = 48;     // greedy tokens generated per prompt
  bool no_act_quant = false;
};

// Counts the (token, expert) pairs every MoE layer routes, then runs the real experts.
class CountingExperts : public RoutedExperts {
 public:
  CountingExperts(RoutedExperts* inner, int n_layers, int n_experts)
      : inner_(inner), counts_(n_layers, std::vector<int64_t>(n_experts, 0)) {}

  absl::Status Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                   std::span<float> out) override {
    Count(layer, routes);
    return inner_->Run(layer, x, routes, out);
  }
  absl::Status RunUnquantized(int layer, std::span<const float> x, const ExpertRoutes& routes,
                              std::span<float> out) override {
    Count(layer, routes);
    return inner_->RunUnquantized(layer, x, routes, out);
  }

  bool counting = true;
  // counts[layer][expert]: pairs routed while `counting` was on.
  const std::vector<std::vector<int64_t>>& counts() const { return counts_; }

 private:
  void Count(int layer, const ExpertRoutes& routes) {
    if (!counting || layer < 0 || layer >= std::ssize(counts_)) return;
    for (int32_t e : routes.experts) {
      if (e >= 0 && e < std::ssize(counts_[layer])) ++counts_[layer][e];
    }
  }

  RoutedExperts* inner_;
  std::vector<std::vector<int64_t>> counts_;
};

// [bos] doc [eos] for every document (separated by an empty line) of the text.
absl::StatusOr<std::vector<int32_t>> TokenizeDocuments(const Tokenizer& tok,
                                                       const std::string& text, int32_t bos,
                                                       int32_t eos, int64_t max_tokens,
                                                       std::vector<int64_t>* doc_starts) {
  std::vector<int32_t> stream;
  const std::string_view all(text);
  for (size_t pos = 0; pos <= all.size();) {
    const size_t sep = std::min(all.find("\n\n", pos), all.size());
    const std::string_view doc = all.substr(pos, sep - pos);
    pos = sep + 2;
    if (std::all_of(doc.begin(), doc.end(), [](char c) { return std::isspace(uint8_t(c)); })) {
      continue;  // (Python's str.strip() also strips Unicode spaces; the corpus has none alone)
    }
    EM_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok.Encode(doc, /*add_bos=*/false));
    doc_starts->push_back(std::ssize(stream));
    stream.push_back(bos);
    stream.insert(stream.end(), ids.begin(), ids.end());
    stream.push_back(eos);
    if (max_tokens > 0 && std::ssize(stream) >= max_tokens) break;
  }
  if (max_tokens > 0 && std::ssize(stream) > max_tokens) stream.resize(max_tokens);
  return stream;
}

struct TextScores {
  double nll_sum = 0;       // natural log
  int64_t predicted = 0;    // tokens scored by the main model
  int64_t mtp_correct = 0;  // MTP argmax == the real token two ahead
  int64_t mtp_predicted = 0;
  int windows = 0;
};

absl::StatusOr<TextScores> ScoreText(Engine& engine, std::span<const int32_t> stream, int context,
                                     bool has_mtp) {
  TextScores s;
  const int64_t V = engine.model().config().vocab_size;
  for (int64_t start = 0; start + 1 < std::ssize(stream); start += context) {
    const int64_t n = std::min<int64_t>(context, std::ssize(stream) - start);
    std::span<const int32_t> w = stream.subspan(start, n);  // w: [n]
    auto cache = engine.NewCache();
    SequenceInput in{w, cache.get(), /*all_logits=*/true};
    EM_ASSIGN_OR_RETURN(std::vector<SequenceOutput> out,
                        engine.Forward(std::span<const SequenceInput>(&in, 1)));
    const SequenceOutput& o = out[0];  // logits: [n, V]; hidden: [n, hidden_size]
    for (int64_t i = 0; i + 1 < n; ++i) {
      std::vector<float> lp = LogSoftmax(std::span<const float>(o.logits).subspan(i * V, V));
      s.nll_sum -= lp[w[i + 1]];
      ++s.predicted;
    }
    if (has_mtp && n >= 3) {
      // MTP row i reads (w[i+1], h[i]) and predicts w[i+2]; rows 0..n-2 exist, n-2 are scored.
      auto mtp_cache = engine.NewMtpCache();
      const int64_t D = engine.model().config().hidden_size;
      MtpInput mi{w.subspan(1, n - 1), std::span<const float>(o.hidden).first((n - 1) * D),
                  mtp_cache.get(), /*all_logits=*/true};
      EM_ASSIGN_OR_RETURN(std::vector<SequenceOutput> mo,
                          engine.ForwardMtp(std::span<const MtpInput>(&mi, 1)));
      for (int64_t i = 0; i + 2 < n; ++i) {
        const int32_t draft = Argmax(std::span<const float>(mo[0].logits).subspan(i * V, V));
        s.mtp_correct += draft == w[i + 2];
        ++s.mtp_predicted;
      }
    }
    ++s.windows;
    if (s.windows % 16 == 0) {
      spdlog::info("scored {} windows, {} tokens, running perplexity {:.3f}", s.windows,
                   s.predicted, std::exp(s.nll_sum / s.predicted));
    }
  }
  return s;
}

struct Acceptance {
  int64_t drafted = 0;
  int64_t accepted = 0;
};

// Greedy decoding from `prompt`; at every step the MTP module drafts the token after the
// main model's next one, and the draft is compared with what the main model then emits.
absl::Status GreedyAcceptance(Engine& engine, std::span<const int32_t> prompt, int gen_tokens,
                              int32_t eos, Acceptance* acc) {
  const int64_t D = engine.model().config().hidden_size;
  auto cache = engine.NewCache();
  auto mtp_cache = engine.NewMtpCache();
  SequenceInput in{prompt, cache.get(), false};
  absl::StatusOr<std::vector<SequenceOutput>> out =
      engine.Forward(std::span<const SequenceInput>(&in, 1));
  if (!out.ok()) return out.status();
  int32_t next = Argmax((*out)[0].logits);  // t[P]
  // MTP over the prompt: rows (t[i+1], h[i]) for i < P; the last row drafts t[P+1].
  std::vector<int32_t> mtp_tokens(prompt.begin() + 1, prompt.end());
  mtp_tokens.push_back(next);
  std::vector<float> hidden = std::move((*out)[0].hidden);
  for (int step = 0; step < gen_tokens && next != eos; ++step) {
    MtpInput mi{mtp_tokens, hidden, mtp_cache.get(), false};
    EM_ASSIGN_OR_RETURN(std::vector<SequenceOutput> mo,
                        engine.ForwardMtp(std::span<const MtpInput>(&mi, 1)));
    const int32_t draft = Argmax(mo[0].logits);
    const int32_t token = next;
    SequenceInput step_in{std::span<const int32_t>(&token, 1), cache.get(), false};
    out = engine.Forward(std::span<const SequenceInput>(&step_in, 1));
    if (!out.ok()) return out.status();
    next = Argmax((*out)[0].logits);
    ++acc->drafted;
    acc->accepted += draft == next;
    mtp_tokens.assign(1, next);
    hidden.assign((*out)[0].hidden.begin(), (*out)[0].hidden.begin() + D);
  }
  return absl::OkStatus();
}

int RunEval(const EvalArgs& args) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  auto config = LoadModelConfig(args.model_dir + "/config.json");
  if (!config.ok()) {
    spdlog::error("{}", config.status().ToString());
    return 1;
  }
  if (!config->bos_token_id || !config->eos_token_id) {
    spdlog::error("{}/config.json: bos_token_id and eos_token_id are needed", args.model_dir);
    return 1;
  }
  auto ckpt = Checkpoint::Open(args.model_dir);
  if (!ckpt.ok()) {
    spdlog::error("{}", ckpt.status().ToString());
    return 1;
  }
  auto model = Model::Create(**ckpt, *config);
  if (!model.ok()) {
    spdlog::error("{}", model.status().ToString());
    return 1;
  }
  const bool act_quant = !args.no_act_quant;
  auto experts = LocalExperts::Create(**ckpt, *config, AllExperts(*config),
                                      LocalExperts::Options{act_quant, nullptr});
  if (!experts.ok()) {
    spdlog::error("{}", experts.status().ToString());
    return 1;
  }
  const int n_layers =
      static_cast<int>(config->num_hidden_layers + config->num_nextn_predict_layers);
  CountingExperts counting(experts->get(), n_layers, static_cast<int>(config->n_routed_experts));
  auto engine =
      Engine::Create(**model, &counting, EngineOptions{.quantize_activations = act_quant});
  if (!engine.ok()) {
    spdlog::error("{}", engine.status().ToString());
    return 1;
  }
  auto tok = Tokenizer::Load(args.model_dir + "/tokenizer.json");
  if (!tok.ok()) {
    spdlog::error("{}", tok.status().ToString());
    return 1;
  }
  auto text = base::ReadFile(args.text_path);
  if (!text.ok()) {
    spdlog::error("{}", text.status().ToString());
    return 1;
  }
  const auto bos = static_cast<int32_t>(*config->bos_token_id);
  const auto eos = static_cast<int32_t>(*config->eos_token_id);
  std::vector<int64_t> doc_starts;
  auto stream = TokenizeDocuments(**tok, *text, bos, eos, args.max_tokens, &doc_starts);
  if (!stream.ok()) {
    spdlog::error("{}", stream.status().ToString());
    return 1;
  }
  const bool fp8 = config->quantization_config.present;
  const bool has_mtp = !(*model)->mtp().empty();
  std::printf("model: %s (%s weights, activation quantization %s)\n", args.model_dir.c_str(),
              fp8 ? "FP8 block" : "BF16", act_quant ? "on" : "off");
  std::printf("text: %s, %zu documents, %zu tokens, windows of %d\n", args.text_path.c_str(),
              doc_starts.size(), stream->size(), args.context);
  std::fflush(stdout);

  const auto t1 = Clock::now();
  auto scores = ScoreText(**engine, *stream, args.context, has_mtp);
  if (!scores.ok()) {
    spdlog::error("{}", scores.status().ToString());
    return 1;
  }
  const double score_s = std::chrono::duration<double>(Clock::now() - t1).count();
  const double nll = scores->nll_sum / static_cast<double>(scores->predicted);
  std::printf(
      "perplexity: %.4f (mean NLL %.4f nats/token over %lld tokens, %d windows, %.0f "
      "tokens/s)\n",
      std::exp(nll), nll, static_cast<long long>(scores->predicted), scores->windows,
      scores->predicted / score_s);
  if (has_mtp) {
    std::printf(
        "mtp next-next-token top-1 on the text: %.4f (%lld / %lld)\n",
        static_cast<double>(scores->mtp_correct) / std::max<int64_t>(1, scores->mtp_predicted),
        static_cast<long long>(scores->mtp_correct), static_cast<long long>(scores->mtp_predicted));
  }

  std::printf("routed-expert load over the text (tokens per expert; max/mean 1.00 = balanced):\n");
  for (int layer = 0; layer < n_layers; ++layer) {
    if (!config->IsMoeLayer(layer) && layer < config->num_hidden_layers) continue;
    const std::vector<int64_t>& c = counting.counts()[layer];
    int64_t total = 0, mx = 0, mn = INT64_MAX;
    for (int64_t v : c) {
      total += v;
      mx = std::max(mx, v);
      mn = std::min(mn, v);
    }
    if (total == 0) continue;
    const double mean = static_cast<double>(total) / std::ssize(c);
    std::printf("  layer %d%s: max/mean %.3f, min/mean %.3f, max %lld, mean %.1f\n", layer,
                layer >= config->num_hidden_layers ? " (MTP)" : "", mx / mean, mn / mean,
                static_cast<long long>(mx), mean);
  }
  counting.counting = false;

  if (has_mtp && args.prompts > 0) {
    Acceptance acc;
    int used = 0;
    for (size_t d = 0; d < doc_starts.size() && used < args.prompts; ++d) {
      const int64_t end = d + 1 < doc_starts.size() ? doc_starts[d + 1] : std::ssize(*stream);
      if (end - doc_starts[d] < args.prompt_tokens) continue;
      std::span<const int32_t> prompt =
          std::span<const int32_t>(*stream).subspan(doc_starts[d], args.prompt_tokens);
      if (absl::Status s = GreedyAcceptance(**engine, prompt, args.gen_tokens, eos, &acc);
          !s.ok()) {
        spdlog::error("{}", s.ToString());
        return 1;
      }
      ++used;
    }
    std::printf(
        "mtp acceptance under greedy decoding: %.4f (%lld / %lld drafts; %d prompts of "
        "%d tokens, up to %d tokens each)\n",
        static_cast<double>(acc.accepted) / std::max<int64_t>(1, acc.drafted),
        static_cast<long long>(acc.accepted), static_cast<long long>(acc.drafted), used,
        args.prompt_tokens, args.gen_tokens);
  }
  std::printf("time: %.1f s\n", std::chrono::duration<double>(Clock::now() - t0).count());
  return 0;
}

}  // namespace

void AddEvalCommand(CLI::App& app) {
  auto args = std::make_shared<EvalArgs>();
  CLI::App* cmd = app.add_subcommand(
      "eval", "Perplexity, MTP accuracy/acceptance and expert load of a checkpoint on a text");
  cmd->add_option("--model", args->model_dir,
                  "checkpoint directory (config.json, safetensors, "
                  "tokenizer.json)")
      ->required();
  cmd->add_option("--text", args->text_path,
                  "text file: documents separated by an empty line (data/corpus/test.txt)")
      ->required();
  cmd->add_option("--context", args->context, "tokens per scored window")
      ->check(CLI::Range(3, 1 << 20));
  cmd->add_option("--max-tokens", args->max_tokens, "score only the first N tokens (0: all)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--prompts", args->prompts, "prompts for the greedy MTP acceptance (0: skip)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--prompt-tokens", args->prompt_tokens, "tokens per prompt")
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--gen-tokens", args->gen_tokens, "greedy tokens generated per prompt")
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--no-act-quant", args->no_act_quant,
                "plain float activations into FP8 weights (default: per-token-per-128 FP8)");
  cmd->callback([args]() {
    const int rc = RunEval(*args);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace expertmesh
