// What one GPU of the CudaEngine holds and does (cuda_engine_rank.h): weight upload by the
// tensor-parallel plan, and the per-rank ops the forward pass is written in.
#include "core/kernels/cuda/cuda_engine_rank.h"

#include <string>
#include <utility>

#include "absl/strings/str_format.h"
#include "core/engine/layers.h"
#include "core/kernels/cuda/dispatch.h"
#include "core/kernels/cuda/engine_kernels.h"

namespace expertmesh::cuda {

absl::Status BlasStatus(cublasStatus_t s, std::string_view what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(
      absl::StrFormat("cuBLAS %s: %s (%d)", what, cublasGetStatusString(s), static_cast<int>(s)));
}

namespace {

template <typename T>
absl::StatusOr<DeviceBuffer<T>> Upload(std::span<const T> host) {
  return DeviceBuffer<T>::FromHost(host);
}

Range Whole(int64_t n) { return {0, n}; }

absl::StatusOr<DeviceBuffer<float>> UploadVector(const std::vector<float>& v) {
  return DeviceBuffer<float>::FromHost(std::span<const float>(v));
}

// One decoder layer's weights on rank `s`.
absl::Status UploadBlock(const ModelConfig& c, const RankShard& s, const DecoderLayerWeights& w,
                         bool quant, CudaEngine::Block& b) {
  const int64_t D = c.hidden_size;
  const int64_t nope = c.qk_nope_head_dim, v = c.v_head_dim, R = c.kv_lora_rank;
  const MlaWeights& a = w.self_attn;
  b.layer = w.layer;
  b.is_moe = w.is_moe;
  auto vec = [](const std::vector<float>& x, DeviceBuffer<float>& out) -> absl::Status {
    absl::StatusOr<DeviceBuffer<float>> d = UploadVector(x);
    if (!d.ok()) return d.status();
    out = std::move(*d);
    return absl::OkStatus();
  };
  auto lin = [quant](const Linear& l, Range rows, Range cols, DevLinear& out) -> absl::Status {
    absl::StatusOr<DevLinear> d = UploadLinear(l, rows, cols, quant);
    if (!d.ok()) return d.status();
    out = std::move(*d);
    return absl::OkStatus();
  };
  EM_RETURN_IF_ERROR(vec(w.input_layernorm, b.input_layernorm));
  EM_RETURN_IF_ERROR(vec(w.post_attention_layernorm, b.post_attention_layernorm));
  if (a.q_proj) {
    EM_RETURN_IF_ERROR(lin(*a.q_proj, s.q_rows, Whole(D), b.q));
  } else {
    EM_RETURN_IF_ERROR(lin(*a.q_a_proj, Whole(c.q_lora_rank), Whole(D), b.q_a));
    EM_RETURN_IF_ERROR(vec(a.q_a_layernorm, b.q_a_layernorm));
    EM_RETURN_IF_ERROR(lin(*a.q_b_proj, s.q_rows, Whole(c.q_lora_rank), b.q_b));
  }
  EM_RETURN_IF_ERROR(
      lin(a.kv_a_proj_with_mqa, Whole(a.kv_a_proj_with_mqa.out_features), Whole(D), b.kv_a));
  EM_RETURN_IF_ERROR(vec(a.kv_a_layernorm, b.kv_a_layernorm));
  // Absorbed MLA: per head, kv_b_proj rows [nope | v] are W_UK then W_UV, dequantized once.
  const std::vector<float> kvb = DequantizeSlice(a.kv_b_proj, s.kv_b_rows, Whole(R));
  const int64_t Hl = s.heads.size();
  std::vector<float> uk(Hl * nope * R), uv(Hl * v * R);
  for (int64_t h = 0; h < Hl; ++h) {
    const float* head = kvb.data() + h * (nope + v) * R;
    std::copy_n(head, nope * R, uk.data() + h * nope * R);
    std::copy_n(head + nope * R, v * R, uv.data() + h * v * R);
  }
  EM_RETURN_IF_ERROR(vec(uk, b.w_uk));
  EM_RETURN_IF_ERROR(vec(uv, b.w_uv));
  EM_RETURN_IF_ERROR(lin(a.o_proj, Whole(D), s.o_cols, b.o));
  const MlpWeights* mlp = w.mlp ? &*w.mlp : (w.shared_experts ? &*w.shared_experts : nullptr);
  if (mlp != nullptr) {
    const Range inter = w.mlp ? s.mlp_inter : s.shared_inter;
    EM_RETURN_IF_ERROR(lin(mlp->gate_proj, inter, Whole(D), b.gate));
    EM_RETURN_IF_ERROR(lin(mlp->up_proj, inter, Whole(D), b.up));
    EM_RETURN_IF_ERROR(lin(mlp->down_proj, Whole(D), inter, b.down));
  }
  if (w.is_moe && s.rank == 0) {
    const int64_t E = std::ssize(w.gate.e_score_correction_bias);
    absl::StatusOr<DeviceBuffer<float>> router = UploadVector(w.gate.weight);
    if (!router.ok()) return router.status();
    b.router.out = E;
    b.router.in = D;
    b.router.w32 = std::move(*router);
    EM_RETURN_IF_ERROR(vec(w.gate.e_score_correction_bias, b.e_score_correction_bias));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DevLinear> UploadLinear(const Linear& w, Range rows, Range cols,
                                       bool quantize_activations) {
  DevLinear d;
  if (rows.empty() || cols.empty()) return d;
  d.out = rows.size();
  d.in = cols.size();
  const bool quantized = w.is_fp8() && quantize_activations;
  if (quantized && w.block.rows == 128 && w.block.cols == 128 && rows.begin % 128 == 0 &&
      cols.begin % 128 == 0 && d.in % 128 == 0 && d.out % 16 == 0) {
    absl::StatusOr<Linear> part = SliceLinear(w, rows, cols);
    if (!part.ok()) return part.status();
    absl::StatusOr<DeviceBuffer<uint8_t>> w8 =
        Upload(std::span<const uint8_t>(part->weight.data, static_cast<size_t>(part->weight.size)));
    if (!w8.ok()) return w8.status();
    absl::StatusOr<DeviceBuffer<float>> sc = Upload(std::span<const float>(
        part->scale_inv.as<float>(), static_cast<size_t>(part->scale_inv.size / sizeof(float))));
    if (!sc.ok()) return sc.status();
    d.w8 = std::move(*w8);
    d.scales = std::move(*sc);
    d.fp8 = true;
    return d;
  }
  const std::vector<float> f = DequantizeSlice(w, rows, cols);
  absl::StatusOr<DeviceBuffer<float>> w32 = Upload(std::span<const float>(f));
  if (!w32.ok()) return w32.status();
  d.w32 = std::move(*w32);
  d.quantize_input = quantized;
  return d;
}

absl::StatusOr<DevEmbedding> UploadEmbedding(const Linear& table) {
  DevEmbedding e;
  if (table.dtype == DType::kBF16) {
    absl::StatusOr<DeviceBuffer<uint16_t>> b = Upload(std::span<const uint16_t>(
        table.weight.as<uint16_t>(), static_cast<size_t>(table.out_features * table.in_features)));
    if (!b.ok()) return b.status();
    e.bf16 = std::move(*b);
    return e;
  }
  absl::StatusOr<DeviceBuffer<float>> f =
      UploadVector(DequantizeSlice(table, Whole(table.out_features), Whole(table.in_features)));
  if (!f.ok()) return f.status();
  e.f32 = std::move(*f);
  return e;
}

absl::StatusOr<std::unique_ptr<CudaEngine::Rank>> CudaEngine::Rank::Create(
    const Model& model, const RankShard& shard, int device, cudaStream_t stream,
    const CudaEngineOptions& options) {
  const ModelConfig& c = model.config();
  const bool quant = options.engine.quantize_activations;
  const int64_t D = c.hidden_size, Dkv = c.kv_lora_rank + c.qk_rope_head_dim;
  auto R = std::make_unique<Rank>();
  R->rank = shard.rank;
  R->device = device;
  absl::StatusOr<DeviceArch> arch = QueryDeviceArch(device);
  if (!arch.ok()) return arch.status();
  R->arch = *arch;
  EM_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device), "cudaSetDevice"));
  R->stream = stream;
  if (R->stream == nullptr) {
    EM_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&R->stream, cudaStreamNonBlocking),
                                  "cudaStreamCreate"));
    R->owns_stream = true;
  }
  EM_RETURN_IF_ERROR(BlasStatus(cublasCreate(&R->blas), "create"));
  EM_RETURN_IF_ERROR(BlasStatus(cublasSetStream(R->blas, R->stream), "set stream"));
  // Plain FP32 (no TF32): the engine is compared with the float reference.
  EM_RETURN_IF_ERROR(BlasStatus(cublasSetMathMode(R->blas, CUBLAS_DEFAULT_MATH), "math mode"));
  EM_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&R->xn_ready, cudaEventDisableTiming),
                                "cudaEventCreate"));

  auto vec = [](const std::vector<float>& v, DeviceBuffer<float>& out) -> absl::Status {
    absl::StatusOr<DeviceBuffer<float>> d = UploadVector(v);
    if (!d.ok()) return d.status();
    out = std::move(*d);
    return absl::OkStatus();
  };
  auto lin = [quant](const expertmesh::Linear& l, Range rows, Range cols,
                     DevLinear& out) -> absl::Status {
    absl::StatusOr<DevLinear> d = UploadLinear(l, rows, cols, quant);
    if (!d.ok()) return d.status();
    out = std::move(*d);
    return absl::OkStatus();
  };
  const Range vocab = Whole(c.vocab_size), hidden = Whole(D);
  absl::StatusOr<DevEmbedding> embed = UploadEmbedding(model.embed_tokens());
  if (!embed.ok()) return embed.status();
  R->embed = std::move(*embed);
  EM_RETURN_IF_ERROR(vec(expertmesh::Rope(c).inv_freq(), R->inv_freq));
  R->layers.resize(model.layers().size());
  for (size_t l = 0; l < model.layers().size(); ++l) {
    EM_RETURN_IF_ERROR(UploadBlock(c, shard, model.layers()[l], quant, R->layers[l]));
  }
  const bool head_rank = shard.rank == 0;  // the final norm and heads run on rank 0 only
  if (head_rank) {
    EM_RETURN_IF_ERROR(vec(model.norm(), R->norm));
    EM_RETURN_IF_ERROR(lin(model.lm_head(), vocab, hidden, R->lm_head));
  }
  R->mtp_blocks.resize(model.mtp().size());
  R->mtp.resize(model.mtp().size());
  for (size_t m = 0; m < model.mtp().size(); ++m) {
    const MtpWeights& w = model.mtp()[m];
    MtpDev& md = R->mtp[m];
    EM_RETURN_IF_ERROR(UploadBlock(c, shard, w.block, quant, R->mtp_blocks[m]));
    EM_RETURN_IF_ERROR(vec(w.enorm, md.enorm));
    EM_RETURN_IF_ERROR(vec(w.hnorm, md.hnorm));
    EM_RETURN_IF_ERROR(lin(w.eh_proj, hidden, Whole(2 * D), md.eh_proj));
    if (w.embed_tokens.weight.data != model.embed_tokens().weight.data) {
      absl::StatusOr<DevEmbedding> own = UploadEmbedding(w.embed_tokens);
      if (!own.ok()) return own.status();
      md.embed = std::move(*own);
    }
    if (head_rank) {
      EM_RETURN_IF_ERROR(vec(w.shared_head_norm, md.head_norm));
      EM_RETURN_IF_ERROR(lin(w.shared_head_head, vocab, hidden, md.head));
    }
  }
  absl::StatusOr<DeviceBuffer<uint16_t>> kv = DeviceBuffer<uint16_t>::Create(
      c.num_hidden_layers * options.kv_pages * options.page_size * Dkv);
  if (!kv.ok()) return kv.status();
  R->kv = std::move(*kv);
  kv = DeviceBuffer<uint16_t>::Create(options.mtp_kv_pages * options.page_size * Dkv);
  if (!kv.ok()) return kv.status();
  R->mtp_kv = std::move(*kv);
  EM_RETURN_IF_ERROR(CudaStatus(cudaDeviceSynchronize(), "weight upload"));
  return R;
}

