// The gateway against a real cluster on loopback (router, expert shard and attention service
// as separate processes, started by the launcher; the gateway in-process, as main.cc runs it):
// greedy text equals the in-process engine's, streamed deltas equal the non-streamed text,
// stop strings, every error case with its status and body, 200 concurrent streams against a
// queue of 64, the token-sized admission queue (burst, 429 + Retry-After, priority, fair
// share between API keys, its metrics), client disconnects, API keys, readiness, the gRPC API.
#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include <boost/asio.hpp>
#include <boost/json.hpp>

#include "core/text/chat_template.h"
#include "core/text/tokenizer.h"
#include "gateway/gateway_server.h"
#include "gateway/strings.h"
#include "gtest/gtest.h"
#include "service-common/metrics_http.h"
#include "service-common/process.h"
#include "tests/cluster/cluster_test_util.h"
#include "tests/common/metrics_text.h"
#include "tests/common/poll.h"
#include "tests/gateway/gateway_test_util.h"
#include "tools/launcher/cluster.h"
#include "tools/launcher/process.h"

namespace expertmesh::gateway {
namespace {
namespace json = boost::json;
using testing::HttpRequest;
using testing::HttpResult;
using testing::SseData;

constexpr int kMaxTokens = 10;
const std::vector<std::string> kPrompts = {"In the beginning God created", "The quick brown fox",
                                           "Hello, world! \xc3\xa9t\xc3\xa9", "A"};

using expertmesh::testing::MetricValue;

constexpr int kShards = 1;

// A cluster of kShards expert shard(s) and an in-process gateway in front of it, ready.
struct ClusterAndGateway {
  std::unique_ptr<launcher::Cluster> cluster;
  std::unique_ptr<GatewayServer> gateway;  // destroyed first
};
absl::StatusOr<ClusterAndGateway> StartClusterAndGateway(const std::string& model_dir) {
  ClusterAndGateway r;
  launcher::ClusterOptions co;
  co.model_dir = model_dir;
  co.bin_dir = EXPERTMESH_BINARY_DIR;
  co.shards = kShards;
  co.max_batch = 16;
  co.max_waiting = 256;
  absl::StatusOr<std::unique_ptr<launcher::Cluster>> cluster = launcher::Cluster::Start(co);
  if (!cluster.ok()) return cluster.status();
  r.cluster = *std::move(cluster);

  GatewayOptions go;
  go.model_dir = model_dir;
  go.attention = {r.cluster->attention().grpc_address};
  go.http_host = "127.0.0.1";
  go.max_running = 8;  // small, so that 200 concurrent requests use the queue of 64
  go.max_waiting = 64;
  go.request_timeout = std::chrono::seconds(120);
  absl::StatusOr<std::unique_ptr<GatewayServer>> gateway = GatewayServer::Create(go);
  if (!gateway.ok()) return gateway.status();
  r.gateway = *std::move(gateway);
  if (!r.gateway->pool().WaitReady(std::chrono::seconds(60))) {
    return absl::DeadlineExceededError("the gateway's attention pool did not become ready");
  }
  return r;
}

// A greedy completion request for prompt i.
json::object CompletionBody(const GatewayServer& gateway, size_t i, int max_tokens) {
  return json::object{{"model", gateway.card().id},
                      {"prompt", kPrompts[i]},
                      {"max_tokens", max_tokens},
                      {"temperature", 0},
                      {"ignore_eos", true}};
}

class GatewayClusterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> dir = testing::MakeGatewayTestModel();
    ASSERT_TRUE(dir.ok()) << dir.status();
    model_dir_ = new std::string(*dir);
    absl::StatusOr<ClusterAndGateway> running = StartClusterAndGateway(*dir);
    ASSERT_TRUE(running.ok()) << running.status();
    cluster_ = running->cluster.release();
    gateway_ = running->gateway.release();

    auto tokenizer = Tokenizer::Load(*dir + "/tokenizer.json");
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = tokenizer->release();
    // The engine's greedy continuations of the test prompts (with BOS, as the gateway encodes).
    std::vector<std::vector<int32_t>> prompts;
    for (const std::string& p : kPrompts) prompts.push_back(*tokenizer_->Encode(p, true));
    // The in-process reference engine: what the cluster (exact combine) reproduces bit for bit.
    auto ref = expertmesh::testing::ReferenceGreedy(*dir, prompts, 16);
    ASSERT_TRUE(ref.ok()) << ref.status();
    prompt_ids_ = new std::vector<std::vector<int32_t>>(prompts);
    reference_ = new std::vector<std::vector<int32_t>>(*ref);
  }
  static void TearDownTestSuite() {
    delete gateway_;
    gateway_ = nullptr;
    delete cluster_;
    cluster_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(gateway_, nullptr) << "the cluster or the gateway did not start";
    ASSERT_NE(reference_, nullptr);
  }

  // The reference text of prompt i after n greedy tokens.
  static std::string ReferenceText(size_t i, int n) {
    std::vector<int32_t> ids((*reference_)[i].begin(), (*reference_)[i].begin() + n);
    return tokenizer_->Decode(ids, true);
  }
  static int port() { return gateway_->http_port(); }
  // The gateway's own non-streamed greedy text for prompt i (the baseline of the tests that
  // check one gateway property each; equality with the engine is checked separately).
  static std::string GatewayText(size_t i, int n) {
    auto r = HttpRequest(port(), "POST", "/v1/completions", json::serialize(Completion(i, n)));
    EXPECT_TRUE(r.ok() && r->status == 200);
    if (!r.ok() || r->status != 200) return "";
    return std::string(json::parse(r->body).at("choices").at(0).at("text").as_string());
  }
  static absl::StatusOr<HttpResult> Post(const std::string& path, const json::object& body) {
    return HttpRequest(port(), "POST", path, json::serialize(body));
  }
  static json::object Completion(size_t i, int max_tokens) {
    return CompletionBody(*gateway_, i, max_tokens);
  }
  // The attention service's load, as the gateway's pool sees it.
  static v1::LoadResponse AttentionLoad() {
    auto channel = MakeChannel(cluster_->attention().grpc_address);
    auto stub = v1::AttentionService::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::LoadResponse load;
    EXPECT_TRUE(stub->GetLoad(&ctx, v1::LoadRequest(), &load).ok());
    return load;
  }
  // Waits (the network is the subject here) until the attention service holds no sequence.
  static bool AttentionIdle() {
    return expertmesh::testing::PollUntil(
        [] {
          v1::LoadResponse load = AttentionLoad();
          return load.running() == 0 && load.waiting() == 0;
        },
        absl::Seconds(10), absl::Milliseconds(50));
  }

