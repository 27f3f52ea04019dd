// DeepSeek block quantization against PyTorch (tests/golden/quant.json, written by
// tools/golden/make_quant_golden.py): weight blocks (ragged edges, an all-zero block) and
// per-token 1 x 128 activation groups (an all-zero group, a group below the amax floor).
// Codes and scales are compared bitwise; error bounds come from the E4M3 format itself.
#include "core/numerics/quant.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "core/numerics/numerics.h"
#include "gtest/gtest.h"
#include "tests/core/golden_json.h"

namespace expertmesh {
namespace {

using testing::ReadGoldenJson;

// The generator's closed formula (see make_quant_golden.py); every step is exactly rounded.
std::vector<float> Pattern(int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols,
                           int64_t salt) {
  std::vector<float> w(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float num = static_cast<float>(((r * 131 + c * 71 + salt) % 1001) - 500);
      const int exp = static_cast<int>(r / block_rows - 2 * (c / block_cols));
      w[r * cols + c] = std::ldexp(num / 37.0f, exp);
    }
  }
  return w;
}

std::vector<uint8_t> FromHex(const boost::json::string& hex) {
  std::vector<uint8_t> out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = static_cast<uint8_t>(std::stoi(std::string(hex.data() + 2 * i, 2), nullptr, 16));
  }
  return out;
}

std::vector<float> FloatsFromBits(const boost::json::array& bits) {
  std::vector<float> out;
  for (const auto& b : bits) out.push_back(std::bit_cast<float>(b.to_number<uint32_t>()));
  return out;
}

TEST(QuantizeWeightBlocks, MatchesTorchBitwise) {
  const boost::json::value golden = ReadGoldenJson("tests/golden/quant.json");
  for (const boost::json::value& c : golden.at("weights").as_array()) {
    const int64_t rows = c.at("rows").to_number<int64_t>();
    const int64_t cols = c.at("cols").to_number<int64_t>();
    const BlockShape block{c.at("block").as_array()[0].to_number<int>(),
                           c.at("block").as_array()[1].to_number<int>()};
    std::vector<float> w =
        Pattern(rows, cols, block.rows, block.cols, c.at("salt").to_number<int64_t>());
    if (c.at("zero_block").as_bool()) {
      for (int64_t r = 0; r < block.rows; ++r) {
        for (int64_t col = block.cols; col < std::min<int64_t>(cols, 2 * block.cols); ++col) {
          w[r * cols + col] = 0.0f;
        }
      }
    }
    const int64_t nb = NumBlocks(rows, block.rows) * NumBlocks(cols, block.cols);
    std::vector<uint8_t> fp8(rows * cols);
    std::vector<float> scale_inv(nb);
    QuantizeWeightBlocks(w, rows, cols, block, fp8, scale_inv);

    const std::vector<float> want_scales = FloatsFromBits(c.at("scale_inv_bits").as_array());
    ASSERT_EQ(scale_inv.size(), want_scales.size());
    for (int64_t i = 0; i < nb; ++i) EXPECT_EQ(scale_inv[i], want_scales[i]) << "block " << i;
    EXPECT_EQ(scale_inv[1], 1.0f) << "an all-zero block has scale_inv 1";
    const std::vector<uint8_t> want_fp8 = FromHex(c.at("fp8_hex").as_string());
    ASSERT_EQ(fp8.size(), want_fp8.size());
    int mismatches = 0;
    for (size_t i = 0; i < fp8.size(); ++i) mismatches += fp8[i] != want_fp8[i];
    EXPECT_EQ(mismatches, 0) << rows << "x" << cols;

    for (const auto& [row_key, bits] : c.at("dequant_rows").as_object()) {
      const int64_t r = std::stoll(std::string(row_key));
      std::vector<float> out(cols);
      DequantizeWeightRow(fp8.data(), scale_inv.data(), rows, cols, block, r, out.data());
      const std::vector<float> want = FloatsFromBits(bits.as_array());
      for (int64_t col = 0; col < cols; ++col) {
        ASSERT_EQ(out[col], want[col]) << "row " << r << " col " << col;
      }
    }
  }
}

TEST(QuantizeActivations, MatchesTorchBitwise) {
  const boost::json::value golden = ReadGoldenJson("tests/golden/quant.json");
  for (const boost::json::value& c : golden.at("activations").as_array()) {
    const int64_t n_rows = c.at("n_rows").to_number<int64_t>();
    const int64_t dim = c.at("dim").to_number<int64_t>();
    std::vector<float> x = Pattern(n_rows, dim, 1, 128, c.at("salt").to_number<int64_t>());
    for (int64_t i = 128; i < 256; ++i) x[1 * dim + i] = 0.0f;
    if (n_rows > 2) {
      for (int64_t i = 0; i < 128; ++i) x[2 * dim + i] = std::ldexp(x[2 * dim + i], -20);
    }
    const QuantizedActivations q = QuantizeActivations(x, n_rows, dim);
    ASSERT_EQ(q.groups(), NumBlocks(dim, 128));
    const std::vector<float> want_scales = FloatsFromBits(c.at("scale_bits").as_array());
    ASSERT_EQ(q.scales.size(), want_scales.size());
    for (size_t i = 0; i < q.scales.size(); ++i) EXPECT_EQ(q.scales[i], want_scales[i]) << i;
    const std::vector<uint8_t> want_fp8 = FromHex(c.at("fp8_hex").as_string());
    ASSERT_EQ(q.fp8.size(), want_fp8.size());
    for (size_t i = 0; i < q.fp8.size(); ++i) {
      ASSERT_EQ(q.fp8[i], want_fp8[i]) << "element " << i;
    }
  }
}

