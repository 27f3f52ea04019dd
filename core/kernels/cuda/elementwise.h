// Parameters of the small per-token CUDA ops: activation quantization (1 x 128 FP8 groups, as
// core/numerics/quant.h QuantizeActivations), RMSNorm and DeepSeek's interleaved RoPE. Plain
// structs of device pointers; launched through dispatch.h. Dimension legend: T = tokens, D =
// channels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace expertmesh::cuda {

struct ActQuantParams {
  int32_t n_rows = 0;        // T
  int32_t dim = 0;           // D
  const float* x = nullptr;  // [T, D]
  uint8_t* q = nullptr;      // [T, D] e4m3
  float* scales = nullptr;   // [T, ceil(D / 128)], scale = max(amax, 1e-4) / 448
};

struct RmsNormParams {
  int32_t n_rows = 0;             // T
  int32_t dim = 0;                // D
  float eps = 1e-6f;              // rms_norm_eps
  const float* x = nullptr;       // [T, D]
  const float* weight = nullptr;  // [D]
  float* out = nullptr;           // [T, D]; may equal x
};

// Rotates, in place, the qk_rope_head_dim slice [rope_offset, rope_offset + rope_dim) of each
// head: pairs (2i, 2i+1) by angle position * inv_freq[i] (DeepSeek's interleaved form), with
// cos and sin multiplied by `attention_scaling` (YaRN's mscale; 1 without rope_scaling).
struct RopeParams {
  int32_t n_tokens = 0;
  int32_t n_heads = 0;
  int32_t head_stride = 0;   // floats between heads of a token
  int32_t token_stride = 0;  // floats between tokens
  int32_t rope_offset = 0;   // first rope channel inside a head
  int32_t rope_dim = 0;      // qk_rope_head_dim (even)
  float attention_scaling = 1.0f;
  const float* inv_freq = nullptr;     // [rope_dim / 2], from the host (YaRN applied there)
  const int32_t* positions = nullptr;  // [n_tokens]
  float* x = nullptr;                  // [n_tokens, ...] per the strides
};

cudaError_t LaunchActQuant(const ActQuantParams& p, cudaStream_t stream);
cudaError_t LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream);
cudaError_t LaunchRope(const RopeParams& p, cudaStream_t stream);

}  // namespace expertmesh::cuda
