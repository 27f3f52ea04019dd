// `expertmesh plan`: the capacity planner (planner/). Reads a model's config.json and a pool
// description, places every routed expert on the pool's cards (redundant copies of the
// hottest where memory allows and it pays), prints memory per card and the predicted decode
// tokens/s at each batch size with the bottleneck named, and writes the placement file the
// router's --placement accepts (--placement-out).
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "core/base/file.h"
#include "core/format/config.h"
#include "placement/placement.h"
#include "planner/planner.h"
#include "planner/pool.h"
#include "planner/to_placement.h"
#include "spdlog/spdlog.h"
#include "tools/cli/commands.h"

namespace expertmesh {
namespace {

struct PlanArgs {
  std::string config;
  std::string pool;
  std::string load;
  std::string placement_out;
  std::vector<int> batches;
  bool json = false;
  bool no_copies = false;
};

int Plan(const PlanArgs& args) {
  auto config = LoadModelConfig(args.config);
  if (!config.ok()) {
    spdlog::error("{}", config.status().ToString());
    return 1;
  }
  auto pool = planner::LoadPool(args.pool);
  if (!pool.ok()) {
    spdlog::error("{}", pool.status().ToString());
    return 1;
  }
  if (!args.batches.empty()) pool->batches = args.batches;
  planner::LoadProfile load;
  planner::PlanOptions options;
  options.redundant_copies = !args.no_copies;
  if (!args.load.empty()) {
    auto text = base::ReadFile(args.load);
    if (!text.ok()) {
      spdlog::error("{}", text.status().ToString());
      return 1;
    }
    auto parsed = planner::ParseLoadProfile(*text, *config);
    if (!parsed.ok()) {
      spdlog::error("{}: {}", args.load, std::string(parsed.status().message()));
      return 1;
    }
    load = *std::move(parsed);
    options.load = &load;
  }
  auto plan = planner::MakePlan(*config, *pool, options);
  if (!plan.ok()) {
    spdlog::error("{}", std::string(plan.status().message()));
    return 1;
  }
  std::vector<planner::Prediction> predictions;
  for (int b : pool->batches) predictions.push_back(planner::Predict(*plan, b));
  if (!args.placement_out.empty()) {
    auto placement = planner::ToPlacement(*plan);
    if (!placement.ok()) {
      spdlog::error("placement: {}", placement.status().ToString());
      return 1;
    }
    std::ofstream out(args.placement_out, std::ios::binary | std::ios::trunc);
    out << PlacementToJson(*placement);
    out.close();
    if (!out) {
      spdlog::error("cannot write {}", args.placement_out);
      return 1;
    }
  }
  const std::string text =
      args.json ? planner::PlanJson(*plan, predictions) : planner::PlanTable(*plan, predictions);
  std::fwrite(text.data(), 1, text.size(), stdout);
  if (!args.placement_out.empty() && !args.json) {
    std::printf("\nplacement written to %s (router --placement; shard group i = card i)\n",
                args.placement_out.c_str());
  }
  return 0;
}

}  // namespace

void AddPlanCommand(CLI::App& app) {
  auto args = std::make_shared<PlanArgs>();
  CLI::App* cmd = app.add_subcommand(
      "plan",
      "Capacity planner: place the experts on a pool of cards, memory per card, predicted "
      "decode tok/s and its bottleneck (planner/README.md)");
  cmd->add_option("--config", args->config, "the model's config.json")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--pool", args->pool, "pool description JSON (planner/pool.h, planner/examples/)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--load", args->load,
                  "expert load profile: a router GetStatus response as JSON (expert_load); "
                  "default uniform routing")
      ->check(CLI::ExistingFile);
  cmd->add_option("--batch", args->batches,
                  "batch sizes to predict (default: the pool's \"batch\")")
      ->check(CLI::Range(1, 65536));
  cmd->add_option("--placement-out", args->placement_out,
                  "write the placement (router --placement format) to this file");
  cmd->add_flag("--json", args->json, "print the plan as JSON instead of a table");
  cmd->add_flag("--no-copies", args->no_copies, "one copy of every expert (no redundant copies)");
  cmd->callback([args]() {
    const int rc = Plan(*args);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace expertmesh
