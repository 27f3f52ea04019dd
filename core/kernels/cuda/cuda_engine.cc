// CudaEngine (see cuda_engine.h): validation, the batch's paged addressing and the layer loop.
// What one GPU holds and its ops: cuda_engine_rank.{h,cc}.
// Legend: T = tokens of the batch, D = hidden_size, Hl = heads on a rank, qk = qk_head_dim,
// R = kv_lora_rank, Dkv = R + qk_rope_head_dim, v = v_head_dim.
#include "core/kernels/cuda/cuda_engine.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/engine/layers.h"
#include "core/kernels/cuda/cuda_engine_rank.h"
#include "core/kernels/cuda/device_buffer.h"
#include "core/kernels/cuda/dispatch.h"
#include "core/kernels/cuda/engine_kernels.h"
#include "core/kernels/plan/paged_batch.h"
#include "core/model/gate.h"
#include "core/numerics/quant.h"
#if EXPERTMESH_HAVE_NCCL
#include "core/kernels/cuda/nccl_group.h"
#endif

namespace expertmesh::cuda {

// Every new token is one query row of the MLA decode kernel, whose grid's y dimension counts them.
constexpr int64_t kMaxRowsPerForward = 65535;

// One forward's host-side description.
struct CudaEngine::Batch {
  struct Seq {
    MlaKvCache* cache = nullptr;
    int64_t start = 0;      // cached length before this forward
    int64_t row_begin = 0;  // first row in the batch
    int64_t n = 0;
    bool all_logits = false;
  };
  std::vector<Seq> seqs;
  std::vector<int32_t> tokens;  // [T]
  std::vector<float> hidden;    // MTP: [T, D] main-model hidden states
  int64_t T = 0;
  int64_t max_pages = 0;          // columns of the per-token block table
  std::vector<int32_t> ints;      // tokens | positions | seq_lens | out_rows | block_table
  std::vector<int64_t> slots;     // [T] cache row of each new token
  std::vector<int32_t> out_rows;  // rows whose logits are wanted
  int64_t kv_pages = 0;           // pages of the cache this forward writes
};

absl::Status PageListCache::Extend(int64_t n) {
  if (n < 0 || length_ + n > static_cast<int64_t>(pages_.size()) * page_size_) {
    return absl::ResourceExhaustedError(absl::StrCat("page list cache: ", length_, " + ", n,
                                                     " tokens exceed ", pages_.size(), " pages"));
  }
  length_ += n;
  return absl::OkStatus();
}

CudaEngine::CudaEngine(const Model& model, RoutedExperts* experts, CudaEngineOptions options,
                       TpPlan plan)
    : model_(model), experts_(experts), options_(std::move(options)), plan_(std::move(plan)) {}

CudaEngine::~CudaEngine() {
  ranks_.clear();  // before the NCCL group whose streams they may use
  nccl_.reset();
}

uint64_t CudaEngine::device_bytes() const {
  uint64_t n = 0;
  for (const auto& r : ranks_) {
    n +=
        r->embed.bytes() + r->norm.bytes() + r->lm_head.bytes() + r->kv.bytes() + r->mtp_kv.bytes();
    for (const auto* blocks : {&r->layers, &r->mtp_blocks}) {
      for (const Block& b : *blocks) {
        for (const DevLinear* l : {&b.q_a, &b.q_b, &b.q, &b.kv_a, &b.o, &b.gate, &b.up, &b.down}) {
          n += l->bytes();
        }
        n += b.w_uk.bytes() + b.w_uv.bytes();
      }
    }
    for (const MtpDev& m : r->mtp) n += m.embed.bytes() + m.eh_proj.bytes() + m.head.bytes();
  }
  return n;
}

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Create(const Model& model,
                                                               RoutedExperts* experts,
                                                               CudaEngineOptions options) {
  const ModelConfig& c = model.config();
  if (options.engine.attention != AttentionForm::kAbsorbed) {
    return absl::UnimplementedError("CUDA engine: only the absorbed MLA form is implemented");
  }
  bool has_moe = false;
  for (const auto& layer : model.layers()) has_moe |= layer.is_moe;
  for (const auto& m : model.mtp()) has_moe |= m.block.is_moe;
  if (has_moe && experts == nullptr) {
    return absl::InvalidArgumentError("CUDA engine: the model has MoE layers but no RoutedExperts");
  }
  if (options.devices.empty()) return absl::InvalidArgumentError("CUDA engine: no devices");
  if (options.kv_pages < 1 || options.page_size < 1) {
    return absl::InvalidArgumentError("CUDA engine: kv_pages and page_size must be >= 1");
  }
  if (c.kv_lora_rank > kMlaMaxLoraRank || c.kv_lora_rank % 2 != 0) {
    return absl::UnimplementedError(absl::StrFormat(
        "CUDA engine: kv_lora_rank %d (even, at most %d)", c.kv_lora_rank, kMlaMaxLoraRank));
  }
  const absl::StatusOr<int> visible = DeviceCount();
  if (!visible.ok()) return visible.status();
  const int n_visible = *visible;
  if (n_visible == 0) {
    return absl::FailedPreconditionError("CUDA engine: no CUDA device present");
  }
  std::vector<int> sorted = options.devices;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    return absl::InvalidArgumentError("CUDA engine: a device is listed twice");
  }
  for (int d : options.devices) {
    if (d < 0 || d >= n_visible) {
      return absl::FailedPreconditionError(
          absl::StrFormat("cuda:%d requested, %d CUDA device(s) visible", d, n_visible));
    }
  }
  const int tp = static_cast<int>(options.devices.size());
  bool fp8 = false;
  for (const auto& layer : model.layers()) fp8 |= layer.self_attn.o_proj.is_fp8();
  absl::StatusOr<TpPlan> plan =
      PlanTensorParallel(c, tp, fp8 && options.engine.quantize_activations);
  if (!plan.ok()) return plan.status();
  if (options.mtp_kv_pages < 0) options.mtp_kv_pages = model.mtp().empty() ? 0 : options.kv_pages;