CudaEngine::Rank::~Rank() {
  cudaSetDevice(device);
  if (xn_ready != nullptr) cudaEventDestroy(xn_ready);
  if (blas != nullptr) cublasDestroy(blas);
  if (owns_stream && stream != nullptr) cudaStreamDestroy(stream);
}

absl::Status CudaEngine::Rank::Linear(const DevLinear& w, const float* x, int64_t n, float* y) {
  if (!w.present()) return absl::InternalError("CUDA engine: linear part absent");
  if (n == 0) return absl::OkStatus();
  if (w.fp8 || w.quantize_input) {
    ActQuantParams aq;
    aq.n_rows = static_cast<int32_t>(n);
    aq.dim = static_cast<int32_t>(w.in);
    aq.x = x;
    aq.q = x8.get();
    aq.scales = x8_scales.get();
    EM_RETURN_IF_ERROR(ActQuant(aq, stream));
  }
  if (w.fp8) {
    Fp8LinearParams p;
    p.n_rows = static_cast<int32_t>(n);
    p.in_features = static_cast<int32_t>(w.in);
    p.out_features = static_cast<int32_t>(w.out);
    p.x = x8.get();
    p.x_scales = x8_scales.get();
    p.weight = w.w8.get();
    p.weight_scale_inv = w.scales.get();
    p.y = y;
    return Fp8Linear(arch, p, stream);
  }
  if (w.quantize_input) {
    EM_RETURN_IF_ERROR(
        CudaStatus(LaunchDequantActivations(x8.get(), x8_scales.get(), static_cast<int32_t>(n),
                                            static_cast<int32_t>(w.in), x32.get(), stream),
                   "dequantize activations"));
    x = x32.get();
  }
  // Row-major y = x W^T is column-major y^T = W x^T: W^T is W read column-major, so op T.
  const float one = 1.0f, zero = 0.0f;
  return BlasStatus(
      cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(w.out), static_cast<int>(n),
                  static_cast<int>(w.in), &one, w.w32.get(), static_cast<int>(w.in), x,
                  static_cast<int>(w.in), &zero, y, static_cast<int>(w.out)),
      "sgemm");
}

