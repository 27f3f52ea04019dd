#include "tests/gateway/gateway_test_util.h"

#include <stdlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "core/format/config.h"
#include "gateway/strings.h"
#include "tests/common/tiny_config.h"
#include "tools/make-checkpoint/random_checkpoint.h"

namespace expertmesh::gateway::testing {

std::string TestPython() {
  const char* env = std::getenv("EXPERTMESH_TEST_PYTHON");
  return env != nullptr ? env : std::string(EXPERTMESH_SOURCE_DIR) + "/.venv-test/bin/python";
}

absl::StatusOr<std::unique_ptr<launcher::Cluster>> StartOneShardCluster(
    const std::string& model_dir) {
  launcher::ClusterOptions co;
  co.model_dir = model_dir;
  co.bin_dir = EXPERTMESH_BINARY_DIR;
  co.shards = 1;
  co.max_batch = 8;
  return launcher::Cluster::Start(co);
}

namespace fs = std::filesystem;
namespace net = boost::asio;
namespace http = boost::beast::http;

namespace {

// The shape of the cluster tests' model with the bundled tokenizer's vocabulary (4096).
}  // namespace

absl::StatusOr<std::string> MakeGatewayTestModel() {
  char tmpl[] = "/tmp/expertmesh-gateway-model-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
  const fs::path dir = tmpl;
  const std::string config_json = expertmesh::testing::TinyConfigJson(
      {.vocab_size = 4096, .num_hidden_layers = 3, .num_nextn_predict_layers = 0});
  absl::StatusOr<ModelConfig> config = ParseModelConfig(config_json);
  if (!config.ok()) return config.status();
  if (absl::Status s = WriteRandomCheckpoint(*config, config_json, dir.string(), 20261128, 2);
      !s.ok()) {
    return s;
  }
  const fs::path tiny = fs::path(EXPERTMESH_SOURCE_DIR) / "models" / "expertmesh-tiny";
  std::error_code ec;
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
    fs::copy_file(tiny / name, dir / name, fs::copy_options::overwrite_existing, ec);
    if (ec) return absl::InternalError(Cat("copy ", (tiny / name).string(), ": ", ec.message()));
  }
  std::ofstream(dir / "generation_config.json")
      << R"({"bos_token_id": 0, "eos_token_id": 1, "do_sample": true, "temperature": 0.6,)"
      << R"( "top_p": 0.95})"
      << "\n";
  return dir.string();
}

absl::StatusOr<HttpResult> HttpRequest(int port, const std::string& method,
                                       const std::string& target, const std::string& body,
                                       const std::map<std::string, std::string>& headers) {
  net::io_context io;
  net::ip::tcp::socket socket(io);
  boost::system::error_code ec;
  socket.connect({net::ip::make_address("127.0.0.1"), static_cast<uint16_t>(port)}, ec);
  if (ec) return absl::UnavailableError(Cat("connect: ", ec.message()));
  http::request<http::string_body> req{http::string_to_verb(method), target, 11};
  req.set(http::field::host, "127.0.0.1");
  if (!body.empty()) req.set(http::field::content_type, "application/json");
  for (const auto& [k, v] : headers) req.set(k, v);
  req.body() = body;
  req.keep_alive(false);
  req.prepare_payload();
  http::write(socket, req, ec);
  if (ec) return absl::UnavailableError(Cat("write: ", ec.message()));
  boost::beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(64u << 20);
  http::read(socket, buffer, parser, ec);
  if (ec) return absl::UnavailableError(Cat("read: ", ec.message()));
  HttpResult out;
  const auto& res = parser.get();
  out.status = res.result_int();
  for (const auto& field : res) {
    std::string name(field.name_string());
    std::transform(name.begin(), name.end(), name.begin(), ::tolower);
    out.headers[name] = std::string(field.value());
  }
  out.body = res.body();
  return out;
}

std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find('\n', pos);
    if (end == std::string::npos) end = body.size();
    std::string_view line(body.data() + pos, end - pos);
    if (line.substr(0, 6) == "data: ") out.emplace_back(line.substr(6));
    pos = end + 1;
  }
  return out;
}

}  // namespace expertmesh::gateway::testing