  std::unique_ptr<CudaEngine> e(new CudaEngine(model, experts, options, *std::move(plan)));
  const expertmesh::Rope rope(c);
  e->softmax_scale_ = rope.softmax_scale();
  e->attention_factor_ = rope.attention_factor();
  if (tp > 1) {
#if EXPERTMESH_HAVE_NCCL
    absl::StatusOr<std::unique_ptr<NcclGroup>> group = NcclGroup::Create(options.devices);
    if (!group.ok()) return group.status();
    e->nccl_ = std::shared_ptr<NcclGroup>(std::move(*group));
#else
    return absl::UnimplementedError(
        "CUDA engine: tensor parallelism over several devices needs NCCL (not built in)");
#endif
  }
  for (int r = 0; r < tp; ++r) {
    cudaStream_t stream = nullptr;  // its own, or the NCCL group's for that rank
#if EXPERTMESH_HAVE_NCCL
    if (e->nccl_ != nullptr) stream = e->nccl_->stream(r);
#endif
    absl::StatusOr<std::unique_ptr<Rank>> rank =
        Rank::Create(model, e->plan_.ranks[r], options.devices[r], stream, e->options_);
    if (!rank.ok()) return rank.status();
    e->ranks_.push_back(*std::move(rank));
  }
  return e;
}

absl::Status CudaEngine::Prepare(Batch& b) {
  const int64_t ps = options_.page_size;
  int64_t row = 0;
  auto restore = [&b](size_t upto) {
    for (size_t i = 0; i < upto; ++i) b.seqs[i].cache->Truncate(b.seqs[i].start);
  };
  std::vector<PagedSequence> paged;
  for (size_t i = 0; i < b.seqs.size(); ++i) {
    Batch::Seq& s = b.seqs[i];
    s.start = s.cache->length();
    s.row_begin = row;
    row += s.n;
    if (s.cache->page_size() != ps || s.cache->page_ids().empty()) {
      restore(i);
      return absl::InvalidArgumentError(
          absl::StrFormat("CUDA engine: caches must be paged with page_size %d (got page_size %d)",
                          ps, s.cache->page_size()));
    }
    if (absl::Status st = s.cache->Extend(s.n); !st.ok()) {
      restore(i);
      return st;
    }
    paged.push_back({s.cache->page_ids(), s.start, s.n, s.all_logits});
  }
  absl::StatusOr<PagedBatchLayout> layout = BuildPagedBatchLayout(paged, ps, b.kv_pages);
  if (layout.ok() && layout->n_tokens > kMaxRowsPerForward) {
    layout = absl::InvalidArgumentError(
        absl::StrFormat("CUDA engine: %d new tokens in one forward, at most %d (MLA decode grid)",
                        layout->n_tokens, kMaxRowsPerForward));
  }
  if (!layout.ok()) {
    restore(b.seqs.size());
    return layout.status();
  }
  b.T = layout->n_tokens;
  b.max_pages = layout->max_pages;
  b.slots = std::move(layout->slots);
  b.out_rows = std::move(layout->out_rows);
  b.ints = b.tokens;
  b.ints.insert(b.ints.end(), layout->positions.begin(), layout->positions.end());
  b.ints.insert(b.ints.end(), layout->seq_lens.begin(), layout->seq_lens.end());
  b.ints.insert(b.ints.end(), b.out_rows.begin(), b.out_rows.end());
  b.ints.insert(b.ints.end(), layout->block_table.begin(), layout->block_table.end());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<SequenceOutput>> CudaEngine::Forward(
    std::span<const SequenceInput> batch) {
  const ModelConfig& c = model_.config();
  Batch b;
  b.kv_pages = options_.kv_pages;
  for (const SequenceInput& in : batch) {
    if (in.tokens.empty() || in.cache == nullptr || in.cache->num_layers() != c.num_hidden_layers ||
        in.cache->row_size() != c.kv_lora_rank + c.qk_rope_head_dim) {
      return absl::InvalidArgumentError(
          "CUDA engine: each sequence needs >= 1 token and a cache shaped for the model");
    }
    for (int32_t t : in.tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "CUDA engine: token %d outside the vocabulary [0, %d)", t, c.vocab_size));
      }
    }
    b.seqs.push_back({in.cache, 0, 0, std::ssize(in.tokens), in.all_logits});
    b.tokens.insert(b.tokens.end(), in.tokens.begin(), in.tokens.end());
  }
  if (b.seqs.empty()) return std::vector<SequenceOutput>{};
  EM_RETURN_IF_ERROR(Prepare(b));
  absl::StatusOr<std::vector<SequenceOutput>> out = Run(b, -1);
  if (!out.ok()) {
    for (const Batch::Seq& s : b.seqs) s.cache->Truncate(s.start);
  }
  return out;
}