  static inline std::string* model_dir_ = nullptr;
  static inline launcher::Cluster* cluster_ = nullptr;
  static inline GatewayServer* gateway_ = nullptr;
  static inline Tokenizer* tokenizer_ = nullptr;
  static inline std::vector<std::vector<int32_t>>* prompt_ids_ = nullptr;
  static inline std::vector<std::vector<int32_t>>* reference_ = nullptr;
};

// Below the gateway: the attention service alone reproduces the engine (when this fails, so
// do the gateway's equality tests, and the fault is not the gateway's).
TEST_F(GatewayClusterTest, AttentionServiceAloneEqualsTheEngine) {
  auto stub = v1::AttentionService::NewStub(MakeChannel(cluster_->attention().grpc_address));
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    v1::SubmitRequest req =
        expertmesh::testing::GreedyRequest(Cat("direct-", i), (*prompt_ids_)[i], kMaxTokens);
    req.mutable_sampling()->set_top_p(0.95f);  // as the gateway sends the model's default
    expertmesh::testing::SubmitResult r = expertmesh::testing::SubmitAndCollect(*stub, req);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    std::vector<int32_t> want((*reference_)[i].begin(), (*reference_)[i].begin() + kMaxTokens);
    EXPECT_EQ(r.tokens, want) << "prompt " << i;
  }
}

TEST_F(GatewayClusterTest, CompletionsGreedyEqualsTheEngine) {
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    auto r = Post("/v1/completions", Completion(i, kMaxTokens));
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->status, 200) << r->body;
    json::value v = json::parse(r->body);
    EXPECT_EQ(v.at("object").as_string(), "text_completion");
    const json::object& choice = v.at("choices").at(0).as_object();
    EXPECT_EQ(choice.at("text").as_string(), ReferenceText(i, kMaxTokens)) << kPrompts[i];
    EXPECT_EQ(choice.at("finish_reason").as_string(), "length");
    EXPECT_EQ(v.at("usage").at("prompt_tokens").as_int64(), (*prompt_ids_)[i].size());
    EXPECT_EQ(v.at("usage").at("completion_tokens").as_int64(), kMaxTokens);
    EXPECT_EQ(v.at("usage").at("total_tokens").as_int64(), (*prompt_ids_)[i].size() + kMaxTokens);
  }
}

TEST_F(GatewayClusterTest, StreamedDeltasConcatenateToTheNonStreamedText) {
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    json::object body = Completion(i, kMaxTokens);
    body["stream"] = true;
    body["stream_options"] = json::object{{"include_usage", true}};
    auto r = Post("/v1/completions", body);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->status, 200) << r->body;
    EXPECT_EQ(r->headers["content-type"], "text/event-stream");
    std::vector<std::string> events = SseData(r->body);
    ASSERT_GE(events.size(), 3u);
    EXPECT_EQ(events.back(), "[DONE]");
    std::string text;
    std::string finish;
    json::value usage;
    for (size_t e = 0; e + 1 < events.size(); ++e) {
      json::value v = json::parse(events[e]);
      const json::array& choices = v.at("choices").as_array();
      if (choices.empty()) {
        usage = v.at("usage");
        continue;
      }
      EXPECT_TRUE(v.at("usage").is_null());
      text += std::string(choices[0].at("text").as_string());
      if (!choices[0].at("finish_reason").is_null()) {
        finish = std::string(choices[0].at("finish_reason").as_string());
      }
    }
    EXPECT_EQ(text, GatewayText(i, kMaxTokens));
    EXPECT_EQ(finish, "length");
    ASSERT_TRUE(usage.is_object());
    EXPECT_EQ(usage.at("completion_tokens").as_int64(), kMaxTokens);
  }
}

TEST_F(GatewayClusterTest, ChatUsesTheModelsTemplate) {
  json::array messages{json::object{{"role", "system"}, {"content", "Be brief."}},
                       json::object{{"role", "user"}, {"content", "Who made the world?"}}};
  auto tmpl = ChatTemplate::FromTokenizerConfig(*model_dir_ + "/tokenizer_config.json");
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  auto prompt = tmpl->Apply(messages, true);
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  auto ids = tokenizer_->Encode(*prompt, false);
  ASSERT_TRUE(ids.ok());
  auto ref = expertmesh::testing::ReferenceGreedy(*model_dir_, {*ids}, kMaxTokens);
  ASSERT_TRUE(ref.ok()) << ref.status();
  const std::string want = tokenizer_->Decode((*ref)[0], true);

  json::object body{{"model", gateway_->card().id},
                    {"messages", messages},
                    {"max_completion_tokens", kMaxTokens},
                    {"temperature", 0},
                    {"ignore_eos", true}};
  auto r = Post("/v1/chat/completions", body);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->status, 200) << r->body;
  json::value v = json::parse(r->body);
  EXPECT_EQ(v.at("object").as_string(), "chat.completion");
  const std::string content(v.at("choices").at(0).at("message").at("content").as_string());
  EXPECT_EQ(content, want);
  EXPECT_EQ(v.at("choices").at(0).at("message").at("role").as_string(), "assistant");
  EXPECT_EQ(v.at("usage").at("prompt_tokens").as_int64(), ids->size());

  body["stream"] = true;
  auto s = Post("/v1/chat/completions", body);
  ASSERT_TRUE(s.ok()) << s.status();
  std::vector<std::string> events = SseData(s->body);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  for (size_t e = 0; e + 1 < events.size(); ++e) {
    json::value c = json::parse(events[e]);
    EXPECT_EQ(c.at("object").as_string(), "chat.completion.chunk");
    const json::object& delta = c.at("choices").at(0).at("delta").as_object();
    if (e == 0) EXPECT_EQ(delta.at("role").as_string(), "assistant");
    if (const json::value* content = delta.if_contains("content")) {
      text += std::string(content->as_string());
    }
  }
  EXPECT_EQ(text, content);  // streamed deltas == the non-streamed message
}

