// expertmesh-bench-mtp: decode tokens/s with and without speculative decoding by the MTP
// module, in one run, at batch 1, 8 and 32 (or --batches), in-process and through a cluster
// on loopback, with the acceptance rate beside each -- the figures of issue 7.
//
// Prompts: English openings through the checkpoint's tokenizer.json when it has one (a
// trained model's drafts are judged on text), else fixed random token ids. Greedy decoding,
// EOS ignored, so both modes decode the same number of tokens; the greedy tokens of the two
// modes are compared and a difference is reported (it must never happen).
//
// In-process: core/decode/generate.h's BatchGenerator (adaptive drafting policy, or --mtp-always),
// all experts local; decode tokens/s = tokens after each sequence's first / decode time. Cluster:
// router + shards + attention service started by the launcher; B concurrent Submits, the baseline
// with SubmitRequest.disable_mtp; per stream (tokens - 1) / (last event time - first event time),
// summed over the streams.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "core/base/status.h"
#include "core/decode/generate.h"
#include "core/decode/sampling.h"
#include "core/engine/engine.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/kernels/cpu/cpu_kernels.h"
#include "core/model/local_experts.h"
#include "core/model/model.h"
#include "core/text/tokenizer.h"
#include "expertmesh/v1/attention.grpc.pb.h"
#include "service-common/grpc_util.h"
#include "spdlog/spdlog.h"
#include "tools/launcher/cluster.h"
#include "tools/launcher/tls_flags.h"