absl::StatusOr<std::vector<SequenceOutput>> CudaEngine::ForwardMtp(std::span<const MtpInput> batch,
                                                                   int depth) {
  const ModelConfig& c = model_.config();
  const int64_t D = c.hidden_size;
  if (depth < 0 || depth >= std::ssize(model_.mtp())) {
    return absl::InvalidArgumentError(
        absl::StrFormat("CUDA engine: no MTP module %d loaded (%d)", depth, model_.mtp().size()));
  }
  Batch b;
  b.kv_pages = options_.mtp_kv_pages;
  for (const MtpInput& in : batch) {
    const int64_t n = std::ssize(in.next_tokens);
    if (n == 0 || std::ssize(in.hidden) != n * D || in.cache == nullptr ||
        in.cache->num_layers() != 1) {
      return absl::InvalidArgumentError(
          "CUDA engine: MTP input needs n >= 1 tokens, [n, hidden_size] hidden states and a "
          "1-layer cache");
    }
    for (int32_t t : in.next_tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "CUDA engine: token %d outside the vocabulary [0, %d)", t, c.vocab_size));
      }
    }
    b.seqs.push_back({in.cache, 0, 0, n, in.all_logits});
    b.tokens.insert(b.tokens.end(), in.next_tokens.begin(), in.next_tokens.end());
    b.hidden.insert(b.hidden.end(), in.hidden.begin(), in.hidden.end());
  }
  if (b.seqs.empty()) return std::vector<SequenceOutput>{};
  EM_RETURN_IF_ERROR(Prepare(b));
  absl::StatusOr<std::vector<SequenceOutput>> out = Run(b, depth);
  if (!out.ok()) {
    for (const Batch::Seq& s : b.seqs) s.cache->Truncate(s.start);
  }
  return out;
}

absl::Status CudaEngine::AllReduce(const std::vector<float*>& buffers, int64_t count) {
  if (nccl_ == nullptr) return absl::OkStatus();
#if EXPERTMESH_HAVE_NCCL
  return nccl_->AllReduceSum(buffers, static_cast<size_t>(count));
#else
  return absl::InternalError("CUDA engine: all-reduce without NCCL");
#endif
}