TEST_F(GatewayClusterTest, StopStringsAcrossTokensAreCutAndNotEmitted) {
  const int n = 16;
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    const std::string full = GatewayText(i, n);
    // A two-byte stop string from the middle of the reference text (on a character
    // boundary), usually spanning two tokens.
    size_t k = full.size() / 2;
    while (k > 0 && (static_cast<unsigned char>(full[k]) & 0xC0) == 0x80) --k;
    size_t len = 1;
    while (k + len < full.size() && len < 2) ++len;
    while (k + len < full.size() && (static_cast<unsigned char>(full[k + len]) & 0xC0) == 0x80) {
      ++len;
    }
    const std::string stop = full.substr(k, len);
    const std::string want = full.substr(0, full.find(stop));
    for (bool stream : {false, true}) {
      json::object body = Completion(i, n);
      body["stop"] = json::array{json::string(stop), "\x01never"};
      body["stream"] = stream;
      auto r = Post("/v1/completions", body);
      ASSERT_TRUE(r.ok()) << r.status();
      ASSERT_EQ(r->status, 200) << r->body;
      std::string text, finish;
      if (!stream) {
        json::value v = json::parse(r->body);
        text = v.at("choices").at(0).at("text").as_string();
        finish = v.at("choices").at(0).at("finish_reason").as_string();
      } else {
        for (const std::string& e : SseData(r->body)) {
          if (e == "[DONE]") break;
          json::value c = json::parse(e);
          text += std::string(c.at("choices").at(0).at("text").as_string());
          if (!c.at("choices").at(0).at("finish_reason").is_null()) {
            finish = c.at("choices").at(0).at("finish_reason").as_string();
          }
        }
      }
      EXPECT_EQ(text, want) << "stop '" << stop << "' stream " << stream;
      EXPECT_EQ(finish, "stop");
    }
  }
  EXPECT_TRUE(AttentionIdle());
}

TEST_F(GatewayClusterTest, LogprobsAreReturned) {
  json::object body = Completion(0, 4);
  body["logprobs"] = 2;
  auto r = Post("/v1/completions", body);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->status, 200) << r->body;
  json::value v = json::parse(r->body);
  const json::object& lp = v.at("choices").at(0).at("logprobs").as_object();
  ASSERT_EQ(lp.at("tokens").as_array().size(), 4u);
  ASSERT_EQ(lp.at("token_logprobs").as_array().size(), 4u);
  for (const json::value& x : lp.at("token_logprobs").as_array()) {
    EXPECT_LE(x.to_number<double>(), 0.0);
  }
  for (const json::value& top : lp.at("top_logprobs").as_array()) {
    EXPECT_EQ(top.as_object().size(), 2u);
  }
}

TEST_F(GatewayClusterTest, EveryErrorHasItsStatusAndBodyAndTheGatewayStaysUp) {
  const std::string model = gateway_->card().id;
  std::string long_prompt;  // about 600 tokens: more than the context of 256
  for (int i = 0; i < 600; ++i) long_prompt += " the";
  struct Case {
    std::string method, path, body;
    int status;
    std::string param;  // "" = null
  };
  const std::vector<Case> cases = {
      {"POST", "/v1/completions", "{not json", 400, ""},
      {"POST", "/v1/completions", R"({"model": ")" + model + R"(", "prompt": 5})", 400, "prompt"},
      {"POST", "/v1/completions", R"({"model": "nope", "prompt": "a"})", 404, "model"},
      {"POST", "/v1/completions",
       R"({"model": ")" + model + R"(", "prompt": "a", "temperature": 9})", 400, "temperature"},
      {"POST", "/v1/completions",
       R"({"model": ")" + model + R"(", "prompt": ")" + long_prompt + R"("})", 400, "prompt"},
      {"POST", "/v1/completions",
       R"({"model": ")" + model + R"(", "prompt": "a", "max_tokens": 255})", 400, "prompt"},
      {"POST", "/v1/completions", R"({"model": ")" + model + R"(", "prompt": [1, 99999]})", 400,
       "prompt"},
      {"POST", "/v1/completions", "{\"model\": \"" + model + "\", \"prompt\": \"\xff\"}", 400, ""},
      {"POST", "/v1/completions",
       R"({"model": ")" + model + R"(", "prompt": "a", "frobnicate": 1})", 400, "frobnicate"},
      {"POST", "/v1/completions", R"({"model": ")" + model + R"(", "prompt": "a", "n": 17})", 400,
       "n"},
      {"POST", "/v1/completions",
       R"({"model": ")" + model + R"(", "prompt": "a", "n": 3, "best_of": 2})", 400, "best_of"},
      {"POST", "/v1/chat/completions", R"({"model": ")" + model + R"(", "messages": []})", 400,
       "messages"},
      {"POST", "/v1/chat/completions",
       R"({"model": ")" + model + R"(", "messages": [{"role": "user", "content": ")" + long_prompt +
           R"("}]})",
       400, "messages"},
      {"GET", "/v1/completions", "", 405, ""},
      {"GET", "/v2/whatever", "", 404, ""},
      {"GET", "/v1/models/nope", "", 404, "model"},
  };
  for (const Case& c : cases) {
    auto r = HttpRequest(port(), c.method, c.path, c.body);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->status, c.status) << c.body << " -> " << r->body;
    boost::system::error_code ec;
    json::value v = json::parse(r->body, ec);
    ASSERT_FALSE(ec) << r->body;
    const json::object& err = v.at("error").as_object();
    EXPECT_TRUE(err.at("message").is_string());
    EXPECT_FALSE(err.at("message").as_string().empty());
    EXPECT_TRUE(err.at("type").is_string());
    EXPECT_TRUE(err.contains("code"));
    if (c.param.empty()) {
      EXPECT_TRUE(err.at("param").is_null()) << r->body;
    } else {
      ASSERT_TRUE(err.at("param").is_string()) << r->body;
      EXPECT_EQ(err.at("param").as_string(), c.param) << r->body;
    }
  }
  auto health = HttpRequest(port(), "GET", "/health");
  ASSERT_TRUE(health.ok());
  EXPECT_EQ(health->status, 200);
  auto after = Post("/v1/completions", Completion(0, 2));
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->status, 200);
}

