// CudaEngine: the attention side of DeepSeek-V3's forward pass on the GPUs of one process, with
// the reference engine's contract (core/engine/forward_engine.h): Forward / ForwardMtp over a batch
// of sequences, logits and final-normed hidden states back on the host, routed experts through
// the given RoutedExperts (remote shards in the attention service), fed from and returned into
// pinned host buffers (GeForce cards have no GPUDirect RDMA).
//
// Tensor parallelism (core/kernels/plan/tp_plan.h) over `devices` (rank i on devices[i]): attention
// heads split, dense MLP / shared expert split by intermediate, partial sums all-reduced with
// NcclGroup; embeddings, norms and the latent KV cache replicated on every rank (MLA's latent is
// shared by all heads); the gate, the routed-expert call and lm_head run once (rank 0).
//
// KV cache: per rank a paged BF16 latent cache [layer][page][page_size][kv_lora_rank +
// qk_rope_head_dim] (and a 1-layer one for the MTP module), addressed by the page ids each
// sequence's MlaKvCache reports (MlaKvCache::page_ids: the attention service's KvBlockPool
// blocks), so Truncate (MTP rollback) stays a length change. The caches' host Slot()s are not
// used.
//
// Per layer, per rank: RMSNorm -> q_a / q_b (or q_proj), kv_a -> RoPE -> cache write ->
// absorbed MLA (q_nope W_UK batched GEMM, MlaDecode, W_UV batched GEMM) -> o_proj -> all-reduce
// -> residual -> RMSNorm -> MLP (SwiGLU) or MoE (gate on the GPU: sigmoid scores + GateTopk;
// FP8 rows and routes to pinned host memory, RoutedExperts called from the host while the
// shared expert runs on the GPUs, its sums copied back) -> all-reduce -> residual. FP8 projections
// run the FP8 block-scaled kernel (Fp8Linear) when the rank's slice keeps whole 128x128 blocks,
// else as float GEMMs (cuBLAS) over dequantized weights with FP8-quantized-and-dequantized
// activations (the same numbers). BF16 / F32 matrices are held as float (cuBLAS SGEMM): exact, at
// twice BF16's memory; embedding tables stay BF16 (rows widened when gathered).
//
// Prefill runs the decode kernel once per new position: each query row is its own MlaDecode
// "sequence" with its causal length (start + i + 1) over its sequence's page table -- correct
// first; a prefill kernel is future work.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine/forward_engine.h"
#include "core/engine/kv_cache.h"
#include "core/kernels/plan/tp_plan.h"
#include "core/model/experts.h"
#include "core/model/model.h"

namespace expertmesh::cuda {

class NcclGroup;

struct CudaEngineOptions {
  std::vector<int> devices = {0};  // tensor-parallel ranks; distinct, visible
  int64_t kv_pages = 256;          // pages of the main cache (the service: --kv-blocks)
  int64_t page_size = 16;          // tokens per page (the service: --kv-block-size)
  int64_t mtp_kv_pages = -1;       // pages of the MTP cache; -1 = kv_pages when the model has MTP
  EngineOptions engine;            // quantize_activations; attention must be kAbsorbed
};

class CudaEngine : public ForwardEngine {
 public:
  // `model` and `experts` must outlive the engine (experts may be null without MoE layers).
  // Errors: no CUDA device / a listed device absent, num_attention_heads not divisible by the
  // device count, several devices without NCCL, unsupported device or shapes.
  static absl::StatusOr<std::unique_ptr<CudaEngine>> Create(const Model& model,
                                                            RoutedExperts* experts,
                                                            CudaEngineOptions options);
  ~CudaEngine() override;

  // Not reentrant (scratch buffers are reused): one caller at a time, as the scheduler's step
  // thread. Each sequence's cache must be paged (page_ids() covering length() + its new tokens,
  // with this engine's page_size, ids < kv_pages); 1 layer for ForwardMtp.
  absl::StatusOr<std::vector<SequenceOutput>> Forward(
      std::span<const SequenceInput> batch) override;
  absl::StatusOr<std::vector<SequenceOutput>> ForwardMtp(std::span<const MtpInput> batch,
                                                         int depth) override;
  const Model& model() const override { return model_; }

  int tp_size() const { return plan_.tp_size; }
  const TpPlan& plan() const { return plan_; }
  uint64_t device_bytes() const;  // weights + caches + scratch, all ranks

  // Per-GPU state and one decoder layer's weights on a rank (cuda_engine_rank.h); one forward's
  // host-side description (cuda_engine.cc).
  struct Rank;
  struct Block;
  struct Batch;

 private:
  CudaEngine(const Model& model, RoutedExperts* experts, CudaEngineOptions options, TpPlan plan);
  // Extends the caches, checks their pages, fills the per-token arrays; restores on failure.
  absl::Status Prepare(Batch& b);
  absl::StatusOr<std::vector<SequenceOutput>> Run(Batch& b, int mtp_depth);
  // One decoder layer (mtp_depth < 0: main layer layer_index; else the MTP module's block),
  // in phases: AttentionHeads on every rank, OutputProjection, FeedForward.
  struct LayerRef {
    int mtp_depth = -1;
    size_t index = 0;
  };
  absl::Status Layer(Batch& b, int mtp_depth, size_t layer_index);
  const Block& BlockOf(const Rank& r, const LayerRef& l) const;
  absl::Status AttentionHeads(Batch& b, Rank& r, const LayerRef& l);
  absl::Status OutputProjection(Batch& b, const LayerRef& l);
  absl::Status FeedForward(Batch& b, const LayerRef& l);
  absl::Status AllReduce(const std::vector<float*>& buffers, int64_t count);
  // MoE, on rank 0: the gate (scores GEMM, sigmoid, noaux_tc top-k) and the rows for the
  // shards (FP8 + scales, or float) are computed on the GPU and copied to pinned host memory;
  // then, while the shared expert runs, the routed-expert call, its sums added into delta.
  absl::Status EnqueueGate(Rank& r, const Block& w, int64_t T);
  absl::Status CallRoutedExperts(Rank& r, const Block& w, int64_t T);

  const Model& model_;
  RoutedExperts* experts_;
  CudaEngineOptions options_;
  TpPlan plan_;
  float softmax_scale_ = 1.0f;     // Rope(config): YaRN's scale included
  float attention_factor_ = 1.0f;  // RoPE cos/sin scaling
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::shared_ptr<NcclGroup> nccl_;  // when tp_size > 1
};

// A sequence's cache as a list of pages of a CudaEngine's device cache (tests and tools; the
// attention service uses its PagedKvCache). Holds no host slots: Slot() returns null.
class PageListCache : public MlaKvCache {
 public:
  PageListCache(int num_layers, int64_t row_size, std::vector<int32_t> pages, int64_t page_size)
      : num_layers_(num_layers),
        row_size_(row_size),
        pages_(std::move(pages)),
        page_size_(page_size) {}
  int64_t length() const override { return length_; }
  absl::Status Extend(int64_t n) override;
  void Truncate(int64_t new_length) override { length_ = new_length; }
  float* Slot(int, int64_t) override { return nullptr; }
  const float* Slot(int, int64_t) const override { return nullptr; }
  int num_layers() const override { return num_layers_; }
  int64_t row_size() const override { return row_size_; }
  std::span<const int32_t> page_ids() const override { return pages_; }
  int64_t page_size() const override { return page_size_; }

 private:
  int num_layers_;
  int64_t row_size_;
  std::vector<int32_t> pages_;
  int64_t page_size_;
  int64_t length_ = 0;
};

}  // namespace expertmesh::cuda