absl::StatusOr<std::vector<SequenceOutput>> CudaEngine::Run(Batch& b, int mtp_depth) {
  const DeviceGuard guard;  // the caller's current device is back when this returns
  const ModelConfig& c = model_.config();
  const int64_t T = b.T, D = c.hidden_size, Dkv = c.kv_lora_rank + c.qk_rope_head_dim;
  const int64_t H = c.num_attention_heads, Hl = H / plan_.tp_size;
  const int64_t rows_out = std::ssize(b.out_rows);
  int64_t max_in = std::max({2 * D, c.q_lora_rank, H * c.v_head_dim, c.intermediate_size,
                             c.n_shared_experts * c.moe_intermediate_size});
  int64_t max_inter = 0;
  for (const RankShard& s : plan_.ranks) {
    max_inter = std::max({max_inter, s.mlp_inter.size(), s.shared_inter.size()});
  }
  // Reserve every buffer first: nothing is reallocated while work is queued.
  for (auto& rp : ranks_) {
    Rank& r = *rp;
    EM_RETURN_IF_ERROR(SetDevice(r.device));
    for (auto* buf : {&r.h, &r.xn, &r.delta, &r.routed}) EM_RETURN_IF_ERROR(Reserve(*buf, T * D));
    EM_RETURN_IF_ERROR(Reserve(r.qa, T * std::max<int64_t>(c.q_lora_rank, 1)));
    EM_RETURN_IF_ERROR(Reserve(r.q, T * Hl * c.qk_head_dim()));
    EM_RETURN_IF_ERROR(Reserve(r.kvr, T * Dkv));
    EM_RETURN_IF_ERROR(Reserve(r.qm, T * Hl * Dkv));
    EM_RETURN_IF_ERROR(Reserve(r.ctx, T * Hl * c.kv_lora_rank));
    EM_RETURN_IF_ERROR(Reserve(r.attn, T * Hl * c.v_head_dim));
    EM_RETURN_IF_ERROR(Reserve(r.attn_all, T * H * c.v_head_dim));
    EM_RETURN_IF_ERROR(Reserve(r.gathered, T * H * c.v_head_dim));
    EM_RETURN_IF_ERROR(Reserve(r.g, T * std::max<int64_t>(max_inter, 1)));
    EM_RETURN_IF_ERROR(Reserve(r.u, T * std::max<int64_t>(max_inter, 1)));
    EM_RETURN_IF_ERROR(Reserve(r.x32, T * max_in));
    EM_RETURN_IF_ERROR(Reserve(r.x8, T * max_in));
    EM_RETURN_IF_ERROR(Reserve(r.x8_scales, T * NumBlocks(max_in, 128)));
    EM_RETURN_IF_ERROR(Reserve(r.cat, T * 2 * D));
    EM_RETURN_IF_ERROR(Reserve(r.sel, rows_out * D));
    EM_RETURN_IF_ERROR(Reserve(r.logits, rows_out * c.vocab_size));
    EM_RETURN_IF_ERROR(Reserve(r.ints, b.ints.size()));
    EM_RETURN_IF_ERROR(Reserve(r.slots, b.slots.size()));
    if (r.rank == 0) {
      const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
      EM_RETURN_IF_ERROR(Reserve(r.scores, T * std::max<int64_t>(E, 1)));
      EM_RETURN_IF_ERROR(Reserve(r.topk_weights, T * std::max<int64_t>(k, 1)));
      EM_RETURN_IF_ERROR(Reserve(r.topk_ids, T * std::max<int64_t>(k, 1)));
      EM_RETURN_IF_ERROR(Reserve(r.host_x, T * D));
      EM_RETURN_IF_ERROR(Reserve(r.host_routed, T * D));
      EM_RETURN_IF_ERROR(Reserve(r.host_x8, T * D));
      EM_RETURN_IF_ERROR(Reserve(r.host_scales, T * NumBlocks(D, 128)));
      EM_RETURN_IF_ERROR(Reserve(r.host_topk_weights, T * std::max<int64_t>(k, 1)));
      EM_RETURN_IF_ERROR(Reserve(r.host_topk_ids, T * std::max<int64_t>(k, 1)));
    }
    EM_RETURN_IF_ERROR(r.ints.CopyFromHost(b.ints, r.stream));
    EM_RETURN_IF_ERROR(r.slots.CopyFromHost(b.slots, r.stream));
  }
  // Embeddings (and for MTP: eh_proj(concat(enorm(embed(t[i+1])), hnorm(h[i])))) on every rank.
  for (auto& rp : ranks_) {
    Rank& r = *rp;
    EM_RETURN_IF_ERROR(SetDevice(r.device));
    const DevEmbedding& table =
        mtp_depth >= 0 && r.mtp[mtp_depth].embed.present() ? r.mtp[mtp_depth].embed : r.embed;
    EM_RETURN_IF_ERROR(r.Embed(table, r.ints.get(), T, D, mtp_depth >= 0 ? r.xn.get() : r.h.get()));
    if (mtp_depth < 0) continue;
    const MtpDev& m = r.mtp[mtp_depth];
    EM_RETURN_IF_ERROR(r.delta.CopyFromHost(b.hidden, r.stream));
    EM_RETURN_IF_ERROR(r.Norm(r.xn.get(), m.enorm, T, D, c.rms_norm_eps, r.xn.get()));
    EM_RETURN_IF_ERROR(r.Norm(r.delta.get(), m.hnorm, T, D, c.rms_norm_eps, r.delta.get()));
    for (auto [src, col] : {std::pair{r.xn.get(), 0}, std::pair{r.delta.get(), 1}}) {
      EM_RETURN_IF_ERROR(CudaStatus(
          cudaMemcpy2DAsync(r.cat.get() + col * D, 2 * D * sizeof(float), src, D * sizeof(float),
                            D * sizeof(float), T, cudaMemcpyDeviceToDevice, r.stream),
          "concat"));
    }
    EM_RETURN_IF_ERROR(r.Linear(m.eh_proj, r.cat.get(), T, r.h.get()));
  }
  const size_t n_layers = mtp_depth >= 0 ? 1 : model_.layers().size();
  for (size_t l = 0; l < n_layers; ++l) EM_RETURN_IF_ERROR(Layer(b, mtp_depth, l));

  // Outputs on rank 0: the final norm over every row (the hidden states handed out, the MTP
  // module's input, as the reference engine's), then the head on the wanted rows.
  Rank& r = *ranks_[0];
  EM_RETURN_IF_ERROR(SetDevice(r.device));
  const DeviceBuffer<float>& norm = mtp_depth >= 0 ? r.mtp[mtp_depth].head_norm : r.norm;
  const DevLinear& head = mtp_depth >= 0 ? r.mtp[mtp_depth].head : r.lm_head;
  const int32_t* out_rows = r.ints.get() + 3 * T;
  EM_RETURN_IF_ERROR(r.Norm(r.h.get(), norm, T, D, c.rms_norm_eps, r.h.get()));
  EM_RETURN_IF_ERROR(
      CudaStatus(LaunchGatherRows(r.h.get(), out_rows, static_cast<int32_t>(rows_out),
                                  static_cast<int32_t>(D), r.sel.get(), r.stream),
                 "output rows"));
  EM_RETURN_IF_ERROR(r.Linear(head, r.sel.get(), rows_out, r.logits.get()));
  std::vector<float> hidden(T * D), logits(rows_out * c.vocab_size);
  EM_RETURN_IF_ERROR(r.h.CopyToHost(std::span<float>(hidden), r.stream));
  EM_RETURN_IF_ERROR(r.logits.CopyToHost(std::span<float>(logits), r.stream));
  for (auto& rp : ranks_) {  // the other ranks' last all-reduce / residual
    EM_RETURN_IF_ERROR(SetDevice(rp->device));
    EM_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(rp->stream), "forward"));
  }
  std::vector<SequenceOutput> outs(b.seqs.size());
  int64_t logit_row = 0;
  for (size_t i = 0; i < b.seqs.size(); ++i) {
    const Batch::Seq& s = b.seqs[i];
    outs[i].hidden.assign(hidden.begin() + s.row_begin * D,
                          hidden.begin() + (s.row_begin + s.n) * D);
    const int64_t rows = s.all_logits ? s.n : 1;
    outs[i].logits.assign(logits.begin() + logit_row * c.vocab_size,
                          logits.begin() + (logit_row + rows) * c.vocab_size);
    logit_row += rows;
  }
  return outs;
}