TEST_F(GatewayClusterTest, ModelsHealthAndMetrics) {
  auto models = HttpRequest(port(), "GET", "/v1/models");
  ASSERT_TRUE(models.ok());
  ASSERT_EQ(models->status, 200);
  json::value v = json::parse(models->body);
  EXPECT_EQ(v.at("data").at(0).at("id").as_string(), gateway_->card().id);
  EXPECT_EQ(v.at("data").at(0).at("max_model_len").as_int64(), 256);
  auto one = HttpRequest(port(), "GET", "/v1/models/" + gateway_->card().id);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->status, 200);
  auto metrics = HttpRequest(port(), "GET", "/metrics");
  ASSERT_TRUE(metrics.ok());
  EXPECT_EQ(metrics->status, 200);
  EXPECT_NE(metrics->body.find("expertmesh_gateway_requests_running"), std::string::npos);
  EXPECT_NE(metrics->body.find("expertmesh_gateway_time_to_first_token_seconds"),
            std::string::npos);
}

TEST_F(GatewayClusterTest, TwoHundredConcurrentStreamsAgainstAQueueOf64) {
  constexpr int kRequests = 200;
  constexpr int kTokens = 8;
  std::vector<std::string> want;
  for (size_t i = 0; i < kPrompts.size(); ++i) want.push_back(GatewayText(i, kTokens));
  std::atomic<int> ok{0}, rejected{0}, wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kRequests; ++t) {
    threads.emplace_back([&, t] {
      const size_t i = t % kPrompts.size();
      json::object body = Completion(i, kTokens);
      body["stream"] = true;
      auto r = Post("/v1/completions", body);
      if (!r.ok()) {
        ++wrong;
        return;
      }
      if (r->status == 429) {
        json::value v = json::parse(r->body);
        if (v.at("error").at("code").as_string() == "rate_limit_exceeded" &&
            !r->headers["retry-after"].empty()) {
          ++rejected;
        } else {
          ++wrong;
        }
        return;
      }
      std::string text;
      std::vector<std::string> events = SseData(r->body);
      for (const std::string& e : events) {
        if (e == "[DONE]") break;
        text += std::string(json::parse(e).at("choices").at(0).at("text").as_string());
      }
      if (r->status == 200 && !events.empty() && events.back() == "[DONE]" && text == want[i]) {
        ++ok;
      } else {
        ++wrong;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(ok + rejected, kRequests);
  EXPECT_GE(ok.load(), 8 + 64);  // at least the running slots and the queue were served
  std::printf("concurrency: %d completed, %d rejected with 429\n", ok.load(), rejected.load());
  // Nothing leaked: the gateway's gauges and the attention service's load are back to zero.
  auto metrics = HttpRequest(port(), "GET", "/metrics");
  ASSERT_TRUE(metrics.ok());
  EXPECT_EQ(MetricValue(metrics->body, "expertmesh_gateway_requests_running"), 0);
  EXPECT_EQ(MetricValue(metrics->body, "expertmesh_gateway_requests_waiting"), 0);
  EXPECT_TRUE(AttentionIdle());
}

// A gateway in front of this cluster with one running slot, which a test holds itself
// (Admission::Enter) to fill the queue deterministically.
std::unique_ptr<GatewayServer> SmallGateway(const std::string& model_dir,
                                            const std::string& attention,
                                            uint64_t max_waiting_tokens,
                                            std::vector<std::string> api_keys = {}) {
  GatewayOptions go;
  go.model_dir = model_dir;
  go.attention = {attention};
  go.http_host = "127.0.0.1";
  go.max_running = 1;
  go.max_waiting = 1000;
  go.max_waiting_tokens = max_waiting_tokens;
  go.request_timeout = std::chrono::seconds(120);
  go.api_keys = std::move(api_keys);
  auto g = GatewayServer::Create(go);
  EXPECT_TRUE(g.ok()) << g.status();
  if (!g.ok()) return nullptr;
  EXPECT_TRUE((*g)->pool().WaitReady(std::chrono::seconds(60)));
  return *std::move(g);
}

bool QueueHolds(Admission& a, uint32_t n) {
  return expertmesh::testing::PollUntil([&] { return a.waiting() == n; }, absl::Seconds(60),
                                        absl::Milliseconds(2));
}

TEST_F(GatewayClusterTest, TheTokenSizedQueueTakesABurstThatFitsAndRefusesBeyondIt) {
  constexpr int kBurst = 40;
  constexpr int kTokens = 4;
  const std::vector<int32_t>& prompt = (*prompt_ids_)[0];
  const uint64_t cost = prompt.size() + kTokens;  // what each request weighs in the queue
  auto gw = SmallGateway(*model_dir_, cluster_->attention().grpc_address, kBurst * cost);
  ASSERT_NE(gw, nullptr);
  const int p = gw->http_port();
  json::object body{{"model", gw->card().id},
                    {"prompt", json::array(prompt.begin(), prompt.end())},
                    {"max_tokens", kTokens},
                    {"temperature", 0},
                    {"ignore_eos", true}};
  const std::string payload = json::serialize(body);
  auto held = gw->admission().Enter(Admission::Clock::now() + std::chrono::minutes(2));
  ASSERT_TRUE(held.ok());

  // The burst waits (the old fixed queue of 64 requests had nothing to do with its size).
  std::atomic<int> ok{0}, other{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kBurst; ++i) {
    threads.emplace_back([&] {
      auto r = HttpRequest(p, "POST", "/v1/completions", payload);
      (r.ok() && r->status == 200 ? ok : other)++;
    });
  }
  ASSERT_TRUE(QueueHolds(gw->admission(), kBurst));
  auto metrics = HttpRequest(p, "GET", "/metrics");
  ASSERT_TRUE(metrics.ok());
  EXPECT_EQ(MetricValue(metrics->body, "expertmesh_gateway_queue_requests"), kBurst);
  EXPECT_EQ(MetricValue(metrics->body, "expertmesh_gateway_queue_tokens"),
            static_cast<double>(kBurst * cost));
  EXPECT_EQ(MetricValue(metrics->body, "expertmesh_gateway_queue_rejected_total"), 0);

  // One more does not fit: 429, Retry-After, an OpenAI body; gRPC: RESOURCE_EXHAUSTED.
  auto refused = HttpRequest(p, "POST", "/v1/completions", payload);
  ASSERT_TRUE(refused.ok());
  EXPECT_EQ(refused->status, 429) << refused->body;
  ASSERT_FALSE(refused->headers["retry-after"].empty());
  EXPECT_GE(std::stoi(refused->headers["retry-after"]), 1);
  json::value e = json::parse(refused->body);
  EXPECT_EQ(e.at("error").at("type").as_string(), "rate_limit_error");
  EXPECT_EQ(e.at("error").at("code").as_string(), "rate_limit_exceeded");
  const std::string message(e.at("error").at("message").as_string());
  EXPECT_NE(message.find("at capacity"), std::string::npos) << message;
  {
    auto stub = v1::Gateway::NewStub(MakeChannel(LoopbackAddress(gw->grpc_port())));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::GenerateRequest req;
    req.mutable_prompt_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
    req.set_max_tokens(kTokens);
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
    }
    grpc::Status status = reader->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_NE(status.error_message().find("at capacity"), std::string::npos);
    auto retry = ctx.GetServerTrailingMetadata().find("retry-after");
    ASSERT_NE(retry, ctx.GetServerTrailingMetadata().end());
    EXPECT_GE(std::stoi(std::string(retry->second.data(), retry->second.size())), 1);
  }

  *held = Admission::Ticket();  // the slot frees: the whole burst is served
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(ok.load(), kBurst);
  EXPECT_EQ(other.load(), 0);
  metrics = HttpRequest(p, "GET", "/metrics");
  ASSERT_TRUE(metrics.ok());
  EXPECT_EQ(MetricValue(metrics->body, "expertmesh_gateway_queue_requests"), 0);
  EXPECT_EQ(MetricValue(metrics->body, "expertmesh_gateway_queue_tokens"), 0);
  EXPECT_EQ(MetricValue(metrics->body, "expertmesh_gateway_queue_rejected_total"), 2);
  EXPECT_EQ(MetricValue(metrics->body, "expertmesh_gateway_queue_time_seconds_count"), kBurst);
  EXPECT_EQ(MetricValue(metrics->body,
                        "expertmesh_gateway_requests_total{api=\"completions\","
                        "status=\"429\"}"),
            1);
}

TEST_F(GatewayClusterTest, TheQueueServesByPriorityThenFairlyBetweenApiKeys) {
  auto gw =
      SmallGateway(*model_dir_, cluster_->attention().grpc_address, 1 << 20, {"key-a", "key-b"});
  ASSERT_NE(gw, nullptr);
  const int p = gw->http_port();
  auto held = gw->admission().Enter(Admission::Clock::now() + std::chrono::minutes(2));
  ASSERT_TRUE(held.ok());
  std::mutex mu;
  std::vector<std::string> order;  // as the answers come (one slot: one after another)
  std::vector<std::thread> threads;
  auto send = [&](const std::string& name, const std::string& key, int priority) {
    const uint32_t before = gw->admission().waiting();
    json::object body = CompletionBody(*gw, 0, 6);
    body["priority"] = priority;
    threads.emplace_back([&, name, key, payload = json::serialize(body)] {
      auto r =
          HttpRequest(p, "POST", "/v1/completions", payload, {{"Authorization", "Bearer " + key}});
      EXPECT_TRUE(r.ok() && r->status == 200) << name;
      std::lock_guard lock(mu);
      order.push_back(name);
    });
    ASSERT_TRUE(QueueHolds(gw->admission(), before + 1)) << name;  // queued in this order
  };
  send("a-low", "key-a", 5);
  for (int i = 0; i < 4; ++i) send("a" + std::to_string(i), "key-a", 0);
  send("b0", "key-b", 0);
  send("a-urgent", "key-a", -1);
  *held = Admission::Ticket();
  for (std::thread& t : threads) t.join();
  // Priority first; at priority 0 key-b's one request does not wait for key-a's backlog.
  EXPECT_EQ(order, (std::vector<std::string>{"a-urgent", "a0", "b0", "a1", "a2", "a3", "a-low"}));
}

TEST_F(GatewayClusterTest, PriorityOutOfRangeIs400AndInvalidArgument) {
  json::object body = Completion(0, 2);
  body["priority"] = 1000001;
  auto r = Post("/v1/completions", body);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 400);
  EXPECT_EQ(json::parse(r->body).at("error").at("param").as_string(), "priority");
  body["priority"] = "high";
  r = Post("/v1/completions", body);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 400);
  body["priority"] = -3;  // in range: served
  r = Post("/v1/completions", body);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 200) << r->body;

  auto stub = v1::Gateway::NewStub(MakeChannel(LoopbackAddress(gateway_->grpc_port())));
  for (int priority : {-2000000, 2000000}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::GenerateRequest req;
    req.set_prompt("a");
    req.set_priority(priority);
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
    }
    grpc::Status status = reader->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << priority;
    EXPECT_NE(status.error_message().find("priority"), std::string::npos);
  }
}

