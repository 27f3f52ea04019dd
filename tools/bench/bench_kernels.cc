// expertmesh-bench-kernels: the CPU expert FFN matmuls at DeepSeek-V3's shapes (gate/up
// 2048x7168 and down 7168x2048, FP8 E4M3 with 128x128 block scales, in the 16-row tiles the
// engine packs), M = 1 and M = 256 rows (or --m), weights cold, on 1 and 2 threads (or --threads),
// beside the machine's read bandwidth measured in the same run by a streaming read of a buffer of
// the same size.
//
// Cold weights: each shape has as many distinct copies as make --cold-factor times the
// last-level cache (measured from sysfs, else sysconf), and the matmuls walk through them in
// turn, so every weight byte comes from DRAM.
//
// Each figure is the fastest of 3 rounds, and a read pass runs before every round (the read
// bandwidth is the fastest of them), so that other processes on the machine disturb the ratios
// less and the two sides of each ratio see the same stretch of time.
//
// Reported: M = 1 weight GB/s (weight + scale bytes read per second) and its ratio to the read
// bandwidth on the same thread count; M = 256 GFLOP/s (2 * M * out * in per matmul).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/cpu/thread_pool.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tools/bench/bench_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace expertmesh::bench {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
// Reads [p, p + n) (n a multiple of 4 vectors) with 4 independent XOR chains; returns a lane so
// the loads are not optimized away.
uint64_t ReadStreamImpl(const uint8_t* p, int64_t n) {
  const hn::ScalableTag<uint64_t> d;
  const int64_t bytes = static_cast<int64_t>(hn::Lanes(d) * sizeof(uint64_t));
  const auto* q = reinterpret_cast<const uint64_t*>(p);
  const int64_t L = static_cast<int64_t>(hn::Lanes(d));
  auto a = hn::Zero(d), b = a, c = a, e = a;
  for (int64_t i = 0; i + 4 * bytes <= n; i += 4 * bytes) {
    const int64_t w = i / 8;
    a = hn::Xor(a, hn::Load(d, q + w));
    b = hn::Xor(b, hn::Load(d, q + w + L));
    c = hn::Xor(c, hn::Load(d, q + w + 2 * L));
    e = hn::Xor(e, hn::Load(d, q + w + 3 * L));
  }
  return hn::GetLane(hn::Xor(hn::Xor(a, b), hn::Xor(c, e)));
}
}  // namespace HWY_NAMESPACE
}  // namespace expertmesh::bench
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace expertmesh::bench {
HWY_EXPORT(ReadStreamImpl);

namespace {

using Clock = std::chrono::steady_clock;

int64_t LastLevelCacheBytes() {
  int64_t best = 0;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i);
    std::ifstream lf(dir + "/level"), sf(dir + "/size");
    int level = 0;
    std::string size;
    if (!(lf >> level) || !(sf >> size) || size.empty()) continue;
    int64_t v = std::stoll(size);
    if (size.back() == 'K') v <<= 10;
    if (size.back() == 'M') v <<= 20;
    if (level >= 2) best = std::max(best, v);
  }
  if (best == 0) best = std::max<int64_t>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
  return best > 0 ? best : int64_t{64} << 20;
}

// Anonymous memory, touched (so the pages exist and timing sees no faults).
uint8_t* AllocTouched(int64_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("mmap");
    std::exit(1);
  }
  std::memset(p, 1, bytes);
  return static_cast<uint8_t*>(p);
}

struct Shape {
  const char* name;
  int64_t out, in;
};

struct Weights {
  Shape shape;
  int64_t tile_bytes, scale_count, copies;
  uint8_t* tiles;             // copies * tile_bytes
  std::vector<float> scales;  // copies * scale_count
  int64_t bytes_per_matmul() const { return tile_bytes + scale_count * 4; }
};

