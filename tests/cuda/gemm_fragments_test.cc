// The grouped GEMM's fragment addressing (core/kernels/cuda/gemm_fragments.h) run through an
// emulation of the PTX mma.sync fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k32" with
// .e4m3 and "for mma.m16n8k16" with .f16), on the CPU: every warp's accumulators of a whole CTA
// tile must equal the tile product A . B^T, for both MMA paths and both phases (gate/up, down).
// This pins the index math the GPU tests would otherwise only catch on a GPU.
#include "core/kernels/cuda/gemm_fragments.h"

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "core/numerics/numerics.h"
#include "gtest/gtest.h"

namespace expertmesh::cuda::frag {
namespace {

constexpr int kK = 128;      // one pipeline stage
constexpr int kBRows = 256;  // shared B rows
constexpr int kWarps = 8;

uint32_t Word(const std::vector<uint8_t>& smem, int offset) {
  uint32_t w;
  std::memcpy(&w, smem.data() + offset, 4);
  return w;
}

// mma.m16n8k32 .e4m3 per the PTX layout: A word r byte i of lane (g, t) is
// (row g + 8 (r & 1), k 4t + i + 16 (r >> 1)); B word r byte i is (k 4t + i + 16 r, col g);
// D element c of lane (g, t) is (row g + 8 (c >> 1), col 2t + (c & 1)).
void EmulateFp8(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], double (&d)[32][4]) {
  double A[16][32] = {}, B[32][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < 4; ++i)
        A[g + 8 * (r & 1)][4 * t + i + 16 * (r >> 1)] =
            Fp8E4M3ToFloat((a[lane][r] >> (8 * i)) & 0xFF);
    for (int r = 0; r < 2; ++r)
      for (int i = 0; i < 4; ++i)
        B[4 * t + i + 16 * r][g] = Fp8E4M3ToFloat((b[lane][r] >> (8 * i)) & 0xFF);
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int c = 0; c < 4; ++c) {
      const int row = (lane >> 2) + 8 * (c >> 1), col = 2 * (lane & 3) + (c & 1);
      for (int k = 0; k < 32; ++k) d[lane][c] += A[row][k] * B[k][col];
    }
}

// mma.m16n8k16 .f16: A word r half h of lane (g, t) is (row g + 8 (r & 1), k 2t + h + 8 (r >> 1));
// B word r half h is (k 2t + h + 8 r, col g); D as above.
void EmulateF16(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], double (&d)[32][4]) {
  double A[16][16] = {}, B[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h)
        A[g + 8 * (r & 1)][2 * t + h + 8 * (r >> 1)] =
            Fp16ToFloat((a[lane][r] >> (16 * h)) & 0xFFFF);
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h)
        B[2 * t + h + 8 * r][g] = Fp16ToFloat((b[lane][r] >> (16 * h)) & 0xFFFF);
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int c = 0; c < 4; ++c) {
      const int row = (lane >> 2) + 8 * (c >> 1), col = 2 * (lane & 3) + (c & 1);
      for (int k = 0; k < 16; ++k) d[lane][c] += A[row][k] * B[k][col];
    }
}