TEST_F(GatewayClusterTest, ClientDisconnectCancelsTheSequence) {
  auto attention_metrics = [&] {
    auto text = HttpGet("127.0.0.1", cluster_->attention().metrics_port, "/metrics");
    EXPECT_TRUE(text.ok()) << text.status();
    return text.ok() ? *text : std::string();
  };
  const std::string cancelled =
      R"(expertmesh_attention_requests_finished_total{reason="cancelled"})";
  const double before = std::max(0.0, MetricValue(attention_metrics(), cancelled));
  {
    boost::asio::io_context io;
    boost::asio::ip::tcp::socket socket(io);
    socket.connect({boost::asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(port())});
    json::object body = Completion(1, 240);
    body["stream"] = true;
    const std::string payload = json::serialize(body);
    const std::string request = Cat(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
        "Content-Type: application/json\r\nContent-Length: ", payload.size(), "\r\n\r\n", payload);
    boost::asio::write(socket, boost::asio::buffer(request));
    // Read until the first SSE event has arrived, then hang up.
    std::string got;
    char buf[512];
    while (got.find("data: ") == std::string::npos) {
      size_t n = socket.read_some(boost::asio::buffer(buf));
      got.append(buf, n);
    }
    socket.close();
  }
  EXPECT_TRUE(AttentionIdle());
  EXPECT_EQ(MetricValue(attention_metrics(), cancelled), before + 1);
}