TEST(QuantizeActivations, ZeroGroupGivesZerosAndFloorScale) {
  std::vector<float> x(2 * 256, 0.0f);
  for (int i = 0; i < 128; ++i) x[i] = 0.5f;  // row 0 group 0 non-zero, the rest zero
  const QuantizedActivations q = QuantizeActivations(x, 2, 256);
  EXPECT_EQ(q.scales[0], 0.5f / 448.0f);
  EXPECT_EQ(q.scales[1], kActQuantMinAmax / 448.0f);
  std::vector<float> back(x.size());
  DequantizeActivations(q, back);
  for (size_t i = 128; i < x.size(); ++i) EXPECT_EQ(back[i], 0.0f) << i;  // no NaN
  for (int i = 0; i < 128; ++i) EXPECT_EQ(back[i], 0.5f);
}

// Random data over many magnitudes: the dequantized value is within half an E4M3 ulp of x.
// E4M3 has 3 mantissa bits, so for |x|/scale in the normal range (>= 2^-6) the relative error
// is at most 2^-4; below it the absolute error is at most 2^-10 * scale (half the subnormal
// step 2^-9). Plus a little slack for the float32 division x / scale (1 ulp of float32).
TEST(QuantizeActivations, ErrorWithinHalfUlpOfE4M3) {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_mag(-6.0f, 4.0f);
  const int64_t n_rows = 16, dim = 7 * 128 + 40;  // a ragged last group
  std::vector<float> x(n_rows * dim);
  for (int64_t r = 0; r < n_rows; ++r) {
    const float mag = std::pow(10.0f, log_mag(rng));
    for (int64_t c = 0; c < dim; ++c) x[r * dim + c] = normal(rng) * mag;
  }
  const QuantizedActivations q = QuantizeActivations(x, n_rows, dim);
  std::vector<float> back(x.size());
  DequantizeActivations(q, back);
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t c = 0; c < dim; ++c) {
      const float s = q.scales[r * q.groups() + c / 128];
      const float v = std::fabs(x[r * dim + c]) / s;
      EXPECT_LE(v, 448.0f * (1 + 1e-6f));
      const float bound = v >= 0.015625f ? std::fabs(x[r * dim + c]) * 0.0625f * (1 + 1e-6f)
                                         : s * std::ldexp(1.0f, -10) * (1 + 1e-6f);
      ASSERT_LE(std::fabs(back[r * dim + c] - x[r * dim + c]), bound) << r << "," << c;
    }
  }
}

TEST(QuantizeActivations, RowsAreIndependent) {
  // Batch invariance: a row quantizes the same alone and inside a batch.
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const int64_t dim = 384;
  std::vector<float> batch(5 * dim);
  for (float& v : batch) v = normal(rng);
  const QuantizedActivations all = QuantizeActivations(batch, 5, dim);
  for (int64_t r = 0; r < 5; ++r) {
    const QuantizedActivations one =
        QuantizeActivations(std::span<const float>(batch).subspan(r * dim, dim), 1, dim);
    for (int64_t c = 0; c < dim; ++c) ASSERT_EQ(one.fp8[c], all.fp8[r * dim + c]);
    for (int64_t g = 0; g < 3; ++g) ASSERT_EQ(one.scales[g], all.scales[r * 3 + g]);
  }
}

TEST(FakeQuantizeActivations, EqualsQuantizeThenDequantize) {
  std::mt19937 rng(99);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(3 * 200);
  for (float& v : x) v = normal(rng);
  const QuantizedActivations q = QuantizeActivations(x, 3, 200);
  std::vector<float> expected(x.size());
  DequantizeActivations(q, expected);
  FakeQuantizeActivations(x, 3, 200);
  EXPECT_EQ(x, expected);
}

TEST(QuantizeWeightBlocks, RoundTripErrorWithinHalfUlp) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  const int64_t rows = 300, cols = 260;  // ragged in both dimensions
  const BlockShape block{128, 128};
  std::vector<float> w(rows * cols);
  for (float& v : w) v = normal(rng);
  std::vector<uint8_t> fp8(w.size());
  std::vector<float> scale_inv(NumBlocks(rows, 128) * NumBlocks(cols, 128));
  QuantizeWeightBlocks(w, rows, cols, block, fp8, scale_inv);
  std::vector<float> row(cols);
  for (int64_t r = 0; r < rows; ++r) {
    DequantizeWeightRow(fp8.data(), scale_inv.data(), rows, cols, block, r, row.data());
    for (int64_t c = 0; c < cols; ++c) {
      const float s = scale_inv[(r / 128) * 3 + c / 128];
      const float x = w[r * cols + c];
      const float bound = std::fabs(x) / s >= 0.015625f ? std::fabs(x) * 0.0625f * (1 + 1e-6f)
                                                        : s * std::ldexp(1.0f, -10) * (1 + 1e-6f);
      ASSERT_LE(std::fabs(row[c] - x), bound) << r << "," << c;
    }
  }
}

}  // namespace
}  // namespace expertmesh
