// Host-side grouping of (row, expert) pairs for the grouped GEMM: contiguous layout, gather and
// scatter maps, tile schedule, and the reference combine. Integer outcomes compared exactly.
#include "core/kernels/plan/expert_layout.h"

#include <random>

#include "gtest/gtest.h"

namespace expertmesh {
namespace {

ExpertRoutes MakeRoutes(const std::vector<std::vector<int32_t>>& rows) {
  ExpertRoutes routes;
  for (const auto& experts : rows) {
    std::vector<float> w;
    for (int32_t e : experts) w.push_back(0.5f + 0.01f * e);
    routes.AddRow(experts, w);
  }
  return routes;
}

TEST(ExpertLayoutTest, GroupsSlotsByExpertInRowOrder) {
  // Row 0: experts 1, 3; row 1: expert 3; row 2: none; row 3: experts 0, 1, 3.
  const ExpertRoutes routes = MakeRoutes({{1, 3}, {3}, {}, {0, 1, 3}});
  absl::StatusOr<ExpertLayout> layout = BuildExpertLayout(routes, 5);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->expert_offsets, (std::vector<int32_t>{0, 1, 3, 3, 6, 6}));
  EXPECT_EQ(layout->slot_row, (std::vector<int32_t>{3, 0, 3, 0, 1, 3}));
  EXPECT_EQ(layout->slot_weight, (std::vector<float>{0.5f, 0.51f, 0.51f, 0.53f, 0.53f, 0.53f}));
  // row_slots follows the routes' pair order (ascending expert within a row).
  EXPECT_EQ(layout->row_slots, (std::vector<int32_t>{1, 3, 4, 0, 2, 5}));
  EXPECT_EQ(layout->max_rows_per_expert(), 3);
  EXPECT_EQ(layout->active_experts(), 3);
  EXPECT_EQ(layout->n_rows(), 4);
  EXPECT_EQ(layout->n_slots(), 6);
}

TEST(ExpertLayoutTest, RandomRoutesRoundTrip) {
  std::mt19937 rng(7);
  const int32_t n_experts = 37;
  ExpertRoutes routes;
  for (int r = 0; r < 300; ++r) {
    std::vector<int32_t> experts;
    for (int32_t e = 0; e < n_experts; ++e) {
      if (rng() % 9 == 0) experts.push_back(e);
    }
    std::vector<float> w(experts.size());
    for (float& x : w) x = static_cast<float>(rng() % 1000) / 1000.0f;
    routes.AddRow(experts, w);
  }
  absl::StatusOr<ExpertLayout> layout = BuildExpertLayout(routes, n_experts);
  ASSERT_TRUE(layout.ok()) << layout.status();
  // Every pair maps to a slot of its expert holding its row and weight; slots are a permutation.
  std::vector<int> seen(layout->n_slots(), 0);
  for (int64_t r = 0; r < routes.n_rows(); ++r) {
    for (int32_t p = routes.offsets[r]; p < routes.offsets[r + 1]; ++p) {
      const int32_t slot = layout->row_slots[p];
      const int32_t e = routes.experts[p];
      ASSERT_GE(slot, layout->expert_offsets[e]);
      ASSERT_LT(slot, layout->expert_offsets[e + 1]);
      EXPECT_EQ(layout->slot_row[slot], r);
      EXPECT_EQ(layout->slot_weight[slot], routes.weights[p]);
      ++seen[slot];
    }
  }
  for (int count : seen) EXPECT_EQ(count, 1);
  // Within an expert, rows ascend (stable grouping).
  for (int32_t e = 0; e < n_experts; ++e) {
    for (int32_t s = layout->expert_offsets[e] + 1; s < layout->expert_offsets[e + 1]; ++s) {
      EXPECT_LT(layout->slot_row[s - 1], layout->slot_row[s]);
    }
  }
}

TEST(ExpertLayoutTest, RejectsBadRoutes) {
  EXPECT_FALSE(BuildExpertLayout(MakeRoutes({{0, 5}}), 5).ok());  // expert out of range
  EXPECT_FALSE(BuildExpertLayout(MakeRoutes({{2, 1}}), 5).ok());  // not ascending
  EXPECT_FALSE(BuildExpertLayout(MakeRoutes({{1, 1}}), 5).ok());  // duplicate
  EXPECT_FALSE(BuildExpertLayout(MakeRoutes({{1}}), 0).ok());     // no experts
  ExpertRoutes nan_weight;
  const int32_t e = 1;
  const float w = std::numeric_limits<float>::quiet_NaN();
  nan_weight.AddRow({&e, 1}, {&w, 1});
  EXPECT_FALSE(BuildExpertLayout(nan_weight, 5).ok());
  ExpertRoutes short_weights = MakeRoutes({{1, 2}});
  short_weights.weights.pop_back();
  EXPECT_FALSE(BuildExpertLayout(short_weights, 5).ok());
}

TEST(ExpertLayoutTest, EmptyBatch) {
  absl::StatusOr<ExpertLayout> layout = BuildExpertLayout(ExpertRoutes{}, 4);
  ASSERT_TRUE(layout.ok());
  EXPECT_EQ(layout->n_slots(), 0);
  EXPECT_EQ(layout->n_rows(), 0);
  EXPECT_TRUE(BuildTileSchedule(*layout, 16).empty());
}

TEST(TileScheduleTest, RaggedGroupsAndEmptyExperts) {
  // Expert 0: 20 rows, expert 1: none, expert 2: 16 rows, expert 3: 1 row.
  std::vector<std::vector<int32_t>> rows;
  for (int r = 0; r < 20; ++r)
    rows.push_back(r < 16 ? std::vector<int32_t>{0, 2} : std::vector<int32_t>{0});
  rows.push_back({3});
  absl::StatusOr<ExpertLayout> layout = BuildExpertLayout(MakeRoutes(rows), 4);
  ASSERT_TRUE(layout.ok());
  EXPECT_EQ(BuildTileSchedule(*layout, 16),
            (std::vector<GemmTile>{{0, 0, 16}, {0, 16, 20}, {2, 20, 36}, {3, 36, 37}}));
  EXPECT_EQ(BuildTileSchedule(*layout, 64),
            (std::vector<GemmTile>{{0, 0, 20}, {2, 20, 36}, {3, 36, 37}}));
}

TEST(CombineSlotsTest, SumsInAscendingExpertOrder) {
  const ExpertRoutes routes = MakeRoutes({{0, 2}, {1}, {}});
  absl::StatusOr<ExpertLayout> layout = BuildExpertLayout(routes, 3);
  ASSERT_TRUE(layout.ok());
  // Slots: expert 0 -> row 0 (slot 0), expert 1 -> row 1 (slot 1), expert 2 -> row 0 (slot 2).
  // Row 0 sums 1e8 then -1e8 then... values chosen so the order changes the float result.
  const std::vector<float> slot_out = {1e8f, 1.0f, 7.0f, 2.0f, -1e8f, 0.5f};
  std::vector<float> out(3 * 2, -1.0f);
  CombineSlots(*layout, slot_out, 2, out);
  EXPECT_EQ(out, (std::vector<float>{(0.0f + 1e8f) + -1e8f, (0.0f + 1.0f) + 0.5f, 7.0f, 2.0f, 0.0f,
                                     0.0f}));
}

}  // namespace
}  // namespace expertmesh
