// Internals of CudaEngine (cuda_engine.h), shared by cuda_engine.cc (the forward pass) and
// cuda_engine_rank.cc (what one GPU holds: weights, latent caches, scratch, and its ops).
// Not for use outside those two files.
// Legend: D = hidden_size, Hl = heads on a rank, R = kv_lora_rank, v = v_head_dim.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/kernels/cuda/cuda_engine.h"
#include "core/kernels/cuda/device_buffer.h"
#include "core/kernels/plan/kernel_plan.h"
#include "core/kernels/plan/tp_plan.h"
#include "core/model/model.h"

namespace expertmesh::cuda {

absl::Status BlasStatus(cublasStatus_t s, std::string_view what);

// A rank's part of one projection: FP8 blocks for the FP8 kernel, or a float matrix for cuBLAS.
struct DevLinear {
  int64_t out = 0;              // rows of the part
  int64_t in = 0;               // columns of the part
  bool fp8 = false;             // Fp8Linear over w8 / scales
  bool quantize_input = false;  // float path over an FP8 source: inputs quantized + dequantized
  DeviceBuffer<uint8_t> w8;     // [out, in] e4m3
  DeviceBuffer<float> scales;   // [ceil(out / 128), in / 128]
  DeviceBuffer<float> w32;      // [out, in]
  bool present() const { return out > 0 && in > 0; }
  uint64_t bytes() const { return w8.bytes() + scales.bytes() + w32.bytes(); }
};

// W[rows, cols] on the current device: FP8 when the part keeps whole 128x128 blocks and the
// activations are quantized, else float (dequantized).
absl::StatusOr<DevLinear> UploadLinear(const Linear& w, Range rows, Range cols,
                                       bool quantize_activations);

// One decoder layer (or an MTP module's layer) on one rank.
struct CudaEngine::Block {
  int layer = 0;  // the RoutedExperts' layer id
  bool is_moe = false;
  DeviceBuffer<float> input_layernorm, post_attention_layernorm, q_a_layernorm, kv_a_layernorm;
  DevLinear q_a, q_b, q, kv_a, o;
  DeviceBuffer<float> w_uk;  // [Hl, qk_nope_head_dim, R]
  DeviceBuffer<float> w_uv;  // [Hl, v, R]
  DevLinear gate, up, down;  // dense MLP or shared expert part (absent for an empty range)
  // MoE, rank 0 only: the router (gate.weight [n_routed_experts, D], float) and its
  // e_score_correction_bias [n_routed_experts].
  DevLinear router;
  DeviceBuffer<float> e_score_correction_bias;
};

// An embedding table [vocab_size, D] on one GPU: BF16 as the checkpoint stores it (gathered
// rows widened exactly to float), or float for any other dtype.
struct DevEmbedding {
  DeviceBuffer<uint16_t> bf16;
  DeviceBuffer<float> f32;
  bool present() const { return bf16.size() > 0 || f32.size() > 0; }
  uint64_t bytes() const { return bf16.bytes() + f32.bytes(); }
};
absl::StatusOr<DevEmbedding> UploadEmbedding(const Linear& table);

// What one MTP module holds on a rank beyond its block.
struct MtpDev {
  DeviceBuffer<float> enorm, hnorm, head_norm;
  DevEmbedding embed;       // absent: the main one
  DevLinear eh_proj, head;  // head: rank 0 only
};

struct CudaEngine::Rank {
  int rank = 0;
  int device = 0;
  DeviceArch arch;
  cudaStream_t stream = nullptr;
  bool owns_stream = false;
  cublasHandle_t blas = nullptr;
  std::vector<Block> layers;
  std::vector<Block> mtp_blocks;
  std::vector<MtpDev> mtp;
  DevEmbedding embed;        // [vocab_size, D]
  DeviceBuffer<float> norm;  // rank 0
  DevLinear lm_head;         // rank 0
  DeviceBuffer<float> inv_freq;
  DeviceBuffer<uint16_t> kv;      // [num_hidden_layers, pages, page_size, Dkv] bf16
  DeviceBuffer<uint16_t> mtp_kv;  // [1, mtp pages, page_size, Dkv]
  // Scratch, sized per forward (Run reserves everything before enqueuing).
  DeviceBuffer<float> h, xn, delta, routed, qa, q, kvr, qm, ctx, attn, attn_all, gathered, g, u;
  DeviceBuffer<float> x32, cat, sel, logits;
  DeviceBuffer<uint8_t> x8;
  DeviceBuffer<float> x8_scales;
  DeviceBuffer<int32_t> ints;  // tokens | positions | seq_lens | out_rows | block_table
  DeviceBuffer<int64_t> slots;
  // Rank 0: pinned staging of the routed-expert call (hidden rows out, expert sums back).
  DeviceBuffer<float> scores, topk_weights;  // [T, n_routed_experts], [T, k]
  DeviceBuffer<int32_t> topk_ids;            // [T, k]
  PinnedBuffer<float> host_x, host_routed, host_scales, host_topk_weights;
  PinnedBuffer<uint8_t> host_x8;
  PinnedBuffer<int32_t> host_topk_ids;
  cudaEvent_t xn_ready = nullptr;

  // Rank `shard.rank` on `device`: its weights by the plan, its latent caches (main and MTP),
  // a cuBLAS handle on `stream` (null: a stream of its own).
  static absl::StatusOr<std::unique_ptr<Rank>> Create(const Model& model, const RankShard& shard,
                                                      int device, cudaStream_t stream,
                                                      const CudaEngineOptions& options);
  ~Rank();
  // y: [n, out] = x: [n, in] . W^T.
  absl::Status Linear(const DevLinear& w, const float* x, int64_t n, float* y);
  absl::Status Norm(const float* x, const DeviceBuffer<float>& weight, int64_t n, int64_t dim,
                    double eps, float* out);
  // y += x over n floats.
  absl::Status Add(const float* x, float* y, int64_t n);
  // out: [n, D] = table[ids] (ids: [n] on the device).
  absl::Status Embed(const DevEmbedding& table, const int32_t* ids, int64_t n, int64_t D,
                     float* out);
  // The MLP part: out = down(silu(gate(x)) * up(x)), zeros when this rank holds no part.
  absl::Status Mlp(const Block& b, const float* x, int64_t T, int64_t D, float* out);
};

}  // namespace expertmesh::cuda
