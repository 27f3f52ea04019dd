// expertmesh: the command-line entry point. Each subcommand lives in its own file.
#include "CLI/CLI.hpp"
#include "tools/cli/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"ExpertMesh: DeepSeek-V3-architecture MoE serving"};
  app.require_subcommand(1);
  expertmesh::AddRunCommand(app);
  expertmesh::AddEvalCommand(app);
#ifdef EXPERTMESH_CLI_SERVICES
  expertmesh::AddUpCommand(app);
  expertmesh::AddPlanCommand(app);
#endif
  CLI11_PARSE(app, argc, argv);
  return 0;
}
