// The small CUDA ops against core's CPU reference: activation quantization (bitwise), gate
// top-k (ids and weights bitwise), RMSNorm, RoPE and MLA decode attention (tolerances below).
#include <cmath>
#include <numeric>
#include <random>

#include "core/engine/layers.h"
#include "core/format/config.h"
#include "core/kernels/cuda/device_buffer.h"
#include "core/kernels/cuda/dispatch.h"
#include "core/model/gate.h"
#include "core/numerics/numerics.h"
#include "core/numerics/quant.h"
#include "tests/cuda/gpu_test_util.h"

namespace expertmesh::cuda::testing {
namespace {

template <typename T>
DeviceBuffer<T> Up(const std::vector<T>& v) {
  absl::StatusOr<DeviceBuffer<T>> b = DeviceBuffer<T>::FromHost(v);
  EXPECT_TRUE(b.ok()) << b.status();
  return std::move(*b);
}
template <typename T>
std::vector<T> Down(const DeviceBuffer<T>& b) {
  std::vector<T> v(b.size());
  absl::Status s = b.CopyToHost(v);
  EXPECT_TRUE(s.ok()) << s;
  return v;
}

// Same division, same amax, same round-to-nearest-even: codes and scales are bitwise equal.
TEST(OpsGpuTest, ActQuantMatchesCpuBitwise) {
  EM_REQUIRE_GPU();
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int dim : {128, 200, 7168}) {
    const int rows = 9;
    std::vector<float> x(rows * dim);
    for (float& v : x) v = normal(rng);
    for (int c = 0; c < dim; ++c) x[2 * dim + c] = 0.0f;  // all-zero row: min amax
    for (int c = 0; c < dim; ++c) x[3 * dim + c] = c % 2 ? 3e38f : -3e38f;  // huge values
    x[4 * dim + 5] = 1e-30f;                                                // tiny among zeros
    const QuantizedActivations ref = QuantizeActivations(x, rows, dim);
    auto xd = Up(x);
    auto q = *DeviceBuffer<uint8_t>::Create(rows * dim);
    auto scales = *DeviceBuffer<float>::Create(ref.scales.size());
    ActQuantParams p{rows, dim, xd.get(), q.get(), scales.get()};
    ASSERT_TRUE(ActQuant(p, nullptr).ok());
    EXPECT_EQ(Down(q), ref.fp8) << "dim " << dim;
    EXPECT_EQ(Down(scales), ref.scales) << "dim " << dim;
  }
}

// Sum of squares: GPU tree order in float vs CPU double; 1e-5 relative covers float rounding
// of a 7168-long sum (~sqrt(n) * 6e-8 ~ 5e-6) with margin.
TEST(OpsGpuTest, RmsNormMatchesCpu) {
  EM_REQUIRE_GPU();
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const int rows = 5, dim = 7168;
  std::vector<float> x(rows * dim), w(dim), ref(rows * dim);
  for (float& v : x) v = normal(rng);
  for (float& v : w) v = 1.0f + 0.1f * normal(rng);
  ::expertmesh::RmsNorm(x.data(), w.data(), rows, dim, 1e-6, ref.data());
  auto xd = Up(x);
  auto wd = Up(w);
  auto out = *DeviceBuffer<float>::Create(rows * dim);
  RmsNormParams p{rows, dim, 1e-6f, xd.get(), wd.get(), out.get()};
  ASSERT_TRUE(cuda::RmsNorm(p, nullptr).ok());
  const std::vector<float> got = Down(out);
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], ref[i], 1e-5f * std::fabs(ref[i]) + 1e-6f) << i;
  }
}