Weights MakeWeights(Shape s, int64_t min_bytes, std::mt19937_64& rng) {
  Weights w{s, s.out * s.in, ((s.out + 127) / 128) * ((s.in + 127) / 128), 0, nullptr, {}};
  w.copies = std::max<int64_t>(2, (min_bytes + w.tile_bytes - 1) / w.tile_bytes);
  w.tiles = AllocTouched(w.copies * w.tile_bytes);
  // Random FP8 codes without the NaN codes (what Pack admits), random scales ~ 1/448.
  for (int64_t i = 0; i < w.copies * w.tile_bytes; i += 8) {
    uint64_t r = rng();
    for (int b = 0; b < 8; ++b, r >>= 8) {
      uint8_t c = r & 0xFF;
      if ((c & 0x7F) == 0x7F) c ^= 0x01;
      w.tiles[i + b] = c;
    }
  }
  std::uniform_real_distribution<float> u(0.5f / 448, 2.0f / 448);
  w.scales.resize(w.copies * w.scale_count);
  for (float& v : w.scales) v = u(rng);
  return w;
}

// Seconds per matmul over `reps` matmuls walking the copies (after one warm-up pass of the
// thread pool on the first copy).
double TimeMatmul(const Weights& w, int64_t m, const std::vector<float>& x, std::vector<float>& y,
                  int64_t reps, int64_t* next_copy) {
  auto run = [&](int64_t c) {
    simd::TiledLinear(simd::TileType::kF8E4M3, w.tiles + c * w.tile_bytes,
                      w.scales.data() + c * w.scale_count, 128, 128, w.shape.out, w.shape.in,
                      x.data(), m, y.data());
  };
  const auto t0 = Clock::now();
  for (int64_t r = 0; r < reps; ++r) {
    run(*next_copy);
    *next_copy = (*next_copy + 1) % w.copies;
  }
  return std::chrono::duration<double>(Clock::now() - t0).count() / static_cast<double>(reps);
}

// Rounds of each measurement; the fastest counts (other processes share the machine), as for
// the read bandwidth.
constexpr int kRounds = 3;

// Read bandwidth in GB/s: `passes` reads of the whole buffer split over the kernel threads.
double ReadBandwidth(const uint8_t* buf, int64_t bytes, int passes) {
  std::vector<uint64_t> sink(64);
  double best = 0;
  for (int p = 0; p < passes; ++p) {
    const int64_t chunk = 1 << 20;
    const auto t0 = Clock::now();
    cpu::ParallelFor(bytes / chunk, 1, [&](int64_t b, int64_t e) {
      sink[b % 64] ^= HWY_DYNAMIC_DISPATCH(ReadStreamImpl)(buf + b * chunk, (e - b) * chunk);
    });
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, static_cast<double>(bytes / chunk * chunk) / s / 1e9);
  }
  uint64_t all = 0;
  for (uint64_t v : sink) all ^= v;
  if (all == 0x12345) std::printf(" ");
  return best;
}

}  // namespace

