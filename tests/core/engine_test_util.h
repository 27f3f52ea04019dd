// Shared by the engine tests: loading the committed random checkpoints (tests/data/engine-*)
// with all their experts, greedy generation, and golden-file reading.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "boost/json.hpp"
#include "core/base/file.h"
#include "core/decode/sampling.h"
#include "core/engine/engine.h"
#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/model/local_experts.h"
#include "core/model/model.h"
#include "gtest/gtest.h"

namespace expertmesh::testing {

inline std::string EngineDataDir(const std::string& name) {
  return std::string(EXPERTMESH_SOURCE_DIR) + "/tests/data/" + name;
}

// A checkpoint opened with its model and all its routed experts.
struct LoadedModel {
  std::unique_ptr<Checkpoint> ckpt;
  ModelConfig config;
  std::unique_ptr<Model> model;
  std::unique_ptr<LocalExperts> experts;

  static LoadedModel Load(const std::string& name, bool quantize_activations) {
    LoadedModel m;
    const std::string dir = EngineDataDir(name);
    auto ckpt = Checkpoint::Open(dir);
    EXPECT_TRUE(ckpt.ok()) << ckpt.status();
    m.ckpt = *std::move(ckpt);
    auto config = LoadModelConfig(dir + "/config.json");
    EXPECT_TRUE(config.ok()) << config.status();
    m.config = *config;
    auto model = Model::Create(*m.ckpt, m.config);
    EXPECT_TRUE(model.ok()) << model.status();
    m.model = *std::move(model);
    auto experts = LocalExperts::Create(*m.ckpt, m.config, AllExperts(m.config),
                                        LocalExperts::Options{quantize_activations, nullptr});
    EXPECT_TRUE(experts.ok()) << experts.status();
    m.experts = *std::move(experts);
    return m;
  }

  std::unique_ptr<Engine> NewEngine(EngineOptions options) const {
    auto engine = Engine::Create(*model, experts.get(), options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return *std::move(engine);
  }
};

// Forward of one sequence; dies on error.
inline SequenceOutput Run1(Engine& engine, MlaKvCache& cache, const std::vector<int32_t>& tokens,
                           bool all_logits) {
  SequenceInput in{tokens, &cache, all_logits};
  auto out = engine.Forward(std::span<const SequenceInput>(&in, 1));
  EXPECT_TRUE(out.ok()) << out.status();
  return std::move((*out)[0]);
}

// Prefill the prompt, then n greedy decode steps. Returns the tokens; last_logits gets the
// logits of the forward that consumed the last generated token.
inline std::vector<int32_t> Greedy(Engine& engine, const std::vector<int32_t>& prompt, int n,
                                   std::vector<float>* last_logits) {
  auto cache = engine.NewCache();
  SequenceOutput out = Run1(engine, *cache, prompt, false);
  std::vector<int32_t> generated;
  for (int i = 0; i < n; ++i) {
    generated.push_back(Argmax(out.logits));
    out = Run1(engine, *cache, {generated.back()}, false);
  }
  if (last_logits != nullptr) *last_logits = out.logits;
  return generated;
}

inline boost::json::value ReadJson(const std::string& path) {
  absl::StatusOr<std::string> text = base::ReadFile(path);
  EXPECT_TRUE(text.ok()) << text.status();
  if (!text.ok()) return nullptr;
  return boost::json::parse(*text);
}

template <typename T>
std::vector<T> JsonVector(const boost::json::value& v) {
  std::vector<T> out;
  for (const auto& x : v.as_array()) out.push_back(static_cast<T>(x.to_number<double>()));
  return out;
}

inline float MaxAbsDiff(std::span<const float> a, std::span<const float> b) {
  EXPECT_EQ(a.size(), b.size());
  float m = 0.0f;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

}  // namespace expertmesh::testing