// Same float angle; device cosf/sinf are within 2 ulp of the host's: 1e-5 absolute on values
// of magnitude <= ~4.
TEST(OpsGpuTest, RopeMatchesCpuWithYarn) {
  EM_REQUIRE_GPU();
  ModelConfig c;
  c.qk_rope_head_dim = 64;
  c.qk_nope_head_dim = 128;
  c.rope_theta = 10000.0;
  c.rope_scaling.type = "yarn";
  c.rope_scaling.factor = 40.0;
  c.rope_scaling.mscale = 1.0;
  c.rope_scaling.mscale_all_dim = 1.0;
  c.rope_scaling.original_max_position_embeddings = 4096;
  const ::expertmesh::Rope rope(c);
  const int tokens = 6, heads = 4, head_dim = 192, offset = 128;
  std::mt19937 rng(6);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(tokens * heads * head_dim);
  for (float& v : x) v = normal(rng);
  const std::vector<int32_t> pos = {0, 1, 7, 4095, 4096, 163839};
  std::vector<float> ref = x;
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) rope.Apply(&ref[(t * heads + h) * head_dim + offset], pos[t]);
  }
  auto xd = Up(x);
  auto inv = Up(rope.inv_freq());
  auto posd = Up(pos);
  RopeParams p;
  p.n_tokens = tokens;
  p.n_heads = heads;
  p.head_stride = head_dim;
  p.token_stride = heads * head_dim;
  p.rope_offset = offset;
  p.rope_dim = 64;
  p.attention_scaling = rope.attention_factor();
  p.inv_freq = inv.get();
  p.positions = posd.get();
  p.x = xd.get();
  ASSERT_TRUE(cuda::Rope(p, nullptr).ok());
  const std::vector<float> got = Down(xd);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], ref[i], 1e-5f) << i;
}

// Gate top-k: ids and weights bitwise equal to core SelectExperts, including forced ties
// (scores drawn from 8 values) that exercise the lowest-index rule for groups and experts.
TEST(OpsGpuTest, GateTopkMatchesCpuBitwise) {
  EM_REQUIRE_GPU();
  struct Shape {
    int E, n_group, topk_group, k;
    bool ties;
  };
  for (const Shape& sh : {Shape{256, 8, 4, 8, false}, Shape{256, 8, 4, 8, true},
                          Shape{64, 1, 1, 6, false}, Shape{16, 4, 2, 4, true}}) {
    GateParams gp;
    gp.n_routed_experts = sh.E;
    gp.n_group = sh.n_group;
    gp.topk_group = sh.topk_group;
    gp.num_experts_per_tok = sh.k;
    gp.norm_topk_prob = true;
    gp.routed_scaling_factor = 2.5;
    const int T = 33;
    std::mt19937 rng(sh.E + sh.ties);
    std::uniform_real_distribution<float> uni(0.0f, 1.0f);
    std::vector<float> scores(T * sh.E), bias(sh.E);
    for (float& s : scores) s = sh.ties ? static_cast<float>(rng() % 8) / 8.0f : uni(rng);
    for (float& b : bias) b = sh.ties ? 0.0f : 0.1f * (uni(rng) - 0.5f);
    const ExpertRoutes ref = SelectExperts(gp, scores, bias, T);
    auto sd = Up(scores);
    auto bd = Up(bias);
    auto ids = *DeviceBuffer<int32_t>::Create(T * sh.k);
    auto wts = *DeviceBuffer<float>::Create(T * sh.k);
    GateTopkParams p;
    p.n_tokens = T;
    p.n_routed_experts = sh.E;
    p.n_group = sh.n_group;
    p.topk_group = sh.topk_group;
    p.num_experts_per_tok = sh.k;
    p.norm_topk_prob = true;
    p.routed_scaling_factor = static_cast<float>(gp.routed_scaling_factor);
    p.scores = sd.get();
    p.correction_bias = bd.get();
    p.topk_ids = ids.get();
    p.topk_weights = wts.get();
    ASSERT_TRUE(GateTopk(p, nullptr).ok());
    EXPECT_EQ(Down(ids), ref.experts) << "E " << sh.E << " ties " << sh.ties;
    EXPECT_EQ(Down(wts), ref.weights) << "E " << sh.E << " ties " << sh.ties;
  }
}