int Main(int argc, char** argv) {
  CLI::App app{
      "expertmesh-bench-kernels: CPU expert FFN matmuls (FP8 128x128 blocks, DeepSeek-V3 "
      "7168x2048 and 2048x7168) at M = 1 and M = 256 with cold weights, and the machine's "
      "read bandwidth in the same run."};
  std::vector<int> threads{1, 2};
  double cold_factor = 4;
  std::vector<int64_t> m_rows{256};
  double seconds = 2.0;
  app.add_option("--threads", threads, "thread counts to measure (each >= 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--cold-factor", cold_factor,
                 "each shape's weight copies total this many times the last-level cache")
      ->check(CLI::Range(1.0, 64.0));
  app.add_option("--m", m_rows, "row counts measured besides M = 1 (e.g. --m 2 4 8 256)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--seconds", seconds,
                 "about this much time per measurement, in 3 rounds (the fastest counts); at M = 1 "
                 "each round also walks every weight copy once")
      ->check(CLI::Range(0.1, 60.0));
  std::string target;
  app.add_option("--target", target,
                 "run one of the compiled SIMD targets this CPU supports instead of the best (e.g. "
                 "AVX2 on an AVX-512 machine; names as printed by --list-targets)");
  bool list_targets = false;
  app.add_flag("--list-targets", list_targets, "print the usable SIMD targets and exit");
  CLI11_PARSE(app, argc, argv);
  if (list_targets) {
    for (int64_t t : hwy::SupportedAndGeneratedTargets()) std::printf("%s\n", hwy::TargetName(t));
    return 0;
  }
  if (!target.empty()) {
    int64_t chosen = 0;
    for (int64_t t : hwy::SupportedAndGeneratedTargets()) {
      if (target == hwy::TargetName(t)) chosen = t;
    }
    if (chosen == 0) {
      std::fprintf(stderr, "--target %s: not a usable target here (see --list-targets)\n",
                   target.c_str());
      return 2;
    }
    hwy::SetSupportedTargetsForTest(chosen);
  }

  const int64_t llc = LastLevelCacheBytes();
  const int64_t cold = static_cast<int64_t>(cold_factor * static_cast<double>(llc));
  std::printf("SIMD target %s; last-level cache %.1f MiB; cold buffers %.0f MiB per shape\n",
              simd::TargetName(), llc / 1048576.0, cold / 1048576.0);
  std::mt19937_64 rng(15);
  std::vector<Weights> shapes;
  for (Shape s : {Shape{"gate/up 2048x7168", 2048, 7168}, Shape{"down 7168x2048", 7168, 2048}}) {
    shapes.push_back(MakeWeights(s, cold, rng));
  }
  uint8_t* stream = AllocTouched(cold);
  std::printf("%-20s %7s %4s %10s %10s %8s %9s\n", "shape", "threads", "M", "ms/matmul",
              "weight GB/s", "÷ read", "GFLOP/s");
  std::vector<int64_t> ms{1};  // M = 1, then --m in order, each once
  for (int64_t m : m_rows) {
    if (std::find(ms.begin(), ms.end(), m) == ms.end()) ms.push_back(m);
  }
  for (int t : threads) {
    cpu::SetKernelThreads(t);
    // A read pass before every round of every matmul, so that the bandwidth and the kernel each
    // get their best moment from the same stretch of time on a machine others share; the rows
    // are printed once the thread count is done, against the best read pass.
    double read_bw = ReadBandwidth(stream, cold, 1);
    struct Row {
      const char* shape;
      int64_t m;
      double s, gbs, gflops;
    };
    std::vector<Row> rows;
    for (const Weights& w : shapes) {
      for (int64_t m : ms) {
        std::vector<float> x(m * w.shape.in), y(m * w.shape.out);
        std::normal_distribution<float> nd;
        for (float& v : x) v = nd(rng);
        int64_t next = 0;
        TimeMatmul(w, m, x, y, 1, &next);  // warm-up: pool threads, buffers
        const double flops = 2.0 * static_cast<double>(m * w.shape.out * w.shape.in);
        // About `seconds` of work, and at least one pass over the copies at M = 1.
        const double est = TimeMatmul(w, m, x, y, 2, &next);
        int64_t reps = std::max<int64_t>(3, static_cast<int64_t>(seconds / est / kRounds));
        if (m == 1) reps = std::max(reps, w.copies);
        double s = 1e30;
        for (int r = 0; r < kRounds; ++r) {
          read_bw = std::max(read_bw, ReadBandwidth(stream, cold, 1));
          s = std::min(s, TimeMatmul(w, m, x, y, reps, &next));
        }
        rows.push_back({w.shape.name, m, s, static_cast<double>(w.bytes_per_matmul()) / s / 1e9,
                        flops / s / 1e9});
      }
    }
    std::printf("read bandwidth, %d thread%s: %.2f GB/s\n", t, t == 1 ? "" : "s", read_bw);
    for (const Row& r : rows) {
      std::printf("%-20s %7d %4lld %10.3f %10.2f %8.2f %9.1f\n", r.shape, t,
                  static_cast<long long>(r.m), r.s * 1e3, r.gbs, r.gbs / read_bw, r.gflops);
    }
  }
  return 0;
}

}  // namespace expertmesh::bench

int main(int argc, char** argv) { return expertmesh::bench::Main(argc, argv); }
#endif
