// expertmesh-make-checkpoint --config config.json --out DIR --seed N
// Writes a random checkpoint of the config in DeepSeek-V3's Hugging Face layout.
#include <string>

#include "CLI/CLI.hpp"
#include "core/base/file.h"
#include "core/base/status.h"
#include "core/format/config.h"
#include "spdlog/spdlog.h"
#include "tools/make-checkpoint/random_checkpoint.h"

int main(int argc, char** argv) {
  CLI::App app{"Write a random DeepSeek-V3-layout checkpoint (FP8 blocks, sharded safetensors)"};
  std::string config_path, out_dir;
  uint64_t seed = 0;
  int shards = 2;
  double gate_skew = 0.0;
  app.add_option("--config", config_path, "config.json of model_type deepseek_v3")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("--out", out_dir, "output directory")->required();
  app.add_option("--seed", seed, "random seed")->capture_default_str();
  app.add_option("--shards", shards, "minimum number of safetensors shards")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_option("--gate-skew", gate_skew,
                 "Skew the expert load: add up to this to the gate bias of the first quarter "
                 "of each MoE layer's experts (0 = none)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 10.0));
  CLI11_PARSE(app, argc, argv);

  absl::StatusOr<std::string> text = expertmesh::base::ReadFile(config_path);
  if (!text.ok()) {
    spdlog::error("{}", text.status());
    return 1;
  }
  auto config = expertmesh::ParseModelConfig(*text);
  if (!config.ok()) {
    spdlog::error("{}: {}", config_path, config.status().ToString());
    return 1;
  }
  if (absl::Status s =
          expertmesh::WriteRandomCheckpoint(*config, *text, out_dir, seed, shards, gate_skew);
      !s.ok()) {
    spdlog::error("{}", s.ToString());
    return 1;
  }
  spdlog::info("wrote {} (seed {})", out_dir, seed);
  return 0;
}