const CudaEngine::Block& CudaEngine::BlockOf(const Rank& r, const LayerRef& l) const {
  return l.mtp_depth >= 0 ? r.mtp_blocks[l.mtp_depth] : r.layers[l.index];
}

// Attention on one rank up to its head outputs attn: [T, Hl * v]: projections, RoPE, the
// latent cache write, the absorbed query, MLA decode over the pages, W_UV.
absl::Status CudaEngine::AttentionHeads(Batch& b, Rank& r, const LayerRef& l) {
  const ModelConfig& c = model_.config();
  const int64_t T = b.T, D = c.hidden_size, R = c.kv_lora_rank, Dkv = R + c.qk_rope_head_dim;
  const int64_t nope = c.qk_nope_head_dim, rope_dim = c.qk_rope_head_dim, qk = c.qk_head_dim();
  const int64_t v = c.v_head_dim, Hl = c.num_attention_heads / plan_.tp_size;
  const float one = 1.0f, zero = 0.0f;
  const Block& w = BlockOf(r, l);
  const int cache_layer = l.mtp_depth >= 0 ? 0 : static_cast<int>(l.index);
  uint16_t* cache = (l.mtp_depth >= 0 ? r.mtp_kv.get() : r.kv.get()) +
                    cache_layer * b.kv_pages * options_.page_size * Dkv;
  const int32_t* positions = r.ints.get() + T;
  const int32_t* seq_lens = r.ints.get() + 2 * T;
  const int32_t* table = r.ints.get() + 3 * T + b.out_rows.size();
  EM_RETURN_IF_ERROR(r.Norm(r.h.get(), w.input_layernorm, T, D, c.rms_norm_eps, r.xn.get()));
  if (w.q.present()) {
    EM_RETURN_IF_ERROR(r.Linear(w.q, r.xn.get(), T, r.q.get()));
  } else {
    EM_RETURN_IF_ERROR(r.Linear(w.q_a, r.xn.get(), T, r.qa.get()));
    EM_RETURN_IF_ERROR(
        r.Norm(r.qa.get(), w.q_a_layernorm, T, c.q_lora_rank, c.rms_norm_eps, r.qa.get()));
    EM_RETURN_IF_ERROR(r.Linear(w.q_b, r.qa.get(), T, r.q.get()));
  }
  // kv: [T, R | rope] -> RoPE on k_pe -> kv_a_layernorm on c_kv and BF16 into the cache.
  EM_RETURN_IF_ERROR(r.Linear(w.kv_a, r.xn.get(), T, r.kvr.get()));
  RopeParams rp_kv;
  rp_kv.n_tokens = static_cast<int32_t>(T);
  rp_kv.n_heads = 1;
  rp_kv.head_stride = static_cast<int32_t>(Dkv);
  rp_kv.token_stride = static_cast<int32_t>(Dkv);
  rp_kv.rope_offset = static_cast<int32_t>(R);
  rp_kv.rope_dim = static_cast<int32_t>(rope_dim);
  rp_kv.attention_scaling = attention_factor_;
  rp_kv.inv_freq = r.inv_freq.get();
  rp_kv.positions = positions;
  rp_kv.x = r.kvr.get();
  EM_RETURN_IF_ERROR(Rope(rp_kv, r.stream));
  KvCacheWriteParams kw;
  kw.n_tokens = static_cast<int32_t>(T);
  kw.kv_lora_rank = static_cast<int32_t>(R);
  kw.qk_rope_head_dim = static_cast<int32_t>(rope_dim);
  kw.eps = static_cast<float>(c.rms_norm_eps);
  kw.kv = r.kvr.get();
  kw.norm_weight = w.kv_a_layernorm.get();
  kw.slot = r.slots.get();
  kw.cache = cache;
  EM_RETURN_IF_ERROR(CudaStatus(LaunchKvCacheWrite(kw, r.stream), "KV cache write"));
  // q: [T, Hl, nope | rope] -> RoPE on q_pe.
  RopeParams rp_q = rp_kv;
  rp_q.n_heads = static_cast<int32_t>(Hl);
  rp_q.head_stride = static_cast<int32_t>(qk);
  rp_q.token_stride = static_cast<int32_t>(Hl * qk);
  rp_q.rope_offset = static_cast<int32_t>(nope);
  rp_q.x = r.q.get();
  EM_RETURN_IF_ERROR(Rope(rp_q, r.stream));
  // Absorbed query qm: [T, Hl, R | rope]: per head q_nope . W_UK (column-major: qm_h^T [R, T] =
  // W_UK_h^T [R, nope] . q_nope_h^T [nope, T]), then q_pe copied beside it.
  EM_RETURN_IF_ERROR(
      BlasStatus(cublasSgemmStridedBatched(r.blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(R),
                                           static_cast<int>(T), static_cast<int>(nope), &one,
                                           w.w_uk.get(), static_cast<int>(R), nope * R, r.q.get(),
                                           static_cast<int>(Hl * qk), qk, &zero, r.qm.get(),
                                           static_cast<int>(Hl * Dkv), Dkv, static_cast<int>(Hl)),
                 "q_nope . W_UK"));
  EM_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpy2DAsync(r.qm.get() + R, Dkv * sizeof(float), r.q.get() + nope, qk * sizeof(float),
                        rope_dim * sizeof(float), T * Hl, cudaMemcpyDeviceToDevice, r.stream),
      "q_pe copy"));
  // Prefill = the decode kernel once per new position: each token row is its own query
  // "sequence" with causal length start + i + 1 over its sequence's page table.
  MlaDecodeParams md;
  md.n_seqs = static_cast<int32_t>(T);
  md.num_heads = static_cast<int32_t>(Hl);
  md.kv_lora_rank = static_cast<int32_t>(R);
  md.qk_rope_head_dim = static_cast<int32_t>(rope_dim);
  md.page_size = static_cast<int32_t>(options_.page_size);
  md.max_pages_per_seq = static_cast<int32_t>(b.max_pages);
  md.softmax_scale = softmax_scale_;
  md.q = r.qm.get();
  md.kv_cache = cache;
  md.block_table = table;
  md.seq_lens = seq_lens;
  md.out = r.ctx.get();
  EM_RETURN_IF_ERROR(MlaDecode(r.arch, md, r.stream));
  // attn_h [T, v] = ctx_h [T, R] . W_UV_h^T (column-major: attn_h^T = W_UV_h . ctx_h^T).
  EM_RETURN_IF_ERROR(
      BlasStatus(cublasSgemmStridedBatched(r.blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(v),
                                           static_cast<int>(T), static_cast<int>(R), &one,
                                           w.w_uv.get(), static_cast<int>(R), v * R, r.ctx.get(),
                                           static_cast<int>(Hl * R), R, &zero, r.attn.get(),
                                           static_cast<int>(Hl * v), v, static_cast<int>(Hl)),
                 "ctx . W_UV"));
  return absl::OkStatus();
}

