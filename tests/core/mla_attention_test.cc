// The absorbed MLA attention at load and in the core (core/engine/mla_attention.h):
// - the matrices precomputed at load are kv_b_proj's dequantized rows, and a forward that reads
//   them gives the same bits as one that dequantizes kv_b_proj itself (the path before they were
//   precomputed, still taken by weights without them);
// - the SIMD core's blocks of queries and its thread count change no bit, and it agrees with the
//   reference loops;
// - a long prompt in one forward keeps the core's working set bounded (peak RSS), not growing as
//   prompt x context x heads.
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/base/proc_status.h"
#include "core/engine/layers.h"
#include "core/engine/mla_attention.h"
#include "core/kernels/cpu/thread_pool.h"
#include "tests/core/engine_test_util.h"

namespace expertmesh::testing {
namespace {

std::vector<float> Random(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

TEST(MlaAttentionTest, PrecomputedMatricesAreKvBProjDequantized) {
  LoadedModel m = LoadedModel::Load("engine-yarn", true);
  const ModelConfig& c = m.config;
  const int64_t rows = c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim);
  for (const DecoderLayerWeights& layer : m.model->layers()) {
    const MlaWeights& w = layer.self_attn;
    ASSERT_NE(w.kv_b_absorbed, nullptr) << layer.layer;
    ASSERT_EQ(std::ssize(*w.kv_b_absorbed), rows * c.kv_lora_rank);
    std::vector<float> row(c.kv_lora_rank);
    for (int64_t r = 0; r < rows; ++r) {
      w.kv_b_proj.DequantizeRow(r, row.data());
      ASSERT_EQ(0, std::memcmp(row.data(), w.kv_b_absorbed->data() + r * c.kv_lora_rank,
                               row.size() * sizeof(float)))
          << "layer " << layer.layer << " row " << r;
    }
  }
  // Off: no matrices.
  ModelLoadOptions off;
  off.absorbed_attention = false;
  auto plain = Model::Create(*m.ckpt, c, off);
  ASSERT_TRUE(plain.ok()) << plain.status();
  for (const DecoderLayerWeights& layer : (*plain)->layers()) {
    EXPECT_EQ(layer.self_attn.kv_b_absorbed, nullptr);
  }
}

// A batch of slices over one layer: a prefill, a decode step after a cached prefix and a chunk
// after a cached prefix; every cache is filled by the forwards themselves.
std::vector<float> LayerForward(const ModelConfig& c, const MlaWeights& w, const Rope& rope,
                                const LayerOptions& opt, bool last_rows_only) {
  const int64_t D = c.hidden_size;
  std::vector<std::unique_ptr<ContiguousKvCache>> caches;
  for (int s = 0; s < 3; ++s) {
    caches.push_back(*ContiguousKvCache::Create(1, c.kv_lora_rank, c.qk_rope_head_dim));
  }
  // Cached prefixes for slices 1 and 2.
  for (int s : {1, 2}) {
    const int64_t n = s == 1 ? 9 : 4;
    EXPECT_TRUE(caches[s]->Extend(n).ok());
    std::vector<float> x = Random(n * D, 100 + s), out(n * D);
    MlaForward(c, w, rope, 0, *caches[s], 0, x.data(), n, out.data(), opt);
  }
  const int64_t n0 = 7, n1 = 1, n2 = 5, T = n0 + n1 + n2;
  std::vector<SequenceSlice> seqs = {
      {caches[0].get(), 0, 0, n0}, {caches[1].get(), 9, n0, n1}, {caches[2].get(), 4, n0 + n1, n2}};
  for (int s = 0; s < 3; ++s) EXPECT_TRUE(caches[s]->Extend(seqs[s].n).ok());
  std::vector<float> x = Random(T * D, 7), out(T * D);
  MlaForwardBatch(c, w, rope, 0, seqs, x.data(), T, out.data(), opt, last_rows_only);
  return out;
}

TEST(MlaAttentionTest, PrecomputedAndPerForwardDequantizationAgreeBitwise) {
  for (const char* name : {"engine-yarn", "engine-mtp"}) {
    LoadedModel m = LoadedModel::Load(name, true);
    const ModelConfig& c = m.config;
    const Rope rope(c);
    for (const DecoderLayerWeights& layer : m.model->layers()) {
      const MlaWeights& w = layer.self_attn;
      ASSERT_NE(w.kv_b_absorbed, nullptr);
      MlaWeights before = w;  // without the matrices: kv_b_proj dequantized per forward
      before.kv_b_absorbed.reset();
      for (LinearKernel kernel : {LinearKernel::kSimd, LinearKernel::kReference}) {
        for (bool quant : {true, false}) {
          for (bool last_only : {false, true}) {
            const LayerOptions opt{quant, AttentionForm::kAbsorbed, kernel};
            const std::vector<float> a = LayerForward(c, w, rope, opt, last_only);
            const std::vector<float> b = LayerForward(c, before, rope, opt, last_only);
            EXPECT_EQ(a, b) << name << " layer " << layer.layer << " simd "
                            << (kernel == LinearKernel::kSimd) << " quant " << quant
                            << " last_only " << last_only;
          }
        }
      }
    }
  }
}

// The core alone on random queries and a random cache: slices with cached prefixes, one queried
// on its last row only.
struct CoreCase {
  ModelConfig config;
  std::vector<std::unique_ptr<ContiguousKvCache>> caches;
  std::vector<SequenceSlice> seqs;
  std::vector<int64_t> q_first, first_i;
  std::vector<float> wkv_b, q;
  int64_t Tq = 0;

