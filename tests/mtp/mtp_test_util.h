// Shared by the MTP tests: deterministic prompts and a chi-square goodness-of-fit test
// (categories with an expected count under 5 pooled; the critical value at significance
// 0.001 from the Wilson-Hilferty approximation of the chi-square quantile, within 1% of the
// exact value for df >= 2).
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <vector>

#include "core/decode/sampling.h"

namespace expertmesh::testing {

// n prompts of 3..10 tokens, ids in [2, vocab) (0 = bos, 1 = eos), fixed seed.
inline std::vector<std::vector<int32_t>> MtpTestPrompts(int n, int vocab, uint64_t seed = 7) {
  Rng rng(seed);
  std::vector<std::vector<int32_t>> out(n);
  for (int i = 0; i < n; ++i) {
    const int len = 3 + i % 8;
    for (int j = 0; j < len; ++j) {
      out[i].push_back(2 + static_cast<int32_t>(rng.Next() % static_cast<uint64_t>(vocab - 2)));
    }
  }
  return out;
}

struct ChiSquare {
  double statistic = 0;
  int df = 0;
  double critical_001 = 0;  // reject equality at significance 0.001 above this
};

// Observed counts (n draws) against expected probabilities.
template <typename Key>
ChiSquare ChiSquareGoodnessOfFit(const std::map<Key, int>& observed,
                                 const std::map<Key, double>& expected, int64_t n) {
  ChiSquare c;
  double pooled_e = 0, pooled_o = 0;
  int categories = 0;
  int64_t matched = 0;
  for (const auto& [key, p] : expected) {
    const double e = p * static_cast<double>(n);
    auto it = observed.find(key);
    const double o = it == observed.end() ? 0.0 : it->second;
    matched += static_cast<int64_t>(o);
    if (e < 5.0) {
      pooled_e += e;
      pooled_o += o;
      continue;
    }
    c.statistic += (o - e) * (o - e) / e;
    ++categories;
  }
  // Draws outside the expected support count against the pooled bucket.
  pooled_o += static_cast<double>(n - matched);
  if (pooled_e > 0 || pooled_o > 0) {
    const double e = std::max(pooled_e, 1e-9);
    c.statistic += (pooled_o - e) * (pooled_o - e) / e;
    ++categories;
  }
  c.df = std::max(1, categories - 1);
  const double z = 3.090232;  // standard normal quantile at 0.999
  const double a = 2.0 / (9.0 * c.df);
  c.critical_001 = c.df * std::pow(1.0 - a + z * std::sqrt(a), 3);
  return c;
}

}  // namespace expertmesh::testing
