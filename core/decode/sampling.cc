#include "core/decode/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_format.h"

namespace expertmesh {

namespace {

uint64_t SplitMix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

}  // namespace

Rng::Rng(uint64_t seed) {
  for (uint64_t& s : s_) s = SplitMix64(seed);
}

uint64_t Rng::Next() {
  const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = Rotl(s_[3], 45);
  return result;
}

double Rng::Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

std::vector<float> LogSoftmax(std::span<const float> logits) {
  const float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float l : logits) sum += std::exp(static_cast<double>(l) - max);
  const double log_z = max + std::log(sum);
  std::vector<float> out(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) out[i] = static_cast<float>(logits[i] - log_z);
  return out;
}

int32_t Argmax(std::span<const float> logits) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

absl::StatusOr<Sampler> Sampler::Create(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("temperature %g must be >= 0", p.temperature));
  }
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrFormat("top_p %g must lie in (0, 1]", p.top_p));
  }
  if (p.top_k < 0) return absl::InvalidArgumentError("top_k must be >= 0");
  if (p.top_logprobs < 0 || p.top_logprobs > 20) {
    return absl::InvalidArgumentError("top_logprobs must lie in [0, 20]");
  }
  if (!std::isfinite(p.presence_penalty) || !std::isfinite(p.frequency_penalty)) {
    return absl::InvalidArgumentError("penalties must be finite");
  }
  return Sampler(p);
}

double TokenDistribution::Prob(int32_t token) const {
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] == token) return probs[i];
  }
  return 0.0;
}

std::vector<float> Sampler::Penalized(std::span<const float> logits) const {
  const int64_t vocab = std::ssize(logits);
  std::vector<float> adjusted(logits.begin(), logits.end());
  for (auto [token, count] : counts_) {
    if (token < vocab) {
      adjusted[token] -= params_.presence_penalty + params_.frequency_penalty * count;
    }
  }
  return adjusted;
}

void Sampler::Nucleus(const std::vector<float>& adjusted, std::vector<int32_t>& order,
                      std::vector<double>& weights) const {
  const int64_t vocab = std::ssize(adjusted);
  // Candidates by descending adjusted logit, lower id first on ties.
  order.resize(vocab);
  std::iota(order.begin(), order.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) {
    return adjusted[a] > adjusted[b] || (adjusted[a] == adjusted[b] && a < b);
  };
  int64_t k = params_.top_k > 0 ? std::min<int64_t>(params_.top_k, vocab) : vocab;
  std::partial_sort(order.begin(), order.begin() + k, order.end(), by_logit);
  order.resize(k);
  // Softmax with temperature over the top-k, then the top-p nucleus (at least one token).
  weights.resize(k);
  double sum = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    weights[i] = std::exp((static_cast<double>(adjusted[order[i]]) - adjusted[order[0]]) /
                          params_.temperature);
    sum += weights[i];
  }
  int64_t keep = 0;
  double cumulative = 0.0;
  while (keep < k) {
    cumulative += weights[keep] / sum;
    ++keep;
    if (cumulative >= params_.top_p) break;
  }
  order.resize(keep);
  weights.resize(keep);
}

TokenDistribution Sampler::Distribution(std::span<const float> logits) const {
  TokenDistribution d;
  const std::vector<float> adjusted = Penalized(logits);
  if (params_.temperature == 0.0f) {
    d.tokens = {Argmax(adjusted)};
    d.probs = {1.0};
    return d;
  }
  Nucleus(adjusted, d.tokens, d.probs);
  double kept_sum = 0.0;
  for (double w : d.probs) kept_sum += w;
  for (double& p : d.probs) p /= kept_sum;
  return d;
}

SampledToken Sampler::Sample(std::span<const float> logits) {
  const std::vector<float> adjusted = Penalized(logits);
  int32_t chosen;
  if (params_.temperature == 0.0f) {
    chosen = Argmax(adjusted);
  } else {
    std::vector<int32_t> order;
    std::vector<double> probs;
    Nucleus(adjusted, order, probs);
    const int64_t keep = std::ssize(order);
    double kept_sum = 0.0;
    for (int64_t i = 0; i < keep; ++i) kept_sum += probs[i];
    const double u = rng_.Uniform() * kept_sum;
    double acc = 0.0;
    chosen = order[keep - 1];
    for (int64_t i = 0; i < keep; ++i) {
      acc += probs[i];
      if (u < acc) {
        chosen = order[i];
        break;
      }
    }
  }
  return Emit(logits, chosen);
}

SampledToken Sampler::Emit(std::span<const float> logits, int32_t chosen) {
  const int64_t vocab = std::ssize(logits);
  SampledToken out;
  out.token = chosen;
  std::vector<float> logprobs = LogSoftmax(logits);
  out.logprob = logprobs[chosen];
  if (params_.top_logprobs > 0) {
    const int64_t n = std::min<int64_t>(params_.top_logprobs, vocab);
    std::vector<int32_t> ids(vocab);
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
      return logprobs[a] > logprobs[b] || (logprobs[a] == logprobs[b] && a < b);
    });
    for (int64_t i = 0; i < n; ++i) out.top_logprobs.push_back({ids[i], logprobs[ids[i]]});
  }
  ++counts_[chosen];
  return out;
}

}  // namespace expertmesh
