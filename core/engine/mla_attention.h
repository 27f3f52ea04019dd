// The absorbed MLA attention core behind one signature with two implementations, as llm.c
// keeps its reference and its fast kernels apart: AbsorbedAttentionReference (plain loops in
// core/engine/layers.cc, the oracle) and AbsorbedAttentionSimd (core/engine/mla_attention_simd.cc:
// each cached row scored against all of a sequence's queries in one pass, Highway dot
// products). MlaForwardBatch picks one by LayerOptions::kernel; tests compare them.
//
// For slice k, query rows first_i[k] .. n - 1 of the slice are rows q_first[k] .. of
// q: [Tq, H * qk_head_dim] ([q_nope | q_pe], RoPE applied) and of attn: [Tq, H * v_head_dim].
// wkv_b: kv_b_proj as float, [H * (qk_nope_head_dim + v_head_dim), kv_lora_rank] (the matrices
// precomputed at load, MlaWeights::kv_b_absorbed, or dequantized for this forward).
//
// Memory: the SIMD core works through the batch's queries in blocks whose absorbed queries and
// context sums, and then whose scores, each stay under workspace_floats (one query row per
// block at least), so a prefill of any length over any context uses a bounded working set,
// never [heads, prompt, context] scores. Blocking changes no bit: every query's scores, softmax
// and sums are computed by the same operations in the same order whatever block holds it.
#pragma once

#include <cstdint>
#include <span>

#include "core/engine/layers.h"
#include "core/format/config.h"

namespace expertmesh {

// The SIMD core's default working-set bound: 8 Mi floats (32 MiB) for the queries and context
// sums of a block, as much again for its scores.
inline constexpr int64_t kAbsorbedWorkspaceFloats = int64_t{8} << 20;

struct AbsorbedAttentionArgs {
  const ModelConfig& config;
  const float* wkv_b;
  const float* q;
  float scale;  // softmax scale
  int cache_layer;
  std::span<const SequenceSlice> seqs;
  std::span<const int64_t> q_first;
  std::span<const int64_t> first_i;
  int64_t workspace_floats = kAbsorbedWorkspaceFloats;  // SIMD core only (see above)
};

void AbsorbedAttentionReference(const AbsorbedAttentionArgs& args, float* attn);
void AbsorbedAttentionSimd(const AbsorbedAttentionArgs& args, float* attn);

// Softmax in place over p: [len] (max-subtracted, float), shared by both forms.
void Softmax(float* p, int64_t len);

}  // namespace expertmesh
