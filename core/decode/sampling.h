// Token selection from logits: greedy (temperature 0) or sampled with temperature, top-k and
// top-p, presence / frequency penalties, and log-probabilities. Each sequence owns a Sampler
// with its own seeded RNG, so a sequence's tokens depend only on its logits and its seed --
// never on what else is in the batch or on timing.
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (ties: lowest token id)
  float top_p = 1.0f;        // (0, 1]
  int32_t top_k = 0;         // 0: off
  uint64_t seed = 0;
  float presence_penalty = 0.0f;   // subtracted once from tokens generated so far
  float frequency_penalty = 0.0f;  // subtracted per occurrence
  int32_t top_logprobs = 0;        // alternatives to report (0..20)
};

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
};

// The distribution a Sampler draws from for one position: candidate tokens, most likely
// first (lower id on ties), with probabilities summing to 1.
struct TokenDistribution {
  std::vector<int32_t> tokens;
  std::vector<double> probs;
  // Probability of `token` (0 outside the candidates).
  double Prob(int32_t token) const;
};

struct SampledToken {
  int32_t token = 0;
  // log-softmax of the model's logits (before penalties and temperature) at `token`.
  float logprob = 0.0f;
  std::vector<TokenLogprob> top_logprobs;  // most likely first, ties by lower id
};

// splitmix64-seeded xoshiro256** generator: fixed across platforms and standard libraries.
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t Next();
  double Uniform();  // [0, 1) with 53 bits
 private:
  uint64_t s_[4];
};

class Sampler {
 public:
  static absl::StatusOr<Sampler> Create(const SamplingParams& params);
  // logits: [vocab_size]. Records the chosen token for the penalties.
  SampledToken Sample(std::span<const float> logits);
  // Counts a token as generated (e.g. one accepted from a draft) without sampling.
  void Observe(int32_t token) { ++counts_[token]; }
  const SamplingParams& params() const { return params_; }

  // For speculative decoding (core/decode/speculative.h):
  // The distribution Sample() draws from for these logits (penalties, temperature, top-k,
  // top-p applied to the tokens generated so far). Temperature 0: the argmax, probability 1.
  TokenDistribution Distribution(std::span<const float> logits) const;
  // One uniform draw in [0, 1) from this sequence's generator.
  double Uniform() { return rng_.Uniform(); }
  // Records `token` as generated and reports it as Sample() would have, had it drawn it.
  SampledToken Emit(std::span<const float> logits, int32_t token);

 private:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  // logits minus the presence / frequency penalties: [vocab_size].
  std::vector<float> Penalized(std::span<const float> logits) const;
  // Temperature > 0: the kept candidates (top-k, then the top-p nucleus) by descending
  // adjusted logit, with unnormalized weights exp((l - l_max) / temperature).
  void Nucleus(const std::vector<float>& adjusted, std::vector<int32_t>& order,
               std::vector<double>& weights) const;
  SamplingParams params_;
  Rng rng_;
  std::unordered_map<int32_t, int32_t> counts_;  // generated token -> occurrences
};

// log-softmax of logits: [vocab_size].
std::vector<float> LogSoftmax(std::span<const float> logits);
// The token with the largest logit, lowest id on ties.
int32_t Argmax(std::span<const float> logits);

}  // namespace expertmesh