// Runs one CTA tile (block_m rows x 256 B rows x 128 k) the way the kernel does and checks
// every accumulator against the direct product; also checks each (row, B row) appears once.
void CheckTile(int mt, bool gate_up, bool f16_path) {
  const int block_m = 16 * mt;
  std::mt19937 rng(mt * 4 + gate_up * 2 + f16_path);
  std::vector<uint8_t> a_smem(block_m * kPitch), b_smem(kBRows * kPitch);
  auto code = [&] {
    uint8_t c;
    do c = static_cast<uint8_t>(rng());
    while ((c & 0x7F) == 0x7F);  // no NaN
    return c;
  };
  for (int r = 0; r < block_m; ++r)
    for (int k = 0; k < kK; ++k) a_smem[r * kPitch + k] = code();
  for (int r = 0; r < kBRows; ++r)
    for (int k = 0; k < kK; ++k) b_smem[r * kPitch + k] = code();
  std::vector<int> seen(block_m * kBRows, 0);
  const double unscale = f16_path ? kF16FromFp8Unscale : 1.0;
  for (int warp = 0; warp < kWarps; ++warp) {
    for (int m = 0; m < mt; ++m) {
      for (int j = 0; j < 4; ++j) {
        const int b_row = BRow(gate_up, warp, j);
        double d[32][4] = {};
        for (int ks = 0; ks < kK / 32; ++ks) {
          uint32_t a[32][4], b[32][2];
          for (int lane = 0; lane < 32; ++lane) {
            for (int r = 0; r < 4; ++r) a[lane][r] = Word(a_smem, AOffset(m, ks, lane, r));
            for (int r = 0; r < 2; ++r) b[lane][r] = Word(b_smem, BOffset(b_row, ks, lane, r));
          }
          if (!f16_path) {
            EmulateFp8(a, b, d);
            continue;
          }
          uint32_t a16[2][32][4], b16[2][32][2];
          for (int lane = 0; lane < 32; ++lane) {
            uint32_t la[2][4], lb[2][2];
            F16Fragments(a[lane], b[lane], la, lb);
            for (int s = 0; s < 2; ++s) {
              std::memcpy(a16[s][lane], la[s], sizeof(la[s]));
              std::memcpy(b16[s][lane], lb[s], sizeof(lb[s]));
            }
          }
          for (int s = 0; s < 2; ++s) EmulateF16(a16[s], b16[s], d);
        }
        for (int lane = 0; lane < 32; ++lane) {
          for (int c = 0; c < 4; ++c) {
            const int row = AccRow(m, lane, c), brow = AccBRow(b_row, lane, c);
            ASSERT_LT(row, block_m);
            ASSERT_LT(brow, kBRows);
            ++seen[row * kBRows + brow];
            double expected = 0.0;
            for (int k = 0; k < kK; ++k) {
              expected += static_cast<double>(Fp8E4M3ToFloat(a_smem[row * kPitch + k])) *
                          Fp8E4M3ToFloat(b_smem[brow * kPitch + k]);
            }
            // Products of FP8 values are exact in double; sums of 128 of them too (< 2^53).
            ASSERT_EQ(d[lane][c] * unscale, expected)
                << "warp " << warp << " m " << m << " j " << j << " lane " << lane << " c " << c;
          }
        }
      }
    }
  }
  for (int v : seen) ASSERT_EQ(v, 1);
  // Gate/up: the thread holding gate column n (tiles 0, 1) holds up column n (tiles 2, 3).
  if (gate_up) {
    for (int warp = 0; warp < kWarps; ++warp)
      for (int jj = 0; jj < 2; ++jj)
        for (int lane = 0; lane < 32; ++lane)
          for (int c = 0; c < 4; ++c) {
            EXPECT_EQ(AccBRow(BRow(true, warp, jj), lane, c) + 128,
                      AccBRow(BRow(true, warp, jj + 2), lane, c));
          }
  }
}

TEST(GemmFragmentsTest, Fp8PathTiles) {
  for (int mt : {1, 4}) {
    CheckTile(mt, /*gate_up=*/true, /*f16_path=*/false);
    CheckTile(mt, /*gate_up=*/false, /*f16_path=*/false);
  }
}

TEST(GemmFragmentsTest, F16PathTiles) {
  for (int mt : {1, 4}) {
    CheckTile(mt, /*gate_up=*/true, /*f16_path=*/true);
    CheckTile(mt, /*gate_up=*/false, /*f16_path=*/true);
  }
}

// Shared-memory bank of each lane's 32-bit fragment load: the 144-byte pitch gives 32 distinct
// banks per warp-wide load (no conflicts) for A and B.
TEST(GemmFragmentsTest, FragmentLoadsAreConflictFree) {
  for (int ks = 0; ks < 4; ++ks) {
    for (int reg = 0; reg < 4; ++reg) {
      std::vector<int> banks;
      for (int lane = 0; lane < 32; ++lane) banks.push_back((AOffset(1, ks, lane, reg) / 4) % 32);
      std::sort(banks.begin(), banks.end());
      EXPECT_EQ(std::unique(banks.begin(), banks.end()), banks.end()) << "A reg " << reg;
    }
    for (int reg = 0; reg < 2; ++reg) {
      std::vector<int> banks;
      for (int lane = 0; lane < 32; ++lane) banks.push_back((BOffset(40, ks, lane, reg) / 4) % 32);
      std::sort(banks.begin(), banks.end());
      EXPECT_EQ(std::unique(banks.begin(), banks.end()), banks.end()) << "B reg " << reg;
    }
  }
}

}  // namespace
}  // namespace expertmesh::cuda::frag
