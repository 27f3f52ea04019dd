// The subcommands of the `expertmesh` CLI; each registers itself on the app.
#pragma once

#include "CLI/CLI.hpp"

namespace expertmesh {

void AddRunCommand(CLI::App& app);   // run_command.cc: generate with the reference engine
void AddEvalCommand(CLI::App& app);  // eval_command.cc: perplexity, MTP acceptance
#ifdef EXPERTMESH_CLI_SERVICES
void AddUpCommand(CLI::App& app);    // up_command.cc: `up` and `status` (a loopback cluster)
void AddPlanCommand(CLI::App& app);  // plan_command.cc: the capacity planner (planner/)
#endif

}  // namespace expertmesh
