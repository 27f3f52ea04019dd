#include "core/engine/engine.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "core/base/status.h"

namespace expertmesh {

void EmbedTokens(const Linear& embed, std::span<const int32_t> tokens, float* out) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    embed.DequantizeRow(tokens[i], out + i * embed.in_features);
  }
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const Model& model, RoutedExperts* experts,
                                                       EngineOptions options) {
  bool has_moe = false;
  for (const auto& layer : model.layers()) has_moe |= layer.is_moe;
  for (const auto& mtp : model.mtp()) has_moe |= mtp.block.is_moe;
  if (has_moe && experts == nullptr) {
    return absl::InvalidArgumentError("engine: the model has MoE layers but no RoutedExperts");
  }
  return std::unique_ptr<Engine>(new Engine(model, experts, options));
}

std::unique_ptr<ContiguousKvCache> Engine::NewCache() const {
  const ModelConfig& c = model_.config();
  return *ContiguousKvCache::Create(static_cast<int>(c.num_hidden_layers), c.kv_lora_rank,
                                    c.qk_rope_head_dim);
}

std::unique_ptr<ContiguousKvCache> Engine::NewMtpCache() const {
  const ModelConfig& c = model_.config();
  return *ContiguousKvCache::Create(1, c.kv_lora_rank, c.qk_rope_head_dim);
}

absl::StatusOr<std::vector<SequenceSlice>> Engine::Place(std::span<MlaKvCache* const> caches,
                                                         std::span<const int64_t> lengths) {
  std::vector<SequenceSlice> slices;
  int64_t row = 0;
  for (size_t s = 0; s < caches.size(); ++s) {
    const int64_t start = caches[s]->length();
    if (absl::Status st = caches[s]->Extend(lengths[s]); !st.ok()) {
      for (const SequenceSlice& done : slices) done.cache->Truncate(done.start);
      return st;
    }
    slices.push_back({caches[s], start, row, lengths[s]});
    row += lengths[s];
  }
  return slices;
}

std::vector<SequenceOutput> Engine::Outputs(const float* h, std::span<const SequenceSlice> slices,
                                            const std::vector<uint8_t>& all_logits,
                                            const std::vector<float>& norm, const Linear& head,
                                            bool last_hidden_only) const {
  const ModelConfig& c = model_.config();
  const int64_t D = c.hidden_size;
  std::vector<SequenceOutput> outs(slices.size());
  for (size_t s = 0; s < slices.size(); ++s) {
    const SequenceSlice& sl = slices[s];
    // The normalized rows are both the hidden states handed out (the MTP module's input) and
    // the head's input: normalize the rows either needs, from the first one wanted.
    const int64_t first_hidden = last_hidden_only ? sl.n - 1 : 0;
    const int64_t first_logit = all_logits[s] ? 0 : sl.n - 1;
    const int64_t first = std::min(first_hidden, first_logit);
    std::vector<float>& xn = outs[s].hidden;
    xn.resize((sl.n - first) * D);
    RmsNorm(h + (sl.row_begin + first) * D, norm.data(), sl.n - first, D, c.rms_norm_eps,
            xn.data());
    const int64_t rows = sl.n - first_logit;
    outs[s].logits.resize(rows * c.vocab_size);
    head.Forward(xn.data() + (first_logit - first) * D, rows, outs[s].logits.data(),
                 options_.quantize_activations, options_.kernel);
    xn.erase(xn.begin(), xn.begin() + (first_hidden - first) * D);
  }
  return outs;
}