// o_proj: column-parallel partial sums all-reduced, or all heads gathered and o_proj whole;
// then the residual and post_attention_layernorm on every rank.
absl::Status CudaEngine::OutputProjection(Batch& b, const LayerRef& l) {
  const ModelConfig& c = model_.config();
  const int64_t T = b.T, D = c.hidden_size, v = c.v_head_dim, H = c.num_attention_heads;
  const int64_t tp = plan_.tp_size, Hl = H / tp;
  std::vector<float*> deltas;
  for (auto& rp : ranks_) deltas.push_back(rp->delta.get());
  if (plan_.o_proj == OProjMode::kGatherReplicated && tp > 1) {
#if EXPERTMESH_HAVE_NCCL
    std::vector<const float*> send;
    std::vector<float*> recv;
    for (auto& rp : ranks_) {
      send.push_back(rp->attn.get());
      recv.push_back(rp->gathered.get());
    }
    EM_RETURN_IF_ERROR(nccl_->AllGather(send, recv, static_cast<size_t>(T * Hl * v)));
#endif
    for (auto& rp : ranks_) {
      Rank& r = *rp;
      EM_RETURN_IF_ERROR(SetDevice(r.device));
      // gathered: [tp, T, Hl * v] -> attn_all: [T, H * v] (rank k's heads at columns k Hl v).
      for (int64_t k = 0; k < tp; ++k) {
        EM_RETURN_IF_ERROR(CudaStatus(
            cudaMemcpy2DAsync(r.attn_all.get() + k * Hl * v, H * v * sizeof(float),
                              r.gathered.get() + k * T * Hl * v, Hl * v * sizeof(float),
                              Hl * v * sizeof(float), T, cudaMemcpyDeviceToDevice, r.stream),
            "gathered heads"));
      }
      EM_RETURN_IF_ERROR(r.Linear(BlockOf(r, l).o, r.attn_all.get(), T, r.delta.get()));
    }
  } else {
    for (auto& rp : ranks_) {
      Rank& r = *rp;
      EM_RETURN_IF_ERROR(SetDevice(r.device));
      EM_RETURN_IF_ERROR(r.Linear(BlockOf(r, l).o, r.attn.get(), T, r.delta.get()));
    }
    EM_RETURN_IF_ERROR(AllReduce(deltas, T * D));
  }
  for (auto& rp : ranks_) {
    Rank& r = *rp;
    EM_RETURN_IF_ERROR(SetDevice(r.device));
    EM_RETURN_IF_ERROR(r.Add(r.delta.get(), r.h.get(), T * D));
    EM_RETURN_IF_ERROR(r.Norm(r.h.get(), BlockOf(r, l).post_attention_layernorm, T, D,
                              c.rms_norm_eps, r.xn.get()));
  }
  return absl::OkStatus();
}