// A gRPC client's deadline reaches the attention service: the call ends with
// DEADLINE_EXCEEDED before the sequence could finish, the sequence finishes there as
// cancelled and its KV blocks go back (expertmesh_attention_kv_blocks_used back to 0).
TEST_F(GatewayClusterTest, GrpcDeadlineCancelsTheSequenceAndFreesItsKv) {
  auto attention_metrics = [&] {
    auto text = HttpGet("127.0.0.1", cluster_->attention().metrics_port, "/metrics");
    EXPECT_TRUE(text.ok()) << text.status();
    return text.ok() ? *text : std::string();
  };
  // Ended by the gateway's cancellation or by the Submit's deadline (the client's), whichever
  // the attention service sees first: cancelled or error, once.
  const auto ended = [&] {
    const std::string text = attention_metrics();
    double n = 0;
    for (const char* reason : {"cancelled", "error"}) {
      n += std::max(
          0.0, MetricValue(text, Cat(R"(expertmesh_attention_requests_finished_total{reason=")",
                                     reason, "\"}")));
    }
    return n;
  };
  ASSERT_TRUE(AttentionIdle());
  const double before = ended();
  auto stub = v1::Gateway::NewStub(MakeChannel(LoopbackAddress(gateway_->grpc_port())));
  grpc::ClientContext ctx;
  // 240 tokens take ~250 ms here unloaded (the context is 256): the deadline comes first.
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
  v1::GenerateRequest req;
  req.set_prompt(kPrompts[1]);
  req.set_max_tokens(240);
  req.set_ignore_eos(true);
  req.mutable_sampling()->set_temperature(0);
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(AttentionIdle());
  EXPECT_TRUE(expertmesh::testing::PollUntil(
      [&] {
        return MetricValue(attention_metrics(), "expertmesh_attention_kv_blocks_used") == 0.0;
      },
      absl::Seconds(10), absl::Milliseconds(50)));
  EXPECT_EQ(ended(), before + 1);
}