namespace expertmesh {
namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kOpenings[] = {
    "It was a bright cold day in April, and the clocks were striking",
    "The old man was thin and gaunt with deep wrinkles in the back of his neck",
    "Call me Ishmael. Some years ago, never mind how long precisely",
    "It is a truth universally acknowledged, that a single man in possession of",
    "The sun shone, having no alternative, on the nothing new. Murphy sat out of it",
    "In a hole in the ground there lived a",
    "Happy families are all alike; every unhappy family is unhappy in its own way.",
    "Once upon a time there was a little girl who lived in a village near the forest",
};

struct Figures {
  double plain = 0, mtp = 0;  // decode tokens/s
  int64_t drafted = 0, accepted = 0;
  bool same_tokens = true;
  double draft_step_share = -1;  // steps that drafted / decode steps (cluster: per sequence)
  double predicted = -1;         // in-process: the policy's predicted speed-up at the end
};

std::vector<std::vector<int32_t>> Prompts(const std::string& model_dir, int n, int64_t vocab,
                                          int random_len) {
  std::vector<std::vector<int32_t>> out;
  const std::string tok_path = model_dir + "/tokenizer.json";
  if (std::filesystem::exists(tok_path)) {
    absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::Load(tok_path);
    if (tok.ok()) {
      for (int i = 0; i < n; ++i) {
        absl::StatusOr<std::vector<int32_t>> ids =
            (*tok)->Encode(kOpenings[i % std::size(kOpenings)], /*add_bos=*/true);
        if (ids.ok() && !ids->empty()) out.push_back(*ids);
      }
      if (std::ssize(out) == n) return out;
    }
    out.clear();
  }
  Rng rng(1234);
  for (int i = 0; i < n; ++i) {
    out.emplace_back();
    for (int j = 0; j < random_len; ++j) {
      out.back().push_back(2 + static_cast<int32_t>(rng.Next() % (vocab - 2)));
    }
  }
  return out;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Plain and MTP runs alternate `repeats` times; each mode's rate is its median (the machine
// may be shared: alternation spreads load changes over both modes).
absl::StatusOr<Figures> InProcess(Engine& engine, const std::vector<std::vector<int32_t>>& prompts,
                                  int decode_tokens, int draft_k, bool always, int repeats,
                                  double margin) {
  std::vector<BatchRequest> requests;
  for (const auto& p : prompts) requests.push_back({p, {}, decode_tokens + 1, true, {}});
  Figures f;
  std::vector<std::vector<int32_t>> tokens[2];
  std::vector<double> rates[2];
  for (int run = 0; run < 2 * repeats; ++run) {
    const int mode = run % 2;
    tokens[mode].clear();
    BatchGeneratorOptions o;
    o.mtp = mode == 1;
    o.draft_k = draft_k;
    o.policy.adaptive = !always;
    o.policy.margin = margin;
    EM_ASSIGN_OR_RETURN(std::unique_ptr<BatchGenerator> g, BatchGenerator::Create(&engine, o));
    BatchStats stats;
    EM_ASSIGN_OR_RETURN(std::vector<BatchResult> r, g->Generate(requests, &stats));
    const double rate = stats.decode_tokens / stats.decode_seconds;
    rates[mode].push_back(rate);
    if (mode == 1) {
      f.drafted = stats.drafted;
      f.accepted = stats.accepted;
      f.draft_step_share = static_cast<double>(stats.draft_steps) / stats.decode_steps;
      if (g->policy() != nullptr) {
        f.predicted = g->policy()->PredictedSpeedup(std::ssize(prompts), 1);
      }
    }
    for (const BatchResult& res : r) {
      tokens[mode].emplace_back();
      for (const SampledToken& t : res.tokens) tokens[mode].back().push_back(t.token);
    }
  }
  f.plain = Median(rates[0]);
  f.mtp = Median(rates[1]);
  f.same_tokens = tokens[0] == tokens[1];
  return f;
}

struct StreamsResult {
  double rate = 0;
  int64_t drafted = 0, accepted = 0, emitted = 0;
  std::vector<std::vector<int32_t>> tokens;
};

absl::StatusOr<StreamsResult> ClusterStreams(v1::AttentionService::Stub& stub,
                                             const std::vector<std::vector<int32_t>>& prompts,
                                             int decode_tokens, bool disable_mtp) {
  const size_t b = prompts.size();
  std::vector<double> rate(b, 0.0);
  std::vector<int64_t> drafted(b, 0), accepted(b, 0);
  std::vector<std::vector<int32_t>> tokens(b);
  std::vector<std::string> errors(b);
  std::vector<std::thread> threads;
  static int round = 0;
  ++round;
  for (size_t i = 0; i < b; ++i) {
    threads.emplace_back([&, i] {
      v1::SubmitRequest r;
      r.set_request_id("mtp-bench-" + std::to_string(round) + "-" + std::to_string(i));
      for (int32_t t : prompts[i]) r.add_prompt_token_ids(t);
      r.set_max_tokens(static_cast<uint32_t>(decode_tokens + 1));
      r.set_ignore_eos(true);
      r.set_disable_mtp(disable_mtp);
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(30));
      auto reader = stub.Submit(&ctx, r);
      v1::TokenEvent e;
      Clock::time_point first, last;
      while (reader->Read(&e)) {
        last = Clock::now();
        if (tokens[i].empty()) first = last;
        tokens[i].insert(tokens[i].end(), e.token_ids().begin(), e.token_ids().end());
        drafted[i] = std::max<int64_t>(drafted[i], e.drafted_tokens());
        accepted[i] = std::max<int64_t>(accepted[i], e.accepted_draft_tokens());
      }
      const grpc::Status s = reader->Finish();
      if (!s.ok()) errors[i] = s.error_message();
      const double secs = std::chrono::duration<double>(last - first).count();
      if (tokens[i].size() > 1 && secs > 0) rate[i] = (tokens[i].size() - 1) / secs;
    });
  }
  for (std::thread& t : threads) t.join();
  StreamsResult out;
  for (size_t i = 0; i < b; ++i) {
    if (!errors[i].empty())
      return absl::InternalError("stream " + std::to_string(i) + ": " + errors[i]);
    out.rate += rate[i];
    out.drafted += drafted[i];
    out.accepted += accepted[i];
    out.emitted += std::ssize(tokens[i]);
  }
  out.tokens = std::move(tokens);
  return out;
}

// Mean seconds of the main forward with r new rows per sequence and of the MTP forward with
// r rows per sequence, B sequences of `context` cached tokens (the cost model the adaptive
// policy learns online).
void Breakdown(Engine& engine, int64_t B, int context, const char* kernels) {
  const ModelConfig& c = engine.model().config();
  const int64_t D = c.hidden_size;
  Rng rng(9);
  auto time = [&](int rows, bool mtp) {
    std::vector<std::unique_ptr<ContiguousKvCache>> caches;
    std::vector<std::vector<int32_t>> tokens(B);
    std::vector<float> hidden(rows * D, 0.01f);
    for (int64_t b = 0; b < B; ++b) {
      caches.push_back(mtp ? engine.NewMtpCache() : engine.NewCache());
      for (int j = 0; j < context + rows; ++j) {
        tokens[b].push_back(2 + static_cast<int32_t>(rng.Next() % (c.vocab_size - 2)));
      }
    }
    double total = 0;
    constexpr int kReps = 12;
    for (int rep = 0; rep < kReps; ++rep) {
      std::vector<SequenceInput> in;
      std::vector<MtpInput> min;
      std::vector<float> ctx_hidden(context * D, 0.01f);
      for (int64_t b = 0; b < B; ++b) {
        caches[b]->Truncate(0);
        std::span<const int32_t> t(tokens[b]);
        if (mtp) {
          MtpInput pre{t.first(context), ctx_hidden, caches[b].get(), false};
          (void)engine.ForwardMtp(std::span<const MtpInput>(&pre, 1));
          min.push_back({t.subspan(context, rows), hidden, caches[b].get(), false});
        } else {
          SequenceInput pre{t.first(context), caches[b].get(), false};
          (void)engine.Forward(std::span<const SequenceInput>(&pre, 1));
          in.push_back({t.subspan(context, rows), caches[b].get(), rows > 1});
        }
      }
      const auto start = Clock::now();
      if (mtp) {
        (void)engine.ForwardMtp(min);
      } else {
        (void)engine.Forward(in);
      }
      if (rep > 1) total += std::chrono::duration<double>(Clock::now() - start).count();
    }
    return total / (kReps - 2);
  };
  std::printf(
      "%s kernels, batch %lld, context %d: main forward 1 row %.2f ms, 2 rows %.2f ms, 3 rows "
      "%.2f ms per step; MTP forward 1 row %.2f ms, 2 rows %.2f ms\n",
      kernels, static_cast<long long>(B), context, 1e3 * time(1, false), 1e3 * time(2, false),
      1e3 * time(3, false), 1e3 * time(1, true), 1e3 * time(2, true));
}

void PrintRow(const char* where, int b, const Figures& f) {
  std::printf("%-11s %5d %12.1f %12.1f %8.2fx %10.1f%%", where, b, f.plain, f.mtp,
              f.plain > 0 ? f.mtp / f.plain : 0.0,
              f.drafted > 0 ? 100.0 * f.accepted / f.drafted : 0.0);
  if (f.draft_step_share >= 0) std::printf(" %10.0f%%", 100.0 * f.draft_step_share);
  if (f.predicted >= 0) std::printf(" %10.2fx", f.predicted);
  std::printf("%s\n", f.same_tokens ? "" : "  GREEDY TOKENS DIFFER");
  std::fflush(stdout);
}

int Run(const std::string& model_dir, int shards, std::vector<int> batches, int decode_tokens,
        int draft_k, bool always, bool skip_cluster, bool breakdown, int repeats, double margin) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(model_dir + "/config.json");
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(model_dir);
  if (!config.ok() || !ckpt.ok()) {
    spdlog::error("cannot open {}: {}", model_dir,
                  (!config.ok() ? config.status() : ckpt.status()).ToString());
    return 1;
  }
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Create(**ckpt, *config);
  absl::StatusOr<std::unique_ptr<LocalExperts>> experts =
      LocalExperts::Create(**ckpt, *config, AllExperts(*config));
  if (!model.ok() || !experts.ok()) {
    spdlog::error("loading {} failed", model_dir);
    return 1;
  }
  if ((*model)->mtp().empty()) {
    spdlog::error("{} has no MTP module (num_nextn_predict_layers = 0)", model_dir);
    return 1;
  }
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(**model, experts->get());
  if (!engine.ok()) return 1;
  std::printf(
      "model %s: hidden %lld, %lld layers, %lld routed experts, vocab %lld; "
      "%d decode tokens per sequence, draft_k %d, policy %s\n",
      model_dir.c_str(), static_cast<long long>(config->hidden_size),
      static_cast<long long>(config->num_hidden_layers),
      static_cast<long long>(config->n_routed_experts), static_cast<long long>(config->vocab_size),
      decode_tokens, draft_k, always ? "always draft" : "adaptive");
  if (breakdown) {
    // The same forwards with the reference loops (core/model/model.cc), the SIMD kernels' baseline.
    LocalExperts::Options ro;
    ro.kernel = LinearKernel::kReference;
    absl::StatusOr<std::unique_ptr<LocalExperts>> ref_experts =
        LocalExperts::Create(**ckpt, *config, AllExperts(*config), ro);
    EngineOptions eo;
    eo.kernel = LinearKernel::kReference;
    if (!ref_experts.ok()) return 1;
    absl::StatusOr<std::unique_ptr<Engine>> ref = Engine::Create(**model, ref_experts->get(), eo);
    if (!ref.ok()) return 1;
    for (int b : batches) {
      Breakdown(**ref, b, 32, "reference");
      Breakdown(**engine, b, 32, simd::TargetName());
    }
  }
  std::printf("%-11s %5s %12s %12s %9s %11s %11s %11s\n", "where", "batch", "plain tok/s",
              "mtp tok/s", "speedup", "acceptance", "drafting", "predicted");
  for (int b : batches) {
    absl::StatusOr<Figures> f = InProcess(**engine, Prompts(model_dir, b, config->vocab_size, 16),
                                          decode_tokens, draft_k, always, repeats, margin);
    if (!f.ok()) {
      spdlog::error("in-process batch {}: {}", b, f.status().ToString());
      return 1;
    }
    PrintRow("in-process", b, *f);
  }
  if (skip_cluster) return 0;