// The dense MLP part, or MoE (gate on rank 0, routed experts through the host while the
// shared expert part runs on every GPU); then the residual.
absl::Status CudaEngine::FeedForward(Batch& b, const LayerRef& l) {
  const int64_t T = b.T, D = model_.config().hidden_size;
  std::vector<float*> deltas;
  for (auto& rp : ranks_) deltas.push_back(rp->delta.get());
  Rank& r0 = *ranks_[0];
  const Block& w0 = BlockOf(r0, l);
  if (w0.is_moe) EM_RETURN_IF_ERROR(EnqueueGate(r0, w0, T));
  for (auto& rp : ranks_) {
    Rank& r = *rp;
    EM_RETURN_IF_ERROR(SetDevice(r.device));
    EM_RETURN_IF_ERROR(r.Mlp(BlockOf(r, l), r.xn.get(), T, D, r.delta.get()));
  }
  if (w0.is_moe) EM_RETURN_IF_ERROR(CallRoutedExperts(r0, w0, T));
  EM_RETURN_IF_ERROR(AllReduce(deltas, T * D));
  for (auto& rp : ranks_) {
    Rank& r = *rp;
    EM_RETURN_IF_ERROR(SetDevice(r.device));
    EM_RETURN_IF_ERROR(r.Add(r.delta.get(), r.h.get(), T * D));
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::Layer(Batch& b, int mtp_depth, size_t layer_index) {
  const LayerRef l{mtp_depth, layer_index};
  for (auto& rp : ranks_) {
    EM_RETURN_IF_ERROR(SetDevice(rp->device));
    EM_RETURN_IF_ERROR(AttentionHeads(b, *rp, l));
  }
  EM_RETURN_IF_ERROR(OutputProjection(b, l));
  return FeedForward(b, l);
}

absl::Status CudaEngine::EnqueueGate(Rank& r, const Block& w, int64_t T) {
  const ModelConfig& c = model_.config();
  const GateParams& gp = model_.gate_params();
  const int64_t D = c.hidden_size, E = gp.n_routed_experts, k = gp.num_experts_per_tok;
  EM_RETURN_IF_ERROR(SetDevice(r.device));
  // s = sigmoid(xn . gate.weight^T): [T, E] in float32, then group-limited top-k.
  EM_RETURN_IF_ERROR(r.Linear(w.router, r.xn.get(), T, r.scores.get()));
  EM_RETURN_IF_ERROR(CudaStatus(LaunchSigmoid(r.scores.get(), T * E, r.stream), "sigmoid"));
  GateTopkParams g;
  g.n_tokens = static_cast<int32_t>(T);
  g.n_routed_experts = static_cast<int32_t>(E);
  g.n_group = static_cast<int32_t>(gp.n_group);
  g.topk_group = static_cast<int32_t>(gp.topk_group);
  g.num_experts_per_tok = static_cast<int32_t>(k);
  g.norm_topk_prob = gp.norm_topk_prob;
  g.routed_scaling_factor = static_cast<float>(gp.routed_scaling_factor);
  g.scores = r.scores.get();
  g.correction_bias = w.e_score_correction_bias.get();
  g.topk_ids = r.topk_ids.get();
  g.topk_weights = r.topk_weights.get();
  EM_RETURN_IF_ERROR(GateTopk(g, r.stream));
  // The shards' input: FP8 with 1 x 128 scales (bitwise core/numerics/quant.h), or float.
  auto d2h = [&](void* dst, const void* src, size_t bytes) {
    return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, r.stream),
                      "MoE rows to host");
  };
  if (options_.engine.quantize_activations) {
    ActQuantParams aq;
    aq.n_rows = static_cast<int32_t>(T);
    aq.dim = static_cast<int32_t>(D);
    aq.x = r.xn.get();
    aq.q = r.x8.get();
    aq.scales = r.x8_scales.get();
    EM_RETURN_IF_ERROR(ActQuant(aq, r.stream));
    EM_RETURN_IF_ERROR(d2h(r.host_x8.data(), r.x8.get(), T * D));
    EM_RETURN_IF_ERROR(
        d2h(r.host_scales.data(), r.x8_scales.get(), T * NumBlocks(D, 128) * sizeof(float)));
  } else {
    EM_RETURN_IF_ERROR(d2h(r.host_x.data(), r.xn.get(), T * D * sizeof(float)));
  }
  EM_RETURN_IF_ERROR(d2h(r.host_topk_ids.data(), r.topk_ids.get(), T * k * sizeof(int32_t)));
  EM_RETURN_IF_ERROR(d2h(r.host_topk_weights.data(), r.topk_weights.get(), T * k * sizeof(float)));
  return CudaStatus(cudaEventRecord(r.xn_ready, r.stream), "event");
}