// MLA decode over a paged BF16 cache against plain loops in double. Errors: FP32 dot products
// of 576 terms and an online softmax: 1e-4 relative to the output's peak.
TEST(OpsGpuTest, MlaDecodeMatchesCpu) {
  EM_REQUIRE_GPU();
  absl::StatusOr<DeviceArch> arch = QueryDeviceArch(0);
  ASSERT_TRUE(arch.ok());
  struct Shape {
    int heads, R, rope;
  };
  for (const Shape& sh : {Shape{16, 512, 64}, Shape{4, 128, 16}}) {  // V3, bundled
    const int D = sh.R + sh.rope, page_size = 16;
    const std::vector<int32_t> lens = {1, 0, 33, 100, 16};
    const int S = static_cast<int>(lens.size()), max_pages = 7;
    std::mt19937 rng(sh.R);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    // Pages handed out shuffled, so a sequence's pages are not contiguous.
    std::vector<int32_t> page_ids(S * max_pages);
    std::iota(page_ids.begin(), page_ids.end(), 0);
    std::shuffle(page_ids.begin(), page_ids.end(), rng);
    std::vector<uint16_t> cache(S * max_pages * page_size * D);
    for (uint16_t& v : cache) v = FloatToBf16(normal(rng));
    std::vector<float> q(S * sh.heads * D);
    for (float& v : q) v = 0.3f * normal(rng);
    const float scale = 1.0f / std::sqrt(192.0f);
    std::vector<float> ref(S * sh.heads * sh.R, 0.0f);
    for (int s = 0; s < S; ++s) {
      for (int h = 0; h < sh.heads; ++h) {
        const float* qh = &q[(s * sh.heads + h) * D];
        std::vector<double> sc(lens[s]);
        double m = -INFINITY;
        for (int t = 0; t < lens[s]; ++t) {
          const uint16_t* kv =
              &cache[(page_ids[s * max_pages + t / page_size] * page_size + t % page_size) * D];
          double dot = 0.0;
          for (int c = 0; c < D; ++c) dot += qh[c] * static_cast<double>(Bf16ToFloat(kv[c]));
          sc[t] = dot * scale;
          m = std::max(m, sc[t]);
        }
        double l = 0.0;
        for (double& v : sc) l += (v = std::exp(v - m));
        for (int t = 0; t < lens[s]; ++t) {
          const uint16_t* kv =
              &cache[(page_ids[s * max_pages + t / page_size] * page_size + t % page_size) * D];
          for (int c = 0; c < sh.R; ++c) {
            ref[(s * sh.heads + h) * sh.R + c] +=
                static_cast<float>(sc[t] / l * Bf16ToFloat(kv[c]));
          }
        }
      }
    }
    auto qd = Up(q);
    auto cd = Up(cache);
    auto bt = Up(page_ids);
    auto ld = Up(lens);
    auto out = *DeviceBuffer<float>::Create(ref.size());
    MlaDecodeParams p;
    p.n_seqs = S;
    p.num_heads = sh.heads;
    p.kv_lora_rank = sh.R;
    p.qk_rope_head_dim = sh.rope;
    p.page_size = page_size;
    p.max_pages_per_seq = max_pages;
    p.softmax_scale = scale;
    p.q = qd.get();
    p.kv_cache = cd.get();
    p.block_table = bt.get();
    p.seq_lens = ld.get();
    p.out = out.get();
    ASSERT_TRUE(MlaDecode(*arch, p, nullptr).ok());
    const std::vector<float> got = Down(out);
    const double rel = MaxRelToPeak(got, ref);
    std::printf("[measured] MLA decode heads=%d R=%d: max err / peak %.3g\n", sh.heads, sh.R, rel);
    EXPECT_LE(rel, 1e-4);
    // Sequence 1 is empty: zeros.
    for (int i = 0; i < sh.heads * sh.R; ++i) EXPECT_EQ(got[sh.heads * sh.R + i], 0.0f);
  }
}

}  // namespace
}  // namespace expertmesh::cuda::testing
