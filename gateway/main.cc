// gateway: the front door of an ExpertMesh cluster. OpenAI-compatible HTTP/SSE and the
// expertmesh.v1.Gateway gRPC API in front of one or more attention-service replicas.
#include <cstdlib>

#include "CLI/CLI.hpp"
#include "gateway/gateway_server.h"
#include "service-common/process.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
  using expertmesh::gateway::GatewayOptions;
  GatewayOptions o;
  std::string api_key_file, log_level = "info";
  int drain_grace_s = 30, request_timeout_s = 600;
  CLI::App app{
      "ExpertMesh gateway: OpenAI-compatible HTTP/SSE and gRPC in front of the "
      "attention service(s)."};
  app.add_option("--model", o.model_dir,
                 "Model directory (tokenizer.json, tokenizer_config.json, config.json, "
                 "generation_config.json)")
      ->required();
  app.add_option("--served-model-name", o.served_model_name,
                 "Model name clients pass (default: the model directory's name)");
  app.add_option("--attention", o.attention,
                 "Attention-service address host:port (repeat or comma-separate for replicas)")
      ->required()
      ->delimiter(',');
  app.add_option("--listen", o.grpc_listen, "gRPC listen address host:port (port 0 = any)")
      ->capture_default_str();
  app.add_option("--http-host", o.http_host, "HTTP listen host")->capture_default_str();
  app.add_option("--http-port", o.http_port, "HTTP port (0 = any)")->capture_default_str();
  app.add_option("--max-context", o.max_context,
                 "Context length (default: config.json max_position_embeddings)");
  app.add_option("--max-running", o.max_running, "Requests generating at once")
      ->capture_default_str();
  app.add_option("--max-waiting", o.max_waiting,
                 "Admission queue length; beyond it requests get 429 / RESOURCE_EXHAUSTED")
      ->capture_default_str();
  app.add_option("--request-timeout-s", request_timeout_s,
                 "Deadline of every request, queueing included")
      ->capture_default_str();
  app.add_option("--drain-grace-s", drain_grace_s,
                 "On SIGTERM: seconds open requests get to finish")
      ->capture_default_str();
  app.add_option("--api-key-file", api_key_file,
                 "File of accepted API keys, one per line (also: env EXPERTMESH_API_KEYS, "
                 "comma-separated); none = no authentication");
  app.add_option("--max-connections", o.max_connections, "Open HTTP connections at most")
      ->capture_default_str();
  app.add_flag("!--no-handshake", o.handshake,
               "Do not require replicas to serve the same model (fingerprint of config.json)");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  if (absl::Status s = expertmesh::BlockTerminationSignals(); !s.ok()) {
    spdlog::critical("{}", std::string(s.message()));
    return 1;
  }
  if (absl::Status s = expertmesh::SetupLogging("gateway", log_level); !s.ok()) {
    spdlog::critical("{}", std::string(s.message()));
    return 1;
  }
  o.request_timeout = std::chrono::seconds(request_timeout_s);
  absl::StatusOr<std::vector<std::string>> keys =
      expertmesh::gateway::LoadApiKeys(api_key_file, std::getenv("EXPERTMESH_API_KEYS"));
  if (!keys.ok()) {
    spdlog::critical("{}", std::string(keys.status().message()));
    return 1;
  }
  o.api_keys = *keys;
  if (!o.api_keys.empty()) spdlog::info("API keys required ({} configured)", o.api_keys.size());

  auto server = expertmesh::gateway::GatewayServer::Create(o);
  if (!server.ok()) {
    spdlog::critical("cannot start: {}", std::string(server.status().message()));
    return 1;
  }
  int sig = expertmesh::WaitForTerminationSignal();
  spdlog::info("signal {}: draining (grace {} s)", sig, drain_grace_s);
  (*server)->Drain(std::chrono::seconds(drain_grace_s));
  spdlog::info("drained; exiting");
  return 0;
}