absl::Status CudaEngine::CallRoutedExperts(Rank& r, const Block& w, int64_t T) {
  const int64_t D = model_.config().hidden_size;
  const int64_t k = model_.gate_params().num_experts_per_tok;
  EM_RETURN_IF_ERROR(SetDevice(r.device));
  EM_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(r.xn_ready), "MoE rows to host"));
  ExpertRoutes routes;  // each row's experts in ascending id order, as GateTopk writes them
  for (int64_t t = 0; t < T; ++t) {
    routes.AddRow(std::span<const int32_t>(r.host_topk_ids.data() + t * k, k),
                  std::span<const float>(r.host_topk_weights.data() + t * k, k));
  }
  const std::span<float> routed(r.host_routed.data(), T * D);
  if (options_.engine.quantize_activations) {
    QuantizedActivations q;
    q.n_rows = T;
    q.dim = D;
    q.fp8.assign(r.host_x8.data(), r.host_x8.data() + T * D);
    q.scales.assign(r.host_scales.data(), r.host_scales.data() + T * q.groups());
    EM_RETURN_IF_ERROR(experts_->Run(w.layer, q, routes, routed));
  } else {
    EM_RETURN_IF_ERROR(experts_->RunUnquantized(
        w.layer, std::span<const float>(r.host_x.data(), T * D), routes, routed));
  }
  EM_RETURN_IF_ERROR(
      CudaStatus(cudaMemcpyAsync(r.routed.get(), r.host_routed.data(), T * D * sizeof(float),
                                 cudaMemcpyHostToDevice, r.stream),
                 "routed rows to device"));
  return r.Add(r.routed.get(), r.delta.get(), T * D);
}

}  // namespace expertmesh::cuda