absl::StatusOr<std::vector<SequenceOutput>> Engine::Forward(std::span<const SequenceInput> batch) {
  const ModelConfig& c = model_.config();
  const int64_t D = c.hidden_size;
  std::vector<MlaKvCache*> caches;
  std::vector<int64_t> lengths;
  std::vector<int32_t> tokens;
  std::vector<uint8_t> all_logits;
  for (const SequenceInput& in : batch) {
    if (in.tokens.empty() || in.cache == nullptr || in.cache->num_layers() != c.num_hidden_layers ||
        in.cache->row_size() != c.kv_lora_rank + c.qk_rope_head_dim) {
      return absl::InvalidArgumentError(
          "engine: each sequence needs >= 1 token and a cache shaped for the model");
    }
    for (int32_t t : in.tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrFormat("engine: token %d outside the vocabulary [0, %d)", t, c.vocab_size));
      }
    }
    caches.push_back(in.cache);
    lengths.push_back(std::ssize(in.tokens));
    tokens.insert(tokens.end(), in.tokens.begin(), in.tokens.end());
    all_logits.push_back(in.all_logits);
  }
  EM_ASSIGN_OR_RETURN(auto slices, Place(caches, lengths));
  const int64_t T = std::ssize(tokens);
  std::vector<float> h(T * D);  // the residual stream: [T, hidden_size]
  EmbedTokens(model_.embed_tokens(), tokens, h.data());
  const LayerOptions opt{options_.quantize_activations, options_.attention, options_.kernel};
  for (const DecoderLayerWeights& layer : model_.layers()) {
    absl::Status st = DecoderLayerForward(c, model_.gate_params(), layer, rope_, layer.layer,
                                          slices, experts_, h.data(), T, opt);
    if (!st.ok()) {
      for (const SequenceSlice& sl : slices) sl.cache->Truncate(sl.start);
      return st;
    }
  }
  return Outputs(h.data(), slices, all_logits, model_.norm(), model_.lm_head());
}

absl::StatusOr<std::vector<SequenceOutput>> Engine::ForwardMtp(std::span<const MtpInput> batch,
                                                               int depth) {
  const ModelConfig& c = model_.config();
  const int64_t D = c.hidden_size;
  if (depth < 0 || depth >= std::ssize(model_.mtp())) {
    return absl::InvalidArgumentError(
        absl::StrFormat("engine: no MTP module %d loaded (%d)", depth, model_.mtp().size()));
  }
  const MtpWeights& mtp = model_.mtp()[depth];
  std::vector<MlaKvCache*> caches;
  std::vector<int64_t> lengths;
  std::vector<int32_t> tokens;
  std::vector<float> hidden;
  std::vector<uint8_t> all_logits;
  for (size_t s = 0; s < batch.size(); ++s) {
    const MtpInput& in = batch[s];
    const int64_t n = std::ssize(in.next_tokens);
    if (n == 0 || std::ssize(in.hidden) != n * D || in.cache == nullptr ||
        in.cache->num_layers() != 1) {
      return absl::InvalidArgumentError(
          "engine: MTP input needs n >= 1 tokens, [n, hidden_size] hidden states and a 1-layer "
          "cache");
    }
    for (int32_t t : in.next_tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrFormat("engine: token %d outside the vocabulary [0, %d)", t, c.vocab_size));
      }
    }
    caches.push_back(in.cache);
    lengths.push_back(n);
    tokens.insert(tokens.end(), in.next_tokens.begin(), in.next_tokens.end());
    hidden.insert(hidden.end(), in.hidden.begin(), in.hidden.end());
    all_logits.push_back(in.all_logits);
  }
  EM_ASSIGN_OR_RETURN(auto slices, Place(caches, lengths));
  const int64_t T = std::ssize(tokens);
  // x = eh_proj(concat(enorm(embed(t[i+1])), hnorm(h[i]))): [T, 2D] -> [T, D].
  std::vector<float> e(T * D), cat(T * 2 * D), h(T * D);
  EmbedTokens(mtp.embed_tokens, tokens, e.data());
  RmsNorm(e.data(), mtp.enorm.data(), T, D, c.rms_norm_eps, e.data());
  RmsNorm(hidden.data(), mtp.hnorm.data(), T, D, c.rms_norm_eps, hidden.data());
  for (int64_t t = 0; t < T; ++t) {
    std::copy_n(e.data() + t * D, D, cat.data() + t * 2 * D);
    std::copy_n(hidden.data() + t * D, D, cat.data() + t * 2 * D + D);
  }
  mtp.eh_proj.Forward(cat.data(), T, h.data(), options_.quantize_activations, options_.kernel);
  const LayerOptions opt{options_.quantize_activations, options_.attention, options_.kernel};
  // Drafting needs the last position's output only: the other rows just fill the cache.
  const bool last_only =
      std::none_of(all_logits.begin(), all_logits.end(), [](uint8_t a) { return a != 0; });
  absl::Status st = DecoderLayerForward(c, model_.gate_params(), mtp.block, rope_, 0, slices,
                                        experts_, h.data(), T, opt, last_only);
  if (!st.ok()) {
    for (const SequenceSlice& sl : slices) sl.cache->Truncate(sl.start);
    return st;
  }
  return Outputs(h.data(), slices, all_logits, mtp.shared_head_norm, mtp.shared_head_head,
                 last_only);
}

}  // namespace expertmesh
