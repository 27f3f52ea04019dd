// FP8 E4M3 / BF16 / FP16 conversions against PyTorch's own conversions (golden files written
// by tools/golden/make_numerics_golden.py). Every comparison is bit-exact.
#include "core/numerics/numerics.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "tests/core/golden_json.h"

namespace expertmesh {
namespace {

using testing::ReadGoldenJson;

float FromBits(uint64_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits)); }

TEST(Fp8E4M3, DecodesAll256CodesAsTorch) {
  const boost::json::value golden = ReadGoldenJson("tests/golden/fp8_e4m3.json");
  const boost::json::array& decode = golden.at("decode_f32_bits").as_array();
  ASSERT_EQ(decode.size(), 256u);
  for (int code = 0; code < 256; ++code) {
    const float expected = FromBits(decode[code].to_number<uint64_t>());
    const float got = Fp8E4M3ToFloat(static_cast<uint8_t>(code));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << "code " << code;
    } else {
      EXPECT_EQ(std::bit_cast<uint32_t>(got), std::bit_cast<uint32_t>(expected))
          << "code " << code << " got " << got << " torch " << expected;
    }
  }
}

TEST(Fp8E4M3, KnownValues) {
  EXPECT_EQ(Fp8E4M3ToFloat(0x7E), 448.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0xFE), -448.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(Fp8E4M3ToFloat(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(Fp8E4M3ToFloat(0x38), 1.0f);
  EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(0x7F)));
  EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(0xFF)));
  EXPECT_EQ(FloatToFp8E4M3(std::nanf("")), 0x7F);
  EXPECT_EQ(FloatToFp8E4M3(-std::nanf("")), 0xFF);
  EXPECT_EQ(FloatToFp8E4M3(INFINITY), 0x7E);  // saturates, like torch
  EXPECT_EQ(FloatToFp8E4M3(-INFINITY), 0xFE);
  EXPECT_EQ(FloatToFp8E4M3(-0.0f), 0x80);
}

// The golden inputs hold every midpoint between adjacent codes, each +- 1 float32 ulp, every
// code value +- 1 ulp, the saturation range, specials and random values.
TEST(Fp8E4M3, EncodesLikeTorchIncludingEveryRoundingBoundary) {
  const boost::json::value golden = ReadGoldenJson("tests/golden/fp8_e4m3.json");
  const boost::json::array& cases = golden.at("encode").as_array();
  ASSERT_GT(cases.size(), 3000u);
  int mismatches = 0;
  for (const boost::json::value& c : cases) {
    const float x = FromBits(c.as_array()[0].to_number<uint64_t>());
    const int expected = c.as_array()[1].to_number<int>();
    const int got = FloatToFp8E4M3(x);
    if (got != expected && ++mismatches <= 20) {
      ADD_FAILURE() << "x=" << x << " (bits 0x" << std::hex << std::bit_cast<uint32_t>(x)
                    << ") got 0x" << got << " torch 0x" << expected;
    }
  }
  EXPECT_EQ(mismatches, 0);
}

// Ties go to the even code: midway between codes 2k and 2k+1 -> 2k; between 2k+1 and 2k+2
// -> 2k+2. Independent of the golden file.
TEST(Fp8E4M3, TiesToEvenOnAllMidpoints) {
  for (int code = 0; code < 0x7E; ++code) {
    const double lo = Fp8E4M3ToFloat(static_cast<uint8_t>(code));
    const double hi = Fp8E4M3ToFloat(static_cast<uint8_t>(code + 1));
    const float mid = static_cast<float>((lo + hi) / 2);
    ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2) << "midpoint not exact in float";
    const int even = (code % 2 == 0) ? code : code + 1;
    EXPECT_EQ(FloatToFp8E4M3(mid), even) << "code " << code;
    EXPECT_EQ(FloatToFp8E4M3(std::nextafter(mid, 0.0f)), code) << "code " << code;
    EXPECT_EQ(FloatToFp8E4M3(std::nextafter(mid, 1e9f)), code + 1) << "code " << code;
    EXPECT_EQ(FloatToFp8E4M3(-mid), 0x80 | even) << "code " << code;
  }
}

