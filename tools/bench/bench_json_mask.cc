// expertmesh-bench-json-mask: what JSON mode adds to one decode step of one sequence.
// JsonConstraint::Mask (core/decode/json_constraint.h) over a vocabulary, in three automaton
// states (the start, inside a string, after a value in an object), against the baseline that
// every sequence pays anyway in the same run: sampling its token from the same logits
// (Sampler::Sample, greedy and temperature 1). Vocabularies: the model's tokenizer.json as it
// is, and (--vocab, DeepSeek-V3's 129,280 by default) the same tokens extended with pairs of
// them to that size, so the byte lengths stay a real BPE vocabulary's.
#include <chrono>
#include <cstdio>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "core/decode/json_constraint.h"
#include "core/decode/sampling.h"
#include "core/text/tokenizer.h"

namespace expertmesh {
namespace {

using Clock = std::chrono::steady_clock;

template <typename F>
double MicrosPerCall(int iterations, F&& f) {
  f();  // warm
  const auto t = Clock::now();
  for (int i = 0; i < iterations; ++i) f();
  return std::chrono::duration<double, std::micro>(Clock::now() - t).count() / iterations;
}

void Run(const std::string& name, std::shared_ptr<const TokenByteTable> table, int32_t eos,
         int iterations) {
  const size_t vocab = table->size();
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> logits(vocab);
  for (float& l : logits) l = normal(rng);
  std::vector<float> work(vocab);

  SamplingParams greedy;
  SamplingParams sampled;
  sampled.temperature = 1.0f;
  sampled.seed = 7;
  Sampler g = *Sampler::Create(greedy);
  Sampler s = *Sampler::Create(sampled);
  const double greedy_us = MicrosPerCall(iterations, [&] { g.Sample(logits); });
  const double sampled_us = MicrosPerCall(iterations, [&] { s.Sample(logits); });
  std::printf("%s: %zu ids; baseline sample: greedy %.1f us, temperature 1 %.1f us\n", name.c_str(),
              vocab, greedy_us, sampled_us);
  const std::vector<std::pair<std::string, std::string>> states = {
      {"start", ""}, {"in a string", "{\"key\": \"some te"}, {"after a value", "{\"a\": 12"}};
  for (const auto& [state, prefix] : states) {
    JsonConstraint c(table, {eos});
    // The prefix through single-byte tokens (a byte-level vocabulary has all of them).
    for (char ch : prefix) {
      for (size_t t = 0; t < vocab; ++t) {
        if ((*table)[t].size() == 1 && (*table)[t][0] == ch) {
          c.Accept(static_cast<int32_t>(t));
          break;
        }
      }
    }
    size_t allowed = 0;
    work = logits;
    c.Mask(work);
    for (float l : work) allowed += l != -std::numeric_limits<float>::infinity();
    const double mask_us = MicrosPerCall(iterations, [&] {
      work = logits;
      c.Mask(work);
    });
    std::printf(
        "  mask, %-13s %9.1f us (%6zu ids allowed) = %5.2f x greedy sample, %5.2f x "
        "temperature-1 sample\n",
        (state + ":").c_str(), mask_us, allowed, mask_us / greedy_us, mask_us / sampled_us);
  }
}

}  // namespace
}  // namespace expertmesh

int main(int argc, char** argv) {
  CLI::App app("JSON mode's logits mask per decode step against sampling the token");
  std::string tokenizer = "models/expertmesh-tiny/tokenizer.json";
  int vocab = 129280;
  int iterations = 50;
  app.add_option("--tokenizer", tokenizer, "tokenizer.json whose token bytes are used");
  app.add_option("--vocab", vocab, "size of the extended vocabulary (DeepSeek-V3: 129280)")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--iterations", iterations, "calls timed per figure")
      ->check(CLI::Range(1, 100000));
  CLI11_PARSE(app, argc, argv);
  auto tok = expertmesh::Tokenizer::Load(tokenizer);
  if (!tok.ok()) {
    std::fprintf(stderr, "%s\n", std::string(tok.status().message()).c_str());
    return 1;
  }
  const int32_t eos = (*tok)->eos_id().value_or(0);
  auto base = std::make_shared<expertmesh::TokenByteTable>((*tok)->TokenByteTable());
  expertmesh::Run("tokenizer as is", base, eos, iterations);
  auto extended = std::make_shared<expertmesh::TokenByteTable>(*base);
  std::mt19937 rng(3);
  std::uniform_int_distribution<size_t> pick(0, base->size() - 1);
  while (extended->size() < static_cast<size_t>(vocab)) {
    const std::string& a = (*base)[pick(rng)];
    const std::string& b = (*base)[pick(rng)];
    extended->push_back(a.empty() || b.empty() ? std::string() : a + b);
  }
  expertmesh::Run("extended", extended, eos, iterations);
  return 0;
}