TEST_F(GatewayClusterTest, GrpcGenerateAndListModels) {
  auto channel = MakeChannel(LoopbackAddress(gateway_->grpc_port()));
  auto stub = v1::Gateway::NewStub(channel);
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    v1::GenerateRequest req;
    req.set_prompt(kPrompts[i]);
    req.set_max_tokens(kMaxTokens);
    req.set_ignore_eos(true);
    req.set_return_token_ids(true);
    req.mutable_sampling()->set_temperature(0);
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse resp;
    std::vector<int32_t> ids;
    std::string text;
    v1::GenerateResponse last;
    while (reader->Read(&resp)) {
      ids.insert(ids.end(), resp.token_ids().begin(), resp.token_ids().end());
      text += resp.text();
      last = resp;
    }
    ASSERT_TRUE(reader->Finish().ok());
    std::vector<int32_t> want((*reference_)[i].begin(), (*reference_)[i].begin() + kMaxTokens);
    EXPECT_EQ(ids, want);
    EXPECT_EQ(text, ReferenceText(i, kMaxTokens));
    EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(last.usage().completion_tokens(), static_cast<uint32_t>(kMaxTokens));
  }
  {  // Errors map to gRPC codes.
    grpc::ClientContext ctx;
    v1::GenerateRequest req;
    req.set_model("nope");
    req.set_prompt("a");
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext ctx;
    v1::GenerateRequest req;
    req.set_prompt("a");
    req.mutable_sampling()->set_temperature(5);
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  grpc::ClientContext ctx;
  v1::ListModelsResponse models;
  ASSERT_TRUE(stub->ListModels(&ctx, v1::ListModelsRequest(), &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(models.models(0).id(), gateway_->card().id);
}

TEST_F(GatewayClusterTest, ApiKeysAndReadiness) {
  GatewayOptions go;
  go.model_dir = *model_dir_;
  go.attention = {cluster_->attention().grpc_address};
  go.http_host = "127.0.0.1";
  go.api_keys = {"k-one", "k-two"};
  auto guarded = GatewayServer::Create(go);
  ASSERT_TRUE(guarded.ok()) << guarded.status();
  ASSERT_TRUE((*guarded)->pool().WaitReady(std::chrono::seconds(30)));
  const std::string body = json::serialize(Completion(0, 2));
  const int p = (*guarded)->http_port();
  auto none = HttpRequest(p, "POST", "/v1/completions", body);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->status, 401);
  EXPECT_EQ(json::parse(none->body).at("error").at("code").as_string(), "invalid_api_key");
  auto bad = HttpRequest(p, "POST", "/v1/completions", body, {{"Authorization", "Bearer no"}});
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ(bad->status, 401);
  auto good = HttpRequest(p, "POST", "/v1/completions", body, {{"Authorization", "Bearer k-two"}});
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(good->status, 200) << good->body;

  // A gateway whose attention replica does not answer: /health is 503 with an OpenAI error,
  // and generation requests get 503 too.
  absl::StatusOr<int> dead = PickFreePort();
  ASSERT_TRUE(dead.ok());
  go.api_keys.clear();
  go.attention = {LoopbackAddress(*dead)};
  auto lonely = GatewayServer::Create(go);
  ASSERT_TRUE(lonely.ok()) << lonely.status();
  auto health = HttpRequest((*lonely)->http_port(), "GET", "/health");
  ASSERT_TRUE(health.ok());
  EXPECT_EQ(health->status, 503);
  EXPECT_EQ(json::parse(health->body).at("error").at("type").as_string(), "server_error");
  auto gen = HttpRequest((*lonely)->http_port(), "POST", "/v1/completions", body);
  ASSERT_TRUE(gen.ok());
  EXPECT_EQ(gen->status, 503) << gen->body;
}

TEST_F(GatewayClusterTest, OfficialOpenAiClient) {
  // tools/test.sh installs tools/requirements-test.txt into .venv-test and exports its path.
  const std::string python = testing::TestPython();
  ASSERT_TRUE(std::filesystem::exists(python))
      << python << " is missing: create it with tools/requirements-test.txt (tools/test.sh)";
  json::array cases;
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    cases.push_back(json::object{{"kind", "completion"},
                                 {"prompt", kPrompts[i]},
                                 {"max_tokens", kMaxTokens},
                                 {"want", ReferenceText(i, kMaxTokens)}});
  }
  json::array messages{json::object{{"role", "user"}, {"content", "Tell me a story."}}};
  auto tmpl = ChatTemplate::FromTokenizerConfig(*model_dir_ + "/tokenizer_config.json");
  ASSERT_TRUE(tmpl.ok());
  auto ids = tokenizer_->Encode(*tmpl->Apply(messages, true), false);
  ASSERT_TRUE(ids.ok());
  auto ref = expertmesh::testing::ReferenceGreedy(*model_dir_, {*ids}, kMaxTokens);
  ASSERT_TRUE(ref.ok()) << ref.status();
  cases.push_back(json::object{{"kind", "chat"},
                               {"messages", messages},
                               {"max_tokens", kMaxTokens},
                               {"want", tokenizer_->Decode((*ref)[0], true)}});
  const std::string expected = *model_dir_ + "/openai_expected.json";
  std::ofstream(expected) << json::serialize(
      json::object{{"model", gateway_->card().id}, {"cases", cases}});
  const std::string command =
      Cat(python, " ", EXPERTMESH_SOURCE_DIR, "/tests/gateway/openai_client_test.py",
          " --base-url http://127.0.0.1:", port(), "/v1 --expected ", expected);
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
}

TEST_F(GatewayClusterTest, GatewayProcessDrainsOnSigterm) {
  auto bin = launcher::FindServiceBinary(EXPERTMESH_BINARY_DIR, "gateway", "gateway");
  ASSERT_TRUE(bin.ok()) << bin.status();
  absl::StatusOr<int> http = PickFreePort();
  absl::StatusOr<int> grpc = PickFreePort();
  ASSERT_TRUE(http.ok() && grpc.ok());
  launcher::ProcessSpec spec;
  spec.name = "gateway";
  spec.binary = *bin;
  spec.args = {"--model",         *model_dir_,
               "--attention",     cluster_->attention().grpc_address,
               "--listen",        LoopbackAddress(*grpc),
               "--http-host",     "127.0.0.1",
               "--http-port",     std::to_string(*http),
               "--drain-grace-s", "60"};
  spec.log_path = *model_dir_ + "/gateway-drain.log";
  auto process = launcher::ChildProcess::Start(spec);
  ASSERT_TRUE(process.ok()) << process.status();
  ASSERT_TRUE(launcher::WaitServing(LoopbackAddress(*grpc), absl::Seconds(60), process->get()).ok())
      << launcher::TailOfFile(spec.log_path);

  // A long stream is in flight when SIGTERM arrives; it must still finish whole.
  constexpr int kTokens = 200;
  absl::StatusOr<HttpResult> result;
  std::thread client([&] {
    json::object body = Completion(2, kTokens);
    body["stream"] = true;
    body["stream_options"] = json::object{{"include_usage", true}};
    result = HttpRequest(*http, "POST", "/v1/completions", json::serialize(body));
  });
  const bool running = expertmesh::testing::PollUntil(
      [&] {
        auto m = HttpRequest(*http, "GET", "/metrics");
        return m.ok() && MetricValue(m->body, "expertmesh_gateway_requests_running") == 1;
      },
      absl::Seconds(30), absl::Milliseconds(1));
  EXPECT_TRUE(running) << "the request was never seen running";
  (*process)->Signal(SIGTERM);
  client.join();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->status, 200) << result->body;
  std::vector<std::string> events = SseData(result->body);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events.back(), "[DONE]");
  json::value usage = json::parse(events[events.size() - 2]).at("usage");
  EXPECT_EQ(usage.at("completion_tokens").as_int64(), kTokens);
  ASSERT_TRUE((*process)->WaitFor(absl::Seconds(60)));
  EXPECT_EQ((*process)->ExitDescription(), "exited with 0") << launcher::TailOfFile(spec.log_path);
  EXPECT_FALSE(HttpRequest(*http, "GET", "/health").ok());  // no longer accepting
}

