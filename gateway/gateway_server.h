// Everything a gateway process runs, assembled from its options: the model's tokenizer, chat
// template and generation defaults, the attention replica pool, admission, the HTTP and gRPC
// servers, metrics. main.cc parses flags into Options and calls Create / Drain; tests start
// it in-process the same way.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "core/text/chat_template.h"
#include "core/text/tokenizer.h"
#include "gateway/admission.h"
#include "gateway/attention_pool.h"
#include "gateway/generation.h"
#include "gateway/grpc_service.h"
#include "gateway/http_server.h"
#include "service-common/grpc_util.h"
#include "service-common/metrics.h"

namespace expertmesh::gateway {

struct GatewayOptions {
  std::string model_dir;          // tokenizer.json, tokenizer_config.json, config.json, ...
  std::string served_model_name;  // default: the model directory's name
  // attention-service targets: host:port, or dns:///name:port re-resolved every
  // attention_resolve_interval (AttentionPool)
  std::vector<std::string> attention;
  std::chrono::milliseconds attention_resolve_interval{1000};
  std::string grpc_listen = "127.0.0.1:0";
  std::string http_host = "0.0.0.0";
  int http_port = 0;
  uint32_t max_context = 0;   // 0: config.json's max_position_embeddings
  uint32_t max_running = 64;  // sequences generating at once through this gateway
  // The admission queue (admission.h): at most this many requests and this many tokens
  // (prompt + max_tokens of each); beyond it: 429 / RESOURCE_EXHAUSTED.
  uint32_t max_waiting = Admission::Options{}.max_waiting;
  uint64_t max_waiting_tokens = Admission::Options{}.max_waiting_tokens;
  std::chrono::milliseconds request_timeout{std::chrono::minutes(10)};
  std::vector<std::string> api_keys;
  int max_connections = 32768;  // HTTP connections (lowered to what RLIMIT_NOFILE allows)
  int http_threads = 2;         // Asio threads running every HTTP connection
  // HTTP read deadlines (HttpServer::Options): a connection that does not send its header,
  // its body or (keep-alive) its next request in time is closed.
  std::chrono::milliseconds http_header_timeout{std::chrono::seconds(10)};
  std::chrono::milliseconds http_body_timeout{std::chrono::seconds(30)};
  std::chrono::milliseconds http_idle_timeout{std::chrono::seconds(60)};
  HttpTls http_tls;  // TLS on the HTTP port (none: plain HTTP)
  int grpc_threads = 512;
  bool handshake = true;  // require replicas to serve the same model
  // Chat: "deepseek_r1" returns <think>...</think> as reasoning_content, "none" leaves it in
  // the content, "auto" is deepseek_r1 when the chat template mentions </think> (R1's does).
  std::string reasoning_parser = "auto";
};

// API keys from a file (one per line; blank lines and # comments skipped) and/or an
// environment variable's comma-separated value.
absl::StatusOr<std::vector<std::string>> LoadApiKeys(const std::string& file,
                                                     const char* env_value);

class GatewayServer {
 public:
  static absl::StatusOr<std::unique_ptr<GatewayServer>> Create(const GatewayOptions& options);
  ~GatewayServer();  // Drain(0)

  int http_port() const { return http_->port(); }
  int grpc_port() const { return grpc_.port; }
  const ModelCard& card() const { return runner_->card(); }
  MetricsRegistry& metrics() { return registry_; }
  AttentionPool& pool() { return *pool_; }
  Admission& admission() { return *admission_; }

  // SIGTERM: health goes NOT_SERVING and /health 503, no new connections; open requests get
  // `grace` to finish, then are cancelled; servers stop.
  void Drain(std::chrono::milliseconds grace);

 private:
  GatewayServer() = default;

  MetricsRegistry registry_;
  std::unique_ptr<GatewayMetrics> metrics_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::optional<ChatTemplate> chat_template_;
  std::unique_ptr<AttentionPool> pool_;
  std::unique_ptr<Admission> admission_;
  std::unique_ptr<RequestRunner> runner_;
  std::unique_ptr<GatewayGrpcService> grpc_service_;
  RunningServer grpc_;
  std::unique_ptr<HttpServer> http_;
  std::thread health_watcher_;
  std::atomic<bool> stopping_{false};
  bool drained_ = false;
};

}  // namespace expertmesh::gateway
