// expertmesh-bench-attention: one MLA attention layer at DeepSeek-V3's widths (hidden 7168, 128
// heads, q_lora_rank 1536, kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64,
// v_head_dim 128, FP8 E4M3 weights with 128x128 block scales, random: a one-layer checkpoint
// written by tools/make-checkpoint's generator into a temporary directory), absorbed form, SIMD
// kernels:
//  - a decode step (every sequence of the batch appends one token after `context` cached ones)
//    BEFORE (kv_b_proj dequantized in every forward: the layer's weights without
//    MlaWeights::kv_b_absorbed) and AFTER (the matrices precomputed at load), in one run, for each
//    context x batch x thread count; ms per step and the ratio;
//  - a long prompt prefilled in chunks (as the scheduler's --prefill-chunk does): tokens/s and
//    the peak RSS growth over the prefill (/proc/self/clear_refs resets the peak first).
// The KV cache rows of the decode contexts are random (latents RMS-normalized), which does not
// change the cost.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "core/base/proc_status.h"
#include "core/engine/kv_cache.h"
#include "core/engine/layers.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/cpu/thread_pool.h"
#include "core/model/model.h"
#include "tools/make-checkpoint/random_checkpoint.h"

namespace expertmesh::bench {
namespace {

using Clock = std::chrono::steady_clock;

// One dense layer with DeepSeek-V3's attention (the MLP, vocabulary and experts are small: only
// the attention is measured).
constexpr char kConfig[] = R"({
  "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
  "vocab_size": 256, "hidden_size": 7168, "intermediate_size": 128,
  "moe_intermediate_size": 128, "num_hidden_layers": 1, "num_nextn_predict_layers": 0,
  "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
  "n_routed_experts": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
  "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
  "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2,
  "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": true,
  "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
  "rms_norm_eps": 1e-06, "rope_theta": 10000, "attention_bias": false,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                   "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                   "type": "yarn"},
  "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1,
  "torch_dtype": "bfloat16",
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                          "quant_method": "fp8", "weight_block_size": [128, 128]}
})";

std::vector<float> RandomRows(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Cache rows [0, length): standard normal values (unit RMS, as the normed latents have).
void FillCache(MlaKvCache& cache, int64_t length, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int64_t j = 0; j < length; ++j) {
    float* slot = cache.Slot(0, j);
    for (int64_t r = 0; r < cache.row_size(); ++r) slot[r] = dist(rng);
  }
}

// Mean ms of `steps` decode steps (after one untimed) of the first `batch` caches, each holding
// `context` rows; every step appends one token per sequence and is rolled back after.
double DecodeMs(const ModelConfig& c, const MlaWeights& w, const Rope& rope,
                std::vector<std::unique_ptr<ContiguousKvCache>>& caches, int64_t batch,
                int64_t context, int steps, std::mt19937& rng) {
  const int64_t D = c.hidden_size;
  const std::vector<float> x = RandomRows(batch * D, rng);
  std::vector<float> out(batch * D);
  const LayerOptions opt;  // FP8 activations, absorbed, SIMD
  double total_ms = 0.0;
  for (int it = 0; it <= steps; ++it) {
    std::vector<SequenceSlice> seqs;
    for (int64_t b = 0; b < batch; ++b) {
      if (!caches[b]->Extend(1).ok()) std::abort();
      seqs.push_back({caches[b].get(), context, b, 1});
    }
    const auto t0 = Clock::now();
    MlaForwardBatch(c, w, rope, 0, seqs, x.data(), batch, out.data(), opt);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    if (it > 0) total_ms += ms;
    for (int64_t b = 0; b < batch; ++b) caches[b]->Truncate(context);
  }
  return total_ms / steps;
}

struct PrefillResult {
  double seconds = 0;
  int64_t peak_growth = -1;  // bytes; -1 when the peak could not be reset
  int64_t cache_bytes = 0;
};

PrefillResult Prefill(const ModelConfig& c, const MlaWeights& w, const Rope& rope, int64_t tokens,
                      int64_t chunk, std::mt19937& rng) {
  const int64_t D = c.hidden_size;
  auto cache = *ContiguousKvCache::Create(1, c.kv_lora_rank, c.qk_rope_head_dim);
  const std::vector<float> x = RandomRows(chunk * D, rng);
  std::vector<float> out(chunk * D);
  const LayerOptions opt;
  PrefillResult r;
  const bool reset = base::ResetPeakRss();
  const int64_t rss0 = base::ProcStatusBytes("VmRSS");
  const auto t0 = Clock::now();
  for (int64_t start = 0; start < tokens; start += chunk) {
    const int64_t n = std::min(chunk, tokens - start);
    if (!cache->Extend(n).ok()) std::abort();
    const SequenceSlice seq{cache.get(), start, 0, n};
    MlaForwardBatch(c, w, rope, 0, {&seq, 1}, x.data(), n, out.data(), opt);
  }
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (reset) r.peak_growth = base::ProcStatusBytes("VmHWM") - rss0;
  r.cache_bytes = tokens * cache->row_size() * int64_t{sizeof(float)};
  return r;
}

}  // namespace