TEST(Fp8E4M3, RoundTripsEveryFiniteCode) {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7F) == 0x7F) continue;
    EXPECT_EQ(FloatToFp8E4M3(Fp8E4M3ToFloat(static_cast<uint8_t>(code))), code);
  }
}

TEST(Fp8E4M3, BulkDecodeMatchesScalar) {
  std::vector<uint8_t> codes(256);
  for (int i = 0; i < 256; ++i) codes[i] = static_cast<uint8_t>(i);
  std::vector<float> out(256);
  Fp8E4M3ToFloat(codes, out);
  for (int i = 0; i < 256; ++i) {
    EXPECT_EQ(std::bit_cast<uint32_t>(out[i]), std::bit_cast<uint32_t>(Fp8E4M3Table()[i]));
  }
}

void CheckHalfEncodes(const char* name, uint16_t (*encode)(float)) {
  const boost::json::value golden = ReadGoldenJson("tests/golden/bf16_fp16.json");
  const boost::json::array& cases = golden.at(name).at("encode").as_array();
  ASSERT_GT(cases.size(), 500u) << name;
  int mismatches = 0;
  for (const boost::json::value& c : cases) {
    const float x = FromBits(c.as_array()[0].to_number<uint64_t>());
    const int expected = c.as_array()[1].to_number<int>();
    const int got = encode(x);
    if (got != expected && ++mismatches <= 20) {
      ADD_FAILURE() << name << ": x=" << x << " (bits 0x" << std::hex << std::bit_cast<uint32_t>(x)
                    << ") got 0x" << got << " torch 0x" << expected;
    }
  }
  EXPECT_EQ(mismatches, 0) << name;
}

TEST(Bf16, EncodesLikeTorch) { CheckHalfEncodes("bf16", &FloatToBf16); }
TEST(Fp16, EncodesLikeTorch) { CheckHalfEncodes("fp16", &FloatToFp16); }

TEST(Fp16, DecodesLikeTorch) {
  const boost::json::value golden = ReadGoldenJson("tests/golden/bf16_fp16.json");
  const boost::json::array& cases = golden.at("fp16").at("decode").as_array();
  ASSERT_GT(cases.size(), 500u);
  for (const boost::json::value& c : cases) {
    const uint16_t code = c.as_array()[0].to_number<uint16_t>();
    const float expected = FromBits(c.as_array()[1].to_number<uint64_t>());
    const float got = Fp16ToFloat(code);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << code;
    } else {
      EXPECT_EQ(std::bit_cast<uint32_t>(got), std::bit_cast<uint32_t>(expected)) << code;
    }
  }
}

TEST(Bf16, DecodeIsExactAndRoundTrips) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float x = Bf16ToFloat(static_cast<uint16_t>(bits));
    ASSERT_EQ(std::bit_cast<uint32_t>(x), bits << 16);
    if (!std::isnan(x)) {
      ASSERT_EQ(FloatToBf16(x), bits);
    }
  }
}

TEST(Fp16, EveryCodeRoundTrips) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float x = Fp16ToFloat(static_cast<uint16_t>(bits));
    if (std::isnan(x)) continue;
    ASSERT_EQ(FloatToFp16(x), bits) << std::hex << bits;
  }
}

TEST(HalfFormats, NanStaysNan) {
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(FloatToFp16(std::nanf("")))));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(FloatToFp16(-std::nanf("")))));
  // A signalling-looking NaN whose payload sits only in the low bits must not become inf.
  const float low_payload_nan = std::bit_cast<float>(0x7F800001u);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(low_payload_nan))));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(FloatToFp16(low_payload_nan))));
}

TEST(Bf16, BulkMatchesScalar) {
  const std::vector<float> in = {0.0f, 1.0f, -3.14159f, 1e-40f, 6.5e4f, 3.4e38f};
  std::vector<uint16_t> bits(in.size());
  FloatToBf16(in, bits);
  std::vector<float> back(in.size());
  Bf16ToFloat(bits, back);
  for (size_t i = 0; i < in.size(); ++i) {
    EXPECT_EQ(bits[i], FloatToBf16(in[i]));
    EXPECT_EQ(back[i], Bf16ToFloat(FloatToBf16(in[i])));
  }
}

}  // namespace
}  // namespace expertmesh
