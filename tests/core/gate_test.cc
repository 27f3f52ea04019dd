// The MoE gate (noaux_tc, sigmoid): selection on biased scores, weights from unbiased ones,
// group limiting (sum of the two largest per group, others -inf), ties to the lowest index.
#include "core/model/gate.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace expertmesh {
namespace {

GateParams Params(int64_t n_experts, int64_t n_group, int64_t topk_group, int64_t k,
                  bool norm = true, double scale = 1.0) {
  GateParams p;
  p.n_routed_experts = n_experts;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.num_experts_per_tok = k;
  p.norm_topk_prob = norm;
  p.routed_scaling_factor = scale;
  return p;
}

std::vector<int32_t> Row(const ExpertRoutes& r, int64_t row) {
  return {r.experts.begin() + r.offsets[row], r.experts.begin() + r.offsets[row + 1]};
}

TEST(GateTest, BiasSelectsButWeightsUseUnbiasedScores) {
  // Expert 3 has the lowest score but a bias that lifts it into the top 2.
  const std::vector<float> s = {0.9f, 0.8f, 0.7f, 0.1f};
  const std::vector<float> bias = {0.0f, 0.0f, 0.0f, 1.0f};
  ExpertRoutes r = SelectExperts(Params(4, 1, 1, 2, /*norm=*/true, 2.5), s, bias, 1);
  EXPECT_EQ(Row(r, 0), (std::vector<int32_t>{0, 3}));  // ascending
  // Weights: s / (0.9 + 0.1) * 2.5.
  EXPECT_FLOAT_EQ(r.weights[0], 0.9f / 1.0f * 2.5f);
  EXPECT_FLOAT_EQ(r.weights[1], 0.1f / 1.0f * 2.5f);
}

TEST(GateTest, WithoutNormTheWeightsAreScaledScores) {
  const std::vector<float> s = {0.2f, 0.6f, 0.4f};
  const std::vector<float> bias(3, 0.0f);
  ExpertRoutes r = SelectExperts(Params(3, 1, 1, 2, /*norm=*/false, 1.5), s, bias, 1);
  EXPECT_EQ(Row(r, 0), (std::vector<int32_t>{1, 2}));
  EXPECT_FLOAT_EQ(r.weights[0], 0.6f * 1.5f);
  EXPECT_FLOAT_EQ(r.weights[1], 0.4f * 1.5f);
}

TEST(GateTest, GroupScoreIsTheSumOfTheTwoLargest) {
  // 3 groups of 3. Group 0 has the single best expert (0.95) but a weak second (0.1):
  // group scores 1.05, 1.2 (0.6 + 0.6), 1.3 (0.7 + 0.6). topk_group 2 keeps groups 1 and 2,
  // so expert 0 is excluded although it has the highest score.
  const std::vector<float> s = {0.95f, 0.1f, 0.05f, 0.6f, 0.6f, 0.0f, 0.7f, 0.6f, 0.2f};
  const std::vector<float> bias(9, 0.0f);
  ExpertRoutes r = SelectExperts(Params(9, 3, 2, 3), s, bias, 1);
  EXPECT_EQ(Row(r, 0), (std::vector<int32_t>{3, 4, 6}));  // 0.7, 0.6, 0.6 (3 before 7: ties)
  // With all groups kept, expert 0 comes back.
  ExpertRoutes all = SelectExperts(Params(9, 3, 3, 3), s, bias, 1);
  EXPECT_EQ(Row(all, 0), (std::vector<int32_t>{0, 3, 6}));
}

TEST(GateTest, ExcludedGroupsAreMinusInfinityNotZero) {
  // Biased scores: group 0 = {-1.5, -1.5} (group score -3), group 1 = {-0.9, -0.9} (-1.8).
  // Group 1 is kept; its experts score below 0, so excluded experts filled with 0 instead of
  // -inf would win.
  const std::vector<float> s = {0.5f, 0.5f, 0.1f, 0.1f};
  const std::vector<float> bias = {-2.0f, -2.0f, -1.0f, -1.0f};
  ExpertRoutes r = SelectExperts(Params(4, 2, 1, 2), s, bias, 1);
  EXPECT_EQ(Row(r, 0), (std::vector<int32_t>{2, 3}));
}

TEST(GateTest, TiesGoToTheLowestIndex) {
  const std::vector<float> s(8, 0.5f);
  const std::vector<float> bias(8, 0.0f);
  // Equal experts: the lowest ids. Equal groups: the lowest groups.
  EXPECT_EQ(Row(SelectExperts(Params(8, 1, 1, 3), s, bias, 1), 0), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(Row(SelectExperts(Params(8, 4, 2, 3), s, bias, 1), 0), (std::vector<int32_t>{0, 1, 2}));
  // Equal scores in groups 1 and 3 beat group 0; tie between groups 1 and 3 at topk_group 1.
  std::vector<float> t = {0.1f, 0.1f, 0.9f, 0.9f, 0.1f, 0.1f, 0.9f, 0.9f};
  EXPECT_EQ(Row(SelectExperts(Params(8, 4, 1, 2), t, bias, 1), 0), (std::vector<int32_t>{2, 3}));
}

TEST(GateTest, RowsAreIndependent) {
  const std::vector<float> bias = {0.0f, 0.1f, 0.0f, -0.1f};
  const std::vector<float> a = {0.3f, 0.2f, 0.9f, 0.4f};
  const std::vector<float> b = {0.8f, 0.1f, 0.2f, 0.7f};
  std::vector<float> both = a;
  both.insert(both.end(), b.begin(), b.end());
  const GateParams p = Params(4, 2, 1, 2, true, 2.0);
  ExpertRoutes r = SelectExperts(p, both, bias, 2);
  ExpertRoutes ra = SelectExperts(p, a, bias, 1), rb = SelectExperts(p, b, bias, 1);
  EXPECT_EQ(Row(r, 0), Row(ra, 0));
  EXPECT_EQ(Row(r, 1), Row(rb, 0));
  EXPECT_EQ(r.weights[2], rb.weights[0]);
  EXPECT_EQ(r.weights[3], rb.weights[1]);
}

TEST(GateTest, RunGateAppliesSigmoidToTheLogits) {
  // x . w = logits {0, ln 3, -ln 3} -> s = {0.5, 0.75, 0.25}.
  GateWeights g;
  g.weight = {0.0f, 0.0f, std::log(3.0f), 0.0f, -std::log(3.0f), 0.0f};  // [3, 2]
  g.e_score_correction_bias = {0.0f, 0.0f, 0.0f};
  const std::vector<float> x = {1.0f, 5.0f};
  ExpertRoutes r = RunGate(Params(3, 1, 1, 2, false, 1.0), g, x, 1, 2);
  EXPECT_EQ(Row(r, 0), (std::vector<int32_t>{0, 1}));
  EXPECT_NEAR(r.weights[0], 0.5f, 1e-6f);
  EXPECT_NEAR(r.weights[1], 0.75f, 1e-6f);
}

TEST(GateTest, FromConfigRejectsUnservableValues) {
  ModelConfig c;
  c.n_routed_experts = 8;
  c.n_group = 3;  // not a divisor
  c.topk_group = 1;
  c.num_experts_per_tok = 2;
  EXPECT_FALSE(GateParams::FromConfig(c).ok());
  c.n_group = 4;
  EXPECT_TRUE(GateParams::FromConfig(c).ok());
  c.num_experts_per_tok = 3;  // only 2 experts in topk_group = 1 group
  EXPECT_FALSE(GateParams::FromConfig(c).ok());
  c.num_experts_per_tok = 2;
  c.scoring_func = "softmax";
  EXPECT_FALSE(GateParams::FromConfig(c).ok());
}

}  // namespace
}  // namespace expertmesh
