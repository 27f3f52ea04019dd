// Test helpers for the gateway: a small random DeepSeek-V3 checkpoint that carries the bundled
// tokenizer (so text goes in and out), a minimal HTTP/1.1 client on Beast, and SSE parsing.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

#include "tools/launcher/cluster.h"

namespace expertmesh::gateway::testing {

// A fresh directory under /tmp holding a seeded random checkpoint whose vocabulary is the
// bundled tokenizer's (models/expertmesh-tiny/tokenizer*.json copied beside it) and a
// generation_config.json (bos 0, eos 1, temperature 0.6, top_p 0.95).
absl::StatusOr<std::string> MakeGatewayTestModel();

struct HttpResult {
  int status = 0;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;                            // chunked bodies de-chunked
};

// The Python that has the official `openai` client: $EXPERTMESH_TEST_PYTHON, else the
// repository's .venv-test (tools/requirements-test.txt). The path may not exist; callers check.
std::string TestPython();

// A loopback cluster (router, 1 expert shard, 1 attention service with max_batch 8) on the
// checkpoint in `model_dir`, for the tests that put their own gateways in front of it.
absl::StatusOr<std::unique_ptr<launcher::Cluster>> StartOneShardCluster(
    const std::string& model_dir);

// One request on a fresh connection to 127.0.0.1:port.
absl::StatusOr<HttpResult> HttpRequest(int port, const std::string& method,
                                       const std::string& target, const std::string& body = "",
                                       const std::map<std::string, std::string>& headers = {});

// The payloads of the `data:` lines of an SSE body, in order.
std::vector<std::string> SseData(const std::string& body);

}  // namespace expertmesh::gateway::testing