int Main(int argc, char** argv) {
  CLI::App app{
      "expertmesh-bench-attention: one MLA layer at DeepSeek-V3 attention widths (128 heads, "
      "kv_lora_rank 512, FP8 weights): decode ms/step with kv_b_proj dequantized per forward "
      "(before) and precomputed at load (after) at each context, batch and thread count, and a "
      "chunked prefill's tokens/s and peak RSS growth, in one run."};
  std::vector<int64_t> contexts{1024, 8192};
  std::vector<int64_t> batches{1, 4, 16};
  std::vector<int> threads{1, 2};
  int steps = 3;
  int64_t prefill_tokens = 8192, prefill_chunk = 512;
  std::vector<int> prefill_threads{2};
  std::string dir;
  app.add_option("--contexts", contexts, "cached tokens per sequence for the decode steps")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--batches", batches, "sequences per decode step")
      ->check(CLI::Range(int64_t{1}, int64_t{1024}));
  app.add_option("--threads", threads, "kernel thread counts for the decode steps (each >= 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--steps", steps, "timed decode steps per case (after one untimed)")
      ->check(CLI::Range(1, 1000));
  app.add_option("--prefill-tokens", prefill_tokens, "prompt length of the prefill (0: none)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  app.add_option("--prefill-chunk", prefill_chunk, "tokens per prefill forward")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--prefill-threads", prefill_threads, "kernel thread counts for the prefill")
      ->check(CLI::PositiveNumber);
  app.add_option("--dir", dir,
                 "where to write the one-layer random checkpoint (default: a new directory under "
                 "the system's temporary directory, removed at the end)");
  CLI11_PARSE(app, argc, argv);

  const bool own_dir = dir.empty();
  if (own_dir) {
    dir = (std::filesystem::temp_directory_path() /
           ("expertmesh-bench-attention-" + std::to_string(::getpid())))
              .string();
  }
  // Removes the checkpoint directory on every return.
  struct Cleanup {
    const std::string& dir;
    bool own;
    ~Cleanup() {
      std::error_code ec;
      if (own) std::filesystem::remove_all(dir, ec);
    }
  } cleanup{dir, own_dir};
  auto config = ParseModelConfig(kConfig);
  if (!config.ok()) {
    std::fprintf(stderr, "config: %s\n", config.status().ToString().c_str());
    return 1;
  }
  const ModelConfig& c = *config;
  if (absl::Status st = WriteRandomCheckpoint(c, kConfig, dir, 17); !st.ok()) {
    std::fprintf(stderr, "writing the checkpoint to %s: %s\n", dir.c_str(), st.ToString().c_str());
    return 1;
  }
  auto ckpt = Checkpoint::Open(dir);
  if (!ckpt.ok()) {
    std::fprintf(stderr, "%s\n", ckpt.status().ToString().c_str());
    return 1;
  }
  auto model = Model::Create(**ckpt, c);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
    return 1;
  }
  const MlaWeights& after = (*model)->layers()[0].self_attn;
  MlaWeights before = after;
  before.kv_b_absorbed.reset();
  const Rope rope(c);

  const Linear& kvb = after.kv_b_proj;
  const double fp8_mb = static_cast<double>(kvb.weight.size + kvb.scale_inv.size) / 1e6;
  const double absorbed_mb = static_cast<double>(after.kv_b_absorbed->size() * sizeof(float)) / 1e6;
  std::printf(
      "SIMD target %s. kv_b_proj per layer: %.1f MB FP8 (+ block scales); precomputed float "
      "matrices %.1f MB (%.1fx); x 61 layers: %.2f GB\n",
      simd::TargetName(), fp8_mb, absorbed_mb, absorbed_mb / fp8_mb, absorbed_mb * 61 / 1e3);

  std::mt19937 rng(5);
  const int64_t max_batch = *std::max_element(batches.begin(), batches.end());
  std::printf("\ndecode step, one MLA layer (ms/step, mean of %d)\n", steps);
  std::printf("%8s %6s %8s %12s %12s %7s\n", "context", "batch", "threads", "before ms", "after ms",
              "ratio");
  for (int64_t context : contexts) {
    std::vector<std::unique_ptr<ContiguousKvCache>> caches;
    for (int64_t b = 0; b < max_batch; ++b) {
      caches.push_back(*ContiguousKvCache::Create(1, c.kv_lora_rank, c.qk_rope_head_dim));
      if (!caches.back()->Extend(context).ok()) return 1;
      FillCache(*caches.back(), context, rng);
    }
    for (int64_t batch : batches) {
      for (int t : threads) {
        cpu::SetKernelThreads(t);
        const double b_ms = DecodeMs(c, before, rope, caches, batch, context, steps, rng);
        const double a_ms = DecodeMs(c, after, rope, caches, batch, context, steps, rng);
        std::printf("%8lld %6lld %8d %12.2f %12.2f %7.2f\n", static_cast<long long>(context),
                    static_cast<long long>(batch), t, b_ms, a_ms, b_ms / a_ms);
        std::fflush(stdout);
      }
    }
  }
  if (prefill_tokens > 0) {
    std::printf("\nprefill of %lld tokens in chunks of %lld, one MLA layer\n",
                static_cast<long long>(prefill_tokens), static_cast<long long>(prefill_chunk));
    std::printf("%8s %10s %10s %16s %14s\n", "threads", "seconds", "tokens/s", "peak RSS +MiB",
                "KV cache MiB");
    for (int t : prefill_threads) {
      cpu::SetKernelThreads(t);
      const PrefillResult r = Prefill(c, after, rope, prefill_tokens, prefill_chunk, rng);
      std::printf("%8d %10.2f %10.1f %16s %14.1f\n", t, r.seconds,
                  static_cast<double>(prefill_tokens) / r.seconds,
                  r.peak_growth < 0 ? "n/a" : std::to_string(r.peak_growth >> 20).c_str(),
                  static_cast<double>(r.cache_bytes) / 1048576.0);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace expertmesh::bench

int main(int argc, char** argv) { return expertmesh::bench::Main(argc, argv); }