  launcher::ClusterOptions o;
  o.tls = ProcessTls();  // --tls-*: every service on mTLS, our channels too
  o.model_dir = model_dir;
  o.shards = shards;
  o.max_batch = *std::max_element(batches.begin(), batches.end());
  o.kv_blocks = 8192;
  o.step_deadline_ms = 30000;
  // The plain and the MTP runs repeat the same prompts: with prefix caching the MTP run would
  // reuse the plain run's blocks, which carry no MTP rows, and a sequence whose shared blocks
  // lack them does not draft (attention-service/scheduler.cc): the MTP rows showed 0 % drafting.
  o.extra_attention_args = {"--draft-k", std::to_string(draft_k), "--no-prefix-caching"};
  if (always) o.extra_attention_args.push_back("--mtp-always");
  absl::StatusOr<std::unique_ptr<launcher::Cluster>> cluster = launcher::Cluster::Start(o);
  if (!cluster.ok()) {
    spdlog::error("{}", cluster.status().ToString());
    return 1;
  }
  auto stub = v1::AttentionService::NewStub(MakeChannel((*cluster)->attention().grpc_address));
  for (int b : batches) {
    const auto prompts = Prompts(model_dir, b, config->vocab_size, 16);
    std::vector<double> rates[2];
    Figures f;
    std::vector<std::vector<int32_t>> first_plain;
    int64_t sequence_steps = 0;  // MTP runs: steps summed over sequences (a step emits 1 +
                                 // accepted tokens), for the share of steps that drafted
    for (int run = 0; run < 2 * repeats; ++run) {
      const bool plain = run % 2 == 0;
      absl::StatusOr<StreamsResult> r = ClusterStreams(*stub, prompts, decode_tokens, plain);
      if (!r.ok()) {
        spdlog::error("cluster batch {}: {}", b, r.status().ToString());
        return 1;
      }
      rates[plain ? 0 : 1].push_back(r->rate);
      if (run == 0) first_plain = r->tokens;
      f.same_tokens &= r->tokens == first_plain;
      if (!plain) {
        f.drafted += r->drafted;
        f.accepted += r->accepted;
        sequence_steps += r->emitted - r->accepted;
      }
    }
    f.plain = Median(rates[0]);
    f.mtp = Median(rates[1]);
    // k drafts per drafting step: drafted / k steps drafted.
    if (sequence_steps > 0) {
      f.draft_step_share =
          static_cast<double>(f.drafted) / draft_k / static_cast<double>(sequence_steps);
    }
    PrintRow("cluster", b, f);
  }
  return (*cluster)->Stop().ok() ? 0 : 1;
}

}  // namespace
}  // namespace expertmesh

