// gateway: the front door of an ExpertMesh cluster. OpenAI-compatible HTTP/SSE and the
// expertmesh.v1.Gateway gRPC API in front of one or more attention-service replicas.
#include <cstdlib>

#include "gateway/gateway_server.h"
#include "service-common/bootstrap.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  using expertmesh::gateway::GatewayOptions;
  GatewayOptions o;
  std::string api_key_file;
  int drain_grace_s = 30, request_timeout_s = 600;
  int header_timeout_s = 10, body_timeout_s = 30, idle_timeout_s = 60;
  // /metrics is served on the HTTP port, beside the API (as vLLM does).
  ServiceMain main("gateway",
                   "ExpertMesh gateway: OpenAI-compatible HTTP/SSE and gRPC in front of the "
                   "attention service(s).",
                   {.listen = o.grpc_listen, .metrics_flags = false});
  CLI::App& app = main.app();
  app.add_option("--model", o.model_dir,
                 "Model directory (tokenizer.json, tokenizer_config.json, config.json, "
                 "generation_config.json)")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--served-model-name", o.served_model_name,
                 "Model name clients pass (default: the model directory's name)");
  int resolve_ms = static_cast<int>(o.attention_resolve_interval.count());
  app.add_option("--attention", o.attention,
                 "Attention-service replicas (repeat or comma-separate): host:port, or "
                 "dns:///name:port (e.g. a headless Service: every address the name resolves "
                 "to is a replica, resolved again every --attention-resolve-ms) or "
                 "dns://dns-server-ip[:port]/name:port")
      ->required()
      ->delimiter(',')
      ->check([](const std::string& target) {
        absl::StatusOr<gateway::AttentionTarget> t = gateway::ParseAttentionTarget(target);
        return t.ok() ? std::string() : std::string(t.status().message());
      });
  app.add_option("--attention-resolve-ms", resolve_ms,
                 "How often dns: attention targets are resolved again")
      ->check(CLI::Range(50, 600000))
      ->capture_default_str();
  app.add_option("--http-host", o.http_host, "HTTP listen host")->capture_default_str();
  app.add_option("--http-port", o.http_port, "HTTP port (0 = any)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  app.add_option("--max-context", o.max_context,
                 "Context length (default: config.json max_position_embeddings)")
      ->check(CLI::Range(uint32_t{2}, uint32_t{1} << 24));
  app.add_option("--max-running", o.max_running, "Requests generating at once")
      ->check(CLI::Range(1, 65536))
      ->capture_default_str();
  app.add_option("--max-waiting", o.max_waiting,
                 "Admission queue: requests waiting at most (a memory bound)")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  app.add_option("--max-waiting-tokens", o.max_waiting_tokens,
                 "Admission queue: prompt + max_tokens of the waiting requests at most; beyond "
                 "it (or --max-waiting) requests get 429 with Retry-After / RESOURCE_EXHAUSTED. "
                 "The default is what ~1,750 tokens/s drain within the default request timeout")
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 40))
      ->capture_default_str();
  app.add_option("--request-timeout-s", request_timeout_s,
                 "Deadline of every request, queueing included")
      ->check(CLI::Range(1, 86400))
      ->capture_default_str();
  app.add_option("--drain-grace-s", drain_grace_s,
                 "On SIGTERM: seconds open requests get to finish")
      ->check(CLI::Range(0, 3600))
      ->capture_default_str();
  app.add_option("--api-key-file", api_key_file,
                 "File of accepted API keys, one per line (also: env EXPERTMESH_API_KEYS, "
                 "comma-separated); none = no authentication");
  app.add_option("--max-connections", o.max_connections, "Open HTTP connections at most")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--http-threads", o.http_threads,
                 "Threads running the HTTP connections (asynchronous; generations run on "
                 "their own workers, at most --max-running + --max-waiting)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--header-timeout-s", header_timeout_s,
                 "An HTTP request's header must arrive within this (else the connection closes)")
      ->check(CLI::Range(1, 3600))
      ->capture_default_str();
  app.add_option("--body-timeout-s", body_timeout_s,
                 "An HTTP request's body must arrive within this after its header")
      ->check(CLI::Range(1, 3600))
      ->capture_default_str();
  app.add_option("--idle-timeout-s", idle_timeout_s,
                 "An idle keep-alive HTTP connection closes after this")
      ->check(CLI::Range(1, 86400))
      ->capture_default_str();
  app.add_option("--http-tls-cert", o.http_tls.cert,
                 "PEM certificate chain: serve HTTPS on --http-port (with --http-tls-key; "
                 "reloaded for new connections when the file changes)")
      ->check(CLI::ExistingFile);
  app.add_option("--http-tls-key", o.http_tls.key, "PEM private key of --http-tls-cert")
      ->check(CLI::ExistingFile);
  app.add_option("--http-tls-ca", o.http_tls.client_ca,
                 "HTTPS: require client certificates chaining to this PEM CA bundle (optional)")
      ->check(CLI::ExistingFile);
  app.add_flag("!--no-handshake", o.handshake,
               "Do not require replicas to serve the same model (fingerprint of config.json)");
  app.add_option("--reasoning-parser", o.reasoning_parser,
                 "Chat: deepseek_r1 returns <think>...</think> as reasoning_content, none keeps "
                 "it in the content, auto = deepseek_r1 when the chat template mentions </think>")
      ->check(CLI::IsMember({"auto", "deepseek_r1", "none"}))
      ->capture_default_str();
  if (std::optional<int> exit = main.Parse(argc, argv)) return *exit;
  if (absl::Status s = gateway::ValidateHttpTls(o.http_tls); !s.ok()) {
    spdlog::error("{}", std::string(s.message()));
    return kExitUsage;
  }
  o.grpc_listen = main.flags().listen;
  o.attention_resolve_interval = std::chrono::milliseconds(resolve_ms);
  o.request_timeout = std::chrono::seconds(request_timeout_s);
  o.http_header_timeout = std::chrono::seconds(header_timeout_s);
  o.http_body_timeout = std::chrono::seconds(body_timeout_s);
  o.http_idle_timeout = std::chrono::seconds(idle_timeout_s);
  absl::StatusOr<std::vector<std::string>> keys =
      gateway::LoadApiKeys(api_key_file, std::getenv("EXPERTMESH_API_KEYS"));
  if (!keys.ok()) return main.StartFailed(keys.status());
  o.api_keys = *keys;
  if (!o.api_keys.empty()) spdlog::info("API keys required ({} configured)", o.api_keys.size());

  auto server = expertmesh::gateway::GatewayServer::Create(o);
  if (!server.ok()) return main.StartFailed(server.status());
  return main.RunUntilSignal([&] {
    spdlog::info("draining (grace {} s)", drain_grace_s);
    (*server)->Drain(std::chrono::seconds(drain_grace_s));
  });
}