  CoreCase(const ModelConfig& c, std::vector<std::pair<int64_t, int64_t>> start_n,
           std::vector<bool> last_only)
      : config(c) {
    const int64_t R = c.kv_lora_rank + c.qk_rope_head_dim;
    int64_t row = 0;
    for (size_t s = 0; s < start_n.size(); ++s) {
      auto [start, n] = start_n[s];
      caches.push_back(*ContiguousKvCache::Create(1, c.kv_lora_rank, c.qk_rope_head_dim));
      EXPECT_TRUE(caches.back()->Extend(start + n).ok());
      const std::vector<float> rows = Random((start + n) * R, 31 + s);
      for (int64_t j = 0; j < start + n; ++j) {
        std::copy_n(rows.data() + j * R, R, caches.back()->Slot(0, j));
      }
      seqs.push_back({caches.back().get(), start, row, n});
      row += n;
      first_i.push_back(last_only[s] ? n - 1 : 0);
      q_first.push_back(Tq);
      Tq += n - first_i.back();
    }
    const int64_t H = c.num_attention_heads;
    wkv_b = Random(H * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank, 5, 0.05f);
    q = Random(Tq * H * c.qk_head_dim(), 6);
  }
  std::vector<float> Run(bool simd, int64_t workspace_floats = kAbsorbedWorkspaceFloats) const {
    std::vector<float> attn(Tq * config.num_attention_heads * config.v_head_dim, -1.0f);
    const AbsorbedAttentionArgs args{config,  wkv_b.data(), q.data(),        0.1f, 0, seqs,
                                     q_first, first_i,      workspace_floats};
    (simd ? AbsorbedAttentionSimd : AbsorbedAttentionReference)(args, attn.data());
    return attn;
  }
};

ModelConfig SmallConfig() {
  ModelConfig c;
  c.num_attention_heads = 4;
  c.qk_nope_head_dim = 32;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 24;
  c.kv_lora_rank = 48;
  return c;
}

TEST(MlaAttentionTest, SimdCoreBlocksAndThreadsChangeNoBit) {
  const ModelConfig c = SmallConfig();
  const CoreCase cc(c, {{0, 13}, {20, 1}, {5, 6}, {3, 4}}, {false, false, false, true});
  const int64_t H = c.num_attention_heads, R = c.kv_lora_rank + c.qk_rope_head_dim;
  const std::vector<float> whole = cc.Run(true);
  // Reference loops: a different summation order (sequential dots), same mathematics.
  const std::vector<float> ref = cc.Run(false);
  float max_ref = 0.0f;
  for (float v : ref) max_ref = std::max(max_ref, std::abs(v));
  EXPECT_LE(MaxAbsDiff(whole, ref), 1e-5f * max_ref);
  // One query per score block, one row per query block; blocks cutting slices and heads.
  for (int64_t budget : {int64_t{1}, int64_t{7}, H * (R + c.kv_lora_rank) * 2 + 5, int64_t{200}}) {
    EXPECT_EQ(cc.Run(true, budget), whole) << "workspace " << budget;
  }
  const int threads = cpu::KernelThreads();
  for (int t : {1, 2, 3}) {
    cpu::SetKernelThreads(t);
    EXPECT_EQ(cc.Run(true), whole) << "threads " << t;
    EXPECT_EQ(cc.Run(true, 7), whole) << "threads " << t;
  }
  cpu::SetKernelThreads(threads);
}

// A 2,048-token prompt in one forward of the core at 16 heads: its scores alone would be
// 2048 x 2048 x 16 floats (256 MiB) computed at once; the blocks keep the working set under
// twice kAbsorbedWorkspaceFloats (64 MiB). Peak RSS is reset (/proc/self/clear_refs) after the
// inputs are built, and its growth over the call measured.
TEST(MlaAttentionTest, LongPromptWorkingSetIsBounded) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "a sanitizer's allocator (quarantine, shadow memory) sets the RSS here";
#endif
  ModelConfig c = SmallConfig();
  c.num_attention_heads = 16;
  c.kv_lora_rank = 64;
  const int64_t n = 2048;
  const CoreCase cc(c, {{0, n}}, {false});
  std::vector<float> attn(cc.Tq * c.num_attention_heads * c.v_head_dim);
  std::fill(attn.begin(), attn.end(), 0.0f);  // resident before the measurement
  {
    std::ofstream clear("/proc/self/clear_refs");
    clear << "5";
  }
  const int64_t rss = base::ProcStatusBytes("VmRSS"), hwm_before = base::ProcStatusBytes("VmHWM");
  if (rss < 0 || hwm_before < 0 || hwm_before > rss + (4 << 20)) {
    GTEST_SKIP() << "peak RSS cannot be reset here (VmRSS " << rss << ", VmHWM " << hwm_before
                 << ")";
  }
  const AbsorbedAttentionArgs args{c, cc.wkv_b.data(), cc.q.data(), 0.1f,
                                   0, cc.seqs,         cc.q_first,  cc.first_i};
  AbsorbedAttentionSimd(args, attn.data());
  const int64_t grown = base::ProcStatusBytes("VmHWM") - rss;
  const int64_t bound = 2 * kAbsorbedWorkspaceFloats * int64_t{sizeof(float)} + (16 << 20);
  const int64_t unbounded = n * n * c.num_attention_heads * int64_t{sizeof(float)};
  std::printf(
      "[ measured ] %lld-token prompt, 16 heads: peak RSS grew %lld MiB (bound %lld MiB, "
      "scores at once %lld MiB)\n",
      static_cast<long long>(n), static_cast<long long>(grown >> 20),
      static_cast<long long>(bound >> 20), static_cast<long long>(unbounded >> 20));
  EXPECT_LE(grown, bound);
  // And the result is the reference loops' (a different summation order).
  float max_diff = 0.0f, max_abs = 0.0f;
  const std::vector<float> ref = cc.Run(false);
  for (size_t i = 0; i < ref.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(ref[i] - attn[i]));
    max_abs = std::max(max_abs, std::abs(ref[i]));
  }
  EXPECT_LE(max_diff, 1e-5f * max_abs);
}

}  // namespace
}  // namespace expertmesh::testing
