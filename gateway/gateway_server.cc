#include "gateway/gateway_server.h"

#include <filesystem>
#include <sstream>

#include <boost/json.hpp>

#include "absl/strings/str_join.h"
#include "core/base/file.h"
#include "core/base/status.h"
#include "core/format/config.h"
#include "gateway/strings.h"
#include "service-common/bootstrap.h"
#include "service-common/handshake.h"
#include "spdlog/spdlog.h"

namespace expertmesh::gateway {
namespace fs = std::filesystem;

absl::StatusOr<std::vector<std::string>> LoadApiKeys(const std::string& file,
                                                     const char* env_value) {
  std::vector<std::string> keys;
  auto add = [&](std::string key) {
    while (!key.empty() && std::isspace(static_cast<unsigned char>(key.back()))) key.pop_back();
    size_t start = 0;
    while (start < key.size() && std::isspace(static_cast<unsigned char>(key[start]))) ++start;
    key.erase(0, start);
    if (!key.empty() && key[0] != '#') keys.push_back(key);
  };
  if (!file.empty()) {
    absl::StatusOr<std::string> text = base::ReadFile(file);
    if (!text.ok()) {
      return absl::Status(text.status().code(),
                          Cat("cannot read the API key file ", text.status().message()));
    }
    std::istringstream in(*text);
    for (std::string line; std::getline(in, line);) add(line);
    if (keys.empty()) return absl::InvalidArgumentError(Cat("no API key in ", file));
  }
  if (env_value != nullptr) {
    std::stringstream ss(env_value);
    for (std::string key; std::getline(ss, key, ',');) add(key);
  }
  return keys;
}

absl::StatusOr<std::unique_ptr<GatewayServer>> GatewayServer::Create(const GatewayOptions& o) {
  std::unique_ptr<GatewayServer> g(new GatewayServer());
  const fs::path dir(o.model_dir);
  EM_ASSIGN_OR_RETURN(g->tokenizer_, Tokenizer::Load((dir / "tokenizer.json").string()));

  const fs::path tokenizer_config = dir / "tokenizer_config.json";
  if (fs::exists(tokenizer_config)) {
    absl::StatusOr<ChatTemplate> tmpl = ChatTemplate::FromTokenizerConfig(tokenizer_config);
    if (tmpl.ok()) {
      g->chat_template_.emplace(std::move(*tmpl));
    } else {
      spdlog::warn("no chat template ({}): /v1/chat/completions is disabled",
                   std::string(tmpl.status().message()));
    }
  }

  ModelCard card;
  card.id = o.served_model_name.empty() ? fs::absolute(dir).lexically_normal().filename().string()
                                        : o.served_model_name;
  if (card.id.empty()) card.id = fs::absolute(dir).lexically_normal().parent_path().filename();
  EM_ASSIGN_OR_RETURN(GenerationDefaults defaults,
                      LoadGenerationDefaults((dir / "generation_config.json").string()));
  card.defaults = defaults;
  card.max_context = o.max_context;
  if (card.max_context == 0) {
    EM_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig((dir / "config.json").string()));
    card.max_context = static_cast<uint32_t>(config.max_position_embeddings);
  }
  if (card.max_context < 2) return absl::InvalidArgumentError("the model's context is too short");
  if (o.reasoning_parser == "deepseek_r1") {
    card.reasoning_parser = true;
  } else if (o.reasoning_parser == "auto") {
    card.reasoning_parser =
        g->chat_template_ && g->chat_template_->source().find("</think>") != std::string::npos;
  } else if (o.reasoning_parser != "none") {
    return absl::InvalidArgumentError(
        Cat("unknown reasoning parser '", o.reasoning_parser, "' (deepseek_r1, none, auto)"));
  }

  AttentionPool::Options pool_options;
  pool_options.addresses = o.attention;
  pool_options.resolve_interval = o.attention_resolve_interval;
  if (o.handshake) {
    EM_ASSIGN_OR_RETURN(v1::PeerIdentity id, MakeLocalIdentity(o.model_dir, "gateway", card.id));
    pool_options.identity = id;
  }
  EM_ASSIGN_OR_RETURN(g->pool_, AttentionPool::Create(pool_options));