absl::Status CudaEngine::Rank::Norm(const float* x, const DeviceBuffer<float>& weight, int64_t n,
                                    int64_t dim, double eps, float* out) {
  RmsNormParams p;
  p.n_rows = static_cast<int32_t>(n);
  p.dim = static_cast<int32_t>(dim);
  p.eps = static_cast<float>(eps);
  p.x = x;
  p.weight = weight.get();
  p.out = out;
  return RmsNorm(p, stream);
}

absl::Status CudaEngine::Rank::Add(const float* x, float* y, int64_t n) {
  const float one = 1.0f;
  return BlasStatus(cublasSaxpy(blas, static_cast<int>(n), &one, x, 1, y, 1), "saxpy");
}

absl::Status CudaEngine::Rank::Embed(const DevEmbedding& table, const int32_t* ids, int64_t n,
                                     int64_t D, float* out) {
  const cudaError_t err = table.bf16.size() > 0
                              ? LaunchGatherRowsBf16(table.bf16.get(), ids, static_cast<int32_t>(n),
                                                     static_cast<int32_t>(D), out, stream)
                              : LaunchGatherRows(table.f32.get(), ids, static_cast<int32_t>(n),
                                                 static_cast<int32_t>(D), out, stream);
  return CudaStatus(err, "embedding gather");
}

absl::Status CudaEngine::Rank::Mlp(const Block& b, const float* x, int64_t T, int64_t D,
                                   float* out) {
  if (!b.gate.present()) {
    return CudaStatus(cudaMemsetAsync(out, 0, T * D * sizeof(float), stream), "memset");
  }
  EM_RETURN_IF_ERROR(Linear(b.gate, x, T, g.get()));
  EM_RETURN_IF_ERROR(Linear(b.up, x, T, u.get()));
  EM_RETURN_IF_ERROR(CudaStatus(LaunchSwiglu(g.get(), u.get(), T * b.gate.out, stream), "swiglu"));
  return Linear(b.down, g.get(), T, out);
}

}  // namespace expertmesh::cuda
