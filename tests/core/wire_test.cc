// The tensor wire layout (core/format/wire.h) pinned: exact byte positions, round trips, and the
// size checks of the unpacking side.
#include "core/format/wire.h"

#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "core/numerics/numerics.h"
#include "core/numerics/quant.h"

namespace expertmesh {
namespace {

QuantizedActivations MakeActivations(int64_t n_rows, int64_t dim) {
  std::vector<float> x(n_rows * dim);
  for (int64_t i = 0; i < n_rows * dim; ++i)
    x[i] = 0.01f * static_cast<float>((i * 37) % 201 - 100);
  return QuantizeActivations(x, n_rows, dim);
}

TEST(WireTest, ActivationLayoutIsRowMajorFp8ThenLittleEndianFloatScales) {
  const QuantizedActivations x = MakeActivations(3, 300);  // 3 groups, the last ragged (44)
  ASSERT_EQ(x.groups(), 3);
  std::string act, scales;
  PackAllActivations(x, &act, &scales);
  ASSERT_EQ(act.size(), ActivationBytes(3, 300));
  ASSERT_EQ(scales.size(), ScaleBytes(3, 300));
  EXPECT_EQ(scales.size(), 3u * 3u * 4u);
  for (int64_t i = 0; i < 3 * 300; ++i) EXPECT_EQ(static_cast<uint8_t>(act[i]), x.fp8[i]);
  // Scale of row 2, group 1 sits at byte (2 * 3 + 1) * 4, little-endian IEEE float.
  uint32_t bits;
  std::memcpy(&bits, &x.scales[2 * 3 + 1], 4);
  for (int b = 0; b < 4; ++b) {
    EXPECT_EQ(static_cast<uint8_t>(scales[(2 * 3 + 1) * 4 + b]), (bits >> (8 * b)) & 0xff);
  }
}

TEST(WireTest, ActivationRoundTripIsExact) {
  const QuantizedActivations x = MakeActivations(5, 320);
  std::string act, scales;
  PackAllActivations(x, &act, &scales);
  absl::StatusOr<QuantizedActivations> y = UnpackActivations(act, scales, 5, 320);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_EQ(y->n_rows, 5);
  EXPECT_EQ(y->dim, 320);
  EXPECT_EQ(y->fp8, x.fp8);
  EXPECT_EQ(y->scales, x.scales);  // bitwise: float == on identical bits
}

TEST(WireTest, PackSelectedRowsInTheGivenOrder) {
  const QuantizedActivations x = MakeActivations(6, 256);
  const std::vector<int32_t> rows = {4, 1, 5};
  std::string act, scales;
  PackActivationRows(x, rows, &act, &scales);
  absl::StatusOr<QuantizedActivations> y = UnpackActivations(act, scales, 3, 256);
  ASSERT_TRUE(y.ok()) << y.status();
  for (size_t i = 0; i < rows.size(); ++i) {
    for (int64_t c = 0; c < 256; ++c) EXPECT_EQ(y->fp8[i * 256 + c], x.fp8[rows[i] * 256 + c]);
    for (int64_t g = 0; g < 2; ++g) EXPECT_EQ(y->scales[i * 2 + g], x.scales[rows[i] * 2 + g]);
  }
}

TEST(WireTest, UnpackRejectsEveryWrongSize) {
  const QuantizedActivations x = MakeActivations(2, 200);
  std::string act, scales;
  PackAllActivations(x, &act, &scales);
  EXPECT_FALSE(UnpackActivations(act.substr(1), scales, 2, 200).ok());
  EXPECT_FALSE(UnpackActivations(act, scales.substr(4), 2, 200).ok());
  EXPECT_FALSE(UnpackActivations(act, scales, 3, 200).ok());
  EXPECT_FALSE(UnpackActivations(act, scales, 2, 199).ok());
  EXPECT_FALSE(UnpackActivations(act, scales, 2, 0).ok());
  EXPECT_FALSE(UnpackActivations(act, scales, -1, 200).ok());
}

TEST(WireTest, OutputsAreBf16RowsAndRoundTripExactlyForBf16Values) {
  std::vector<float> rows(2 * 130);
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i] = Bf16ToFloat(FloatToBf16(0.37f * static_cast<float>(i) - 20.0f));  // bf16-exact
  }
  std::string bytes;
  PackOutputRows(rows, &bytes);
  ASSERT_EQ(bytes.size(), OutputBytes(2, 130));
  uint16_t first;
  std::memcpy(&first, bytes.data(), 2);
  EXPECT_EQ(first, FloatToBf16(rows[0]));
  std::vector<float> back(rows.size());
  ASSERT_TRUE(UnpackOutputRows(bytes, 2, 130, back).ok());
  EXPECT_EQ(back, rows);
  EXPECT_FALSE(UnpackOutputRows(bytes.substr(2), 2, 130, back).ok());
}

TEST(WireTest, OutputsRoundToNearestBf16) {
  const std::vector<float> rows = {1.0f + 1.0f / 512.0f, -3.14159f, 1e-3f};
  std::string bytes;
  PackOutputRows(rows, &bytes);
  std::vector<float> back(3);
  ASSERT_TRUE(UnpackOutputRows(bytes, 1, 3, back).ok());
  for (int i = 0; i < 3; ++i) EXPECT_EQ(back[i], Bf16ToFloat(FloatToBf16(rows[i])));
  EXPECT_EQ(back[0], 1.0f);  // the tie 1 + 2^-9 rounds to even
}

TEST(WireTest, AccumulateAddsRowsAtTheirIndices) {
  const std::vector<float> rows = {1.0f, 2.0f, 3.0f, 4.0f};  // 2 rows of 2
  std::string bytes;
  PackOutputRows(rows, &bytes);
  std::vector<float> out = {10.0f, 10.0f, 20.0f, 20.0f, 30.0f, 30.0f};  // 3 rows
  const std::vector<int32_t> index = {2, 0};
  ASSERT_TRUE(AccumulateOutputRows(bytes, index, 2, out).ok());
  EXPECT_EQ(out, (std::vector<float>{13.0f, 14.0f, 20.0f, 20.0f, 31.0f, 32.0f}));
  const std::vector<int32_t> bad = {3, 0};
  EXPECT_FALSE(AccumulateOutputRows(bytes, bad, 2, out).ok());
  const std::vector<int32_t> short_index = {0};
  EXPECT_FALSE(AccumulateOutputRows(bytes, short_index, 2, out).ok());
}

TEST(WireTest, FingerprintIsStableAndSensitive) {
  const std::string a = ModelFingerprint("{\"hidden_size\": 256}");
  EXPECT_EQ(a, ModelFingerprint("{\"hidden_size\": 256}"));
  EXPECT_NE(a, ModelFingerprint("{\"hidden_size\": 257}"));
  // FNV-1a 64 of the empty string is its offset basis.
  EXPECT_EQ(ModelFingerprint(""), "fnv1a64:cbf29ce484222325");
  EXPECT_EQ(ModelFingerprint("a"), "fnv1a64:af63dc4c8601ec8c");
  EXPECT_FALSE(ModelFingerprintOfDir("/nonexistent-dir").ok());
}

}  // namespace
}  // namespace expertmesh