  g->metrics_ = std::make_unique<GatewayMetrics>(g->registry_);
  g->admission_ =
      std::make_unique<Admission>(Admission::Options{.max_running = o.max_running,
                                                     .max_waiting = o.max_waiting,
                                                     .max_waiting_tokens = o.max_waiting_tokens,
                                                     .now = nullptr});
  {
    Gauge& running = g->registry_.GetGauge("expertmesh_gateway_requests_running",
                                           "Requests admitted and generating");
    Gauge& waiting = g->registry_.GetGauge("expertmesh_gateway_requests_waiting",
                                           "Requests in the admission queue");
    // The names a KEDA prometheus trigger scales on (queue depth in requests and in tokens).
    Gauge& queue_requests = g->registry_.GetGauge("expertmesh_gateway_queue_requests",
                                                  "Requests in the admission queue");
    Gauge& queue_tokens =
        g->registry_.GetGauge("expertmesh_gateway_queue_tokens",
                              "Prompt + max_tokens of the requests in the admission queue");
    Gauge& open =
        g->registry_.GetGauge("expertmesh_gateway_http_connections", "Open HTTP connections");
    Admission* a = g->admission_.get();
    GatewayServer* self = g.get();
    g->registry_.AddCollector([a, self, &running, &waiting, &queue_requests, &queue_tokens, &open] {
      running.Set(a->running());
      const uint32_t queued = a->waiting();
      waiting.Set(queued);
      queue_requests.Set(queued);
      queue_tokens.Set(static_cast<double>(a->waiting_tokens()));
      if (self->http_ != nullptr) open.Set(self->http_->open_connections());
    });
  }
  RequestRunner::Options gen_options;
  gen_options.default_timeout = o.request_timeout;
  g->runner_ = std::make_unique<RequestRunner>(
      g->tokenizer_.get(), g->chat_template_ ? &*g->chat_template_ : nullptr, card, g->pool_.get(),
      g->admission_.get(), g->metrics_.get(), gen_options);

  g->grpc_service_ = std::make_unique<GatewayGrpcService>(g->runner_.get(), g->metrics_.get());
  ServerOptions server_options;
  server_options.listen = o.grpc_listen;
  server_options.max_sync_threads = o.grpc_threads;
  // grpc.health.v1 answers for expertmesh.v1.Gateway too, following "" (the health watcher).
  server_options.health_service_names.push_back(v1::Gateway::service_full_name());
  EM_ASSIGN_OR_RETURN(g->grpc_, StartGrpcServer(server_options, {g->grpc_service_.get()}));

  HttpServer::Options http_options;
  http_options.host = o.http_host;
  http_options.port = o.http_port;
  http_options.api_keys = o.api_keys;
  http_options.max_connections = o.max_connections;
  http_options.io_threads = o.http_threads;
  // A generation worker either generates or waits in the admission queue: beyond both, the
  // admission would refuse the request anyway.
  http_options.max_generations =
      static_cast<int>(std::min<uint64_t>(uint64_t{o.max_running} + o.max_waiting, 1u << 16));
  http_options.header_timeout = o.http_header_timeout;
  http_options.body_timeout = o.http_body_timeout;
  http_options.idle_timeout = o.http_idle_timeout;
  http_options.tls = o.http_tls;
  AttentionPool* p = g->pool_.get();
  absl::StatusOr<std::unique_ptr<HttpServer>> http =
      HttpServer::Start(http_options, g->runner_.get(), g->metrics_.get(), [p]() -> absl::Status {
        if (p->AnyReady()) return absl::OkStatus();
        std::string why = "no attention-service replica is ready";
        for (const AttentionPool::ReplicaState& r : p->Snapshot()) {
          if (!r.last_error.empty()) why += Cat(" (", r.address, ": ", r.last_error, ")");
        }
        return absl::UnavailableError(why);
      });
  if (!http.ok()) return http.status();
  g->http_ = std::move(*http);

  // grpc.health.v1: "" is liveness; the Gateway name follows the replicas' readiness.
  SetLive(*g->grpc_.server);
  g->health_watcher_ = std::thread([self = g.get()] {
    bool serving = false;
    while (!self->stopping_) {
      bool ready = self->pool_->WaitReady(std::chrono::milliseconds(200));
      if (ready != serving && !self->stopping_) {
        SetReady(*self->grpc_.server, v1::Gateway::service_full_name(), ready);  // "" stays live
        serving = ready;
        spdlog::info("gateway {}", ready ? "SERVING" : "NOT_SERVING");
      }
      if (ready) {
        // WaitReady returns at once while ready: pace the loop.
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
    }
  });
  spdlog::info(
      "gateway: model '{}' (context {}), HTTP on {}:{}, gRPC on port {}, attention replicas "
      "from {} ({} now)",
      card.id, card.max_context, o.http_host, g->http_->port(), g->grpc_.port,
      absl::StrJoin(o.attention, ","), g->pool_->Snapshot().size());
  return g;
}

void GatewayServer::Drain(std::chrono::milliseconds grace) {
  if (drained_) return;
  drained_ = true;
  stopping_ = true;
  // NOT_SERVING at once (readiness takes the pod out of its Service), and again once the
  // health watcher, which may be mid-iteration, has stopped.
  if (grpc_.server) SetServing(*grpc_.server, false);
  if (health_watcher_.joinable()) health_watcher_.join();
  if (grpc_.server) SetServing(*grpc_.server, false);
  const auto deadline = std::chrono::system_clock::now() + grace;
  std::thread grpc_stop([this, deadline] {
    if (grpc_.server) grpc_.server->Shutdown(deadline);
  });
  if (http_) http_->Drain(grace);
  grpc_stop.join();
  if (admission_) admission_->Close();  // null when Create failed before making it
}

GatewayServer::~GatewayServer() { Drain(std::chrono::milliseconds(0)); }

}  // namespace expertmesh::gateway