int main(int argc, char** argv) {
  CLI::App app{
      "Decode tokens/s with and without MTP speculative decoding, in-process and "
      "through a loopback cluster, with acceptance rates"};
  std::string model;
  int shards = 2, decode_tokens = 64, draft_k = 1, repeats = 3;
  double margin = expertmesh::DraftPolicyOptions{}.margin;
  bool always = false, skip_cluster = false, breakdown = false;
  std::vector<int> batches = {1, 8, 32};
  app.add_option("--model", model, "Checkpoint directory (with num_nextn_predict_layers >= 1)")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--shards", shards, "Shard groups of the cluster")->capture_default_str();
  app.add_option("--batches", batches, "Batch sizes")->capture_default_str();
  app.add_option("--decode-tokens", decode_tokens, "Tokens decoded per sequence")
      ->capture_default_str();
  app.add_option("--draft-k", draft_k, "MTP drafts per step")
      ->check(CLI::Range(1, expertmesh::kMaxDraftTokens))
      ->capture_default_str();
  app.add_flag("--mtp-always", always, "Draft every step (no adaptive policy), both sides");
  app.add_flag("--in-process-only", skip_cluster, "Skip the cluster rows");
  app.add_option("--margin", margin, "In-process: the policy's speed-up margin")
      ->capture_default_str();
  app.add_option("--repeats", repeats, "Alternating runs per mode (median reported)")
      ->check(CLI::Range(1, 50))
      ->capture_default_str();
  app.add_flag("--breakdown", breakdown, "First time the main and MTP forwards by rows");
  expertmesh::TlsFiles tls;
  expertmesh::AddTlsOptions(
      &app, tls, "of every service and this benchmark (SAN IP:127.0.0.1, server and client use)");
  CLI11_PARSE(app, argc, argv);
  if (int rc = expertmesh::ApplyTlsOptions(tls); rc != 0) return rc;
  return expertmesh::Run(model, shards, batches, decode_tokens, draft_k, always, skip_cluster,
                         breakdown, repeats, margin);
}