TEST_F(GatewayClusterTest, SpreadsSequencesOverAttentionReplicasByLoad) {
  // A second attention replica beside the launcher's, on the same router.
  auto bin =
      launcher::FindServiceBinary(EXPERTMESH_BINARY_DIR, "attention-service", "attention-service");
  ASSERT_TRUE(bin.ok()) << bin.status();
  absl::StatusOr<int> grpc = PickFreePort();
  absl::StatusOr<int> metrics = PickFreePort();
  ASSERT_TRUE(grpc.ok() && metrics.ok());
  launcher::ProcessSpec spec;
  spec.name = "attention-service[2]";
  spec.binary = *bin;
  spec.args = {"--model",        *model_dir_,
               "--router",       cluster_->router().grpc_address,
               "--listen",       LoopbackAddress(*grpc),
               "--metrics-port", std::to_string(*metrics)};
  spec.log_path = *model_dir_ + "/attention-2.log";
  auto second = launcher::ChildProcess::Start(spec);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE(launcher::WaitServing(LoopbackAddress(*grpc), absl::Seconds(60), second->get()).ok())
      << launcher::TailOfFile(spec.log_path);

  GatewayOptions go;
  go.model_dir = *model_dir_;
  go.attention = {cluster_->attention().grpc_address, LoopbackAddress(*grpc)};
  go.http_host = "127.0.0.1";
  auto gateway = GatewayServer::Create(go);
  ASSERT_TRUE(gateway.ok()) << gateway.status();
  for (int i = 0; i < 200 && (*gateway)->pool().Snapshot()[1].ready == false; ++i) {
    (*gateway)->pool().PollOnce();
  }
  ASSERT_TRUE((*gateway)->pool().Snapshot()[0].ready && (*gateway)->pool().Snapshot()[1].ready);

  const std::string series = "expertmesh_attention_prompt_tokens_total";
  auto prompt_tokens = [&](int metrics_port) {
    auto text = HttpGet("127.0.0.1", metrics_port, "/metrics");
    return text.ok() ? std::max(0.0, MetricValue(*text, series)) : -1.0;
  };
  const double before_a = prompt_tokens(cluster_->attention().metrics_port);
  const double before_b = prompt_tokens(*metrics);
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&, t] {
      auto r = HttpRequest((*gateway)->http_port(), "POST", "/v1/completions",
                           json::serialize(Completion(t % kPrompts.size(), 24)));
      if (r.ok() && r->status == 200) ++ok;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(ok.load(), 16);
  // Concurrent sequences go to the replica with fewer open streams: both got work.
  EXPECT_GT(prompt_tokens(cluster_->attention().metrics_port), before_a);
  EXPECT_GT(prompt_tokens(*metrics), before_b);
  (*gateway)->Drain(std::chrono::seconds(5));
  EXPECT_TRUE((*second)->Stop(absl::Seconds(10)).ok());
}

// Kills the cluster's only expert shard mid-stream (and restarts it): a cluster and gateway
// of its own, so that the shared one above stays whole whatever the test order.
class GatewayFailureTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::string> dir = testing::MakeGatewayTestModel();
    ASSERT_TRUE(dir.ok()) << dir.status();
    model_dir_ = *dir;
    absl::StatusOr<ClusterAndGateway> running = StartClusterAndGateway(model_dir_);
    ASSERT_TRUE(running.ok()) << running.status();
    running_ = *std::move(running);
  }
  void TearDown() override {
    running_.gateway.reset();  // before the cluster it talks to
    running_.cluster.reset();
    if (!model_dir_.empty()) std::filesystem::remove_all(model_dir_);
  }
  int port() const { return running_.gateway->http_port(); }

  std::string model_dir_;
  ClusterAndGateway running_;
};

TEST_F(GatewayFailureTest, FailureMidStreamIsAnErrorEvent) {
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket socket(io);
  socket.connect({boost::asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(port())});
  json::object body = CompletionBody(*running_.gateway, 0, 64);
  body["stream"] = true;
  const std::string payload = json::serialize(body);
  boost::asio::write(socket, boost::asio::buffer(
                                 Cat("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ",
                                     payload.size(), "\r\nConnection: close\r\n\r\n", payload)));
  std::string got;
  char buf[4096];
  boost::system::error_code ec;
  while (got.find("data: ") == std::string::npos && !ec) {
    got.append(buf, socket.read_some(boost::asio::buffer(buf), ec));
  }
  ASSERT_FALSE(ec) << ec.message();
  ASSERT_TRUE(running_.cluster->KillExpert(0, 0, SIGKILL).ok());
  while (!ec) got.append(buf, socket.read_some(boost::asio::buffer(buf), ec));
  EXPECT_EQ(got.substr(0, 15), "HTTP/1.1 200 OK");
  const size_t error_at = got.find("data: {\"error\":");
  ASSERT_NE(error_at, std::string::npos) << got;
  EXPECT_NE(got.find("data: [DONE]", error_at), std::string::npos);
  EXPECT_EQ(got.find("\"finish_reason\":\"length\""), std::string::npos);
  ASSERT_TRUE(running_.cluster->RestartExpert(0, 0).ok());
  auto health = HttpRequest(port(), "GET", "/health");
  ASSERT_TRUE(health.ok());
  EXPECT_EQ(health->status, 200);
}

}  // namespace
}  // namespace expertmesh::gateway
