// The router's operator page without a browser: the load window's buckets and expiry, the
// /api/cluster JSON (redundant copies listed under every group that holds them, a group's
// share of a copied expert, tokens/s, replica health), the extra GET routes of the /metrics
// HTTP server (404 and 405 as before, /metrics unchanged), and the embedded page files
// served from a real RouterServiceImpl.
#include <string>

#include <boost/asio.hpp>
#include <boost/json.hpp>

#include "gtest/gtest.h"
#include "router/cluster_view.h"
#include "router/load_window.h"
#include "router/router_service.h"
#include "service-common/metrics_http.h"

namespace expertmesh {
namespace {

namespace json = boost::json;

v1::LoadReport Report(std::initializer_list<std::tuple<int, int, uint64_t>> loads) {
  v1::LoadReport r;
  for (const auto& [layer, expert, tokens] : loads) {
    v1::LayerExpertLoad* l = r.add_loads();
    l->set_layer(layer);
    l->set_expert(expert);
    l->set_tokens(tokens);
  }
  return r;
}

TEST(LoadWindowTest, SumsTheLastBucketsAndForgetsOlderOnes) {
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  LoadWindow w(/*n_layers=*/3, /*n_routed_experts=*/4, t0,
               {.bucket = absl::Seconds(5), .buckets = 4});  // 20 s
  EXPECT_EQ(w.length(), absl::Seconds(20));
  w.Add(Report({{1, 2, 10}, {2, 3, 5}}), t0 + absl::Seconds(1));
  w.Add(Report({{1, 2, 7}}), t0 + absl::Seconds(4));  // same bucket
  w.Add(Report({{1, 2, 100}, {3, 0, 9}, {-1, 0, 9}, {1, 4, 9}}), t0 + absl::Seconds(12));
  LoadWindow::Sums s = w.Sum(t0 + absl::Seconds(13));
  ASSERT_EQ(s.tokens.size(), 12u);
  EXPECT_EQ(s.tokens[1 * 4 + 2], 117u);
  EXPECT_EQ(s.tokens[2 * 4 + 3], 5u);
  uint64_t all = 0;
  for (uint64_t t : s.tokens) all += t;
  EXPECT_EQ(all, 122u);                  // the out-of-range pairs were dropped
  EXPECT_EQ(s.span, absl::Seconds(13));  // younger than the window: its age
  EXPECT_EQ(s.length, absl::Seconds(20));

  // At 22 s the window holds buckets [5, 10), [10, 15), [15, 20), [20, 25): the first is gone.
  s = w.Sum(t0 + absl::Seconds(22));
  EXPECT_EQ(s.tokens[1 * 4 + 2], 100u);
  EXPECT_EQ(s.tokens[2 * 4 + 3], 0u);
  EXPECT_EQ(s.span, absl::Seconds(17));  // from the start of the oldest bucket kept
  // A report at 23 s lands in bucket [20, 25), whose ring slot bucket [0, 5) had: its old
  // counts must not come back.
  w.Add(Report({{2, 1, 3}}), t0 + absl::Seconds(23));
  s = w.Sum(t0 + absl::Seconds(23));
  EXPECT_EQ(s.tokens[2 * 4 + 1], 3u);
  EXPECT_EQ(s.tokens[1 * 4 + 2], 100u);
  EXPECT_EQ(s.tokens[2 * 4 + 3], 0u);
  // Long idle: nothing left; the span is the window's length less the unfinished bucket.
  s = w.Sum(t0 + absl::Seconds(500));
  all = 0;
  for (uint64_t t : s.tokens) all += t;
  EXPECT_EQ(all, 0u);
  EXPECT_EQ(s.span, absl::Seconds(15));
}

// Two groups over 2 MoE layers (1 and 2) of 4 experts; expert (1, 3) has copies in both.
v1::StatusResponse TwoGroupStatus() {
  v1::StatusResponse st;
  st.set_model_name("tiny");
  v1::PlacementMap* map = st.mutable_placement();
  map->set_version(7);
  map->set_n_layers(3);
  map->set_n_routed_experts(4);
  const std::vector<std::vector<std::pair<int, int>>> experts = {
      {{1, 0}, {1, 1}, {1, 3}, {2, 0}, {2, 1}}, {{1, 2}, {1, 3}, {2, 2}, {2, 3}}};
  for (int g = 0; g < 2; ++g) {
    v1::ShardGroup* group = map->add_shards();
    group->set_shard_id(g);
    for (const auto& [layer, expert] : experts[g]) {
      v1::LayerExpert* le = group->add_experts();
      le->set_layer(layer);
      le->set_expert(expert);
    }
  }
  v1::ShardReplica* r = map->mutable_shards(0)->add_replicas();
  r->set_replica_id("shard0@a:1");
  r->set_address("a:1");
  r->set_data_address("a:2");
  r->set_healthy(true);
  r->set_capacity(64);
  r->set_outstanding_rows(3);
  r->set_last_heartbeat_ms_ago(120);
  r = map->mutable_shards(1)->add_replicas();
  r->set_replica_id("shard1@b:1");
  r->set_address("b:1");
  r->set_healthy(false);
  for (const auto& [layer, expert, tokens] :
       std::vector<std::tuple<int, int, uint64_t>>{{1, 0, 40}, {1, 3, 60}, {2, 2, 20}, {2, 3, 4}}) {
    v1::LayerExpertLoad* l = st.add_expert_load();
    l->set_layer(layer);
    l->set_expert(expert);
    l->set_tokens(tokens);
  }
  return st;
}

TEST(ClusterJsonTest, DescribesGroupsCopiesLoadAndRate) {
  const v1::StatusResponse st = TwoGroupStatus();
  LoadWindow::Sums window;
  window.tokens.assign(12, 0);
  window.tokens[1 * 4 + 0] = 20;
  window.tokens[1 * 4 + 3] = 60;
  window.tokens[2 * 4 + 2] = 8;
  window.length = absl::Seconds(60);
  window.span = absl::Seconds(10);
  const json::value v =
      json::parse(ClusterJson(st, window, {.experts_per_token = 2, .num_hidden_layers = 2}));
  const json::object& o = v.as_object();
  EXPECT_EQ(o.at("model").as_string(), "tiny");
  EXPECT_EQ(o.at("placement_version").to_number<int64_t>(), 7);
  EXPECT_EQ(o.at("n_routed_experts").to_number<int64_t>(), 4);
  EXPECT_EQ(o.at("num_hidden_layers").to_number<int64_t>(), 2);
  EXPECT_EQ(o.at("load_window_s").to_number<double>(), 60.0);
  EXPECT_EQ(o.at("load_span_s").to_number<double>(), 10.0);
  EXPECT_EQ(o.at("window_expert_tokens").to_number<int64_t>(), 88);
  EXPECT_EQ(o.at("total_expert_tokens").to_number<int64_t>(), 124);
  // Busiest layer in the window: layer 1 with 80 assignments / 2 per token / 10 s.
  EXPECT_DOUBLE_EQ(o.at("tokens_per_s").to_number<double>(), 4.0);

  const json::array& layers = o.at("layers").as_array();
  ASSERT_EQ(layers.size(), 2u);  // the layers with experts in the map: 1 and 2
  const json::object& l1 = layers[0].as_object();
  EXPECT_EQ(l1.at("layer").to_number<int64_t>(), 1);
  EXPECT_EQ(json::serialize(l1.at("window")), "[20,0,0,60]");
  EXPECT_EQ(json::serialize(l1.at("total")), "[40,0,0,60]");
  EXPECT_EQ(json::serialize(l1.at("groups")), "[[0],[0],[1],[0,1]]");  // (1, 3): two copies
  EXPECT_EQ(json::serialize(layers[1].as_object().at("groups")), "[[0],[0],[1],[1]]");

  const json::array& groups = o.at("shard_groups").as_array();
  ASSERT_EQ(groups.size(), 2u);
  const json::object& g0 = groups[0].as_object();
  EXPECT_EQ(g0.at("n_experts").to_number<int64_t>(), 5);
  EXPECT_EQ(json::serialize(g0.at("experts")), R"({"1":[0,1,3],"2":[0,1]})");
  EXPECT_EQ(g0.at("healthy_replicas").to_number<int64_t>(), 1);
  // Half of the copied expert's 60 tokens count for each group.
  EXPECT_EQ(g0.at("window_tokens").to_number<double>(), 20.0 + 30.0);
  EXPECT_EQ(g0.at("total_tokens").to_number<double>(), 40.0 + 30.0);
  const json::object& r0 = g0.at("replicas").as_array()[0].as_object();
  EXPECT_EQ(r0.at("id").as_string(), "shard0@a:1");
  EXPECT_EQ(r0.at("address").as_string(), "a:1");
  EXPECT_EQ(r0.at("data_address").as_string(), "a:2");
  // A replica without a data plane: an empty data_address.
  EXPECT_EQ(groups[1].as_object().at("replicas").as_array()[0].as_object().at("data_address"), "");
  EXPECT_EQ(r0.at("healthy").as_bool(), true);
  EXPECT_EQ(r0.at("capacity").to_number<int64_t>(), 64);
  EXPECT_EQ(r0.at("outstanding_rows").to_number<int64_t>(), 3);
  EXPECT_EQ(r0.at("last_heartbeat_ms_ago").to_number<int64_t>(), 120);
  const json::object& g1 = groups[1].as_object();
  EXPECT_EQ(g1.at("healthy_replicas").to_number<int64_t>(), 0);
  EXPECT_EQ(g1.at("window_tokens").to_number<double>(), 30.0 + 8.0);
  EXPECT_EQ(g1.at("total_tokens").to_number<double>(), 30.0 + 20.0 + 4.0);

  // Unknown experts per token: no rate. Nothing reported: zeros, not a crash.
  const json::value none = json::parse(ClusterJson(st, LoadWindow::Sums{}, {}));
  EXPECT_TRUE(none.as_object().at("tokens_per_s").is_null());
  EXPECT_EQ(none.as_object().at("window_expert_tokens").to_number<int64_t>(), 0);
}

// One raw HTTP/1.1 request; returns the whole response text.
std::string RawRequest(int port, const std::string& request) {
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket socket(io);
  socket.connect({boost::asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)});
  boost::asio::write(socket, boost::asio::buffer(request));
  std::string out;
  boost::system::error_code ec;
  char buf[4096];
  while (size_t n = socket.read_some(boost::asio::buffer(buf), ec)) out.append(buf, n);
  return out;
}

TEST(MetricsHttpRoutesTest, ExtraRoutesBesideMetrics) {
  MetricsRegistry registry;
  registry.GetCounter("em_hits_total", "Hits").Inc(3);
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start(&registry, "127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  int calls = 0;
  (*server)->AddRoute("/hello", [&calls] {
    ++calls;
    return HttpReply{"text/plain", "hello " + std::to_string(calls)};
  });
  absl::StatusOr<std::string> body = HttpGet("127.0.0.1", port, "/hello?x=1");
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_EQ(*body, "hello 1");
  body = HttpGet("127.0.0.1", port, "/metrics");
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_NE(body->find("em_hits_total 3\n"), std::string::npos);
  EXPECT_NE(HttpGet("127.0.0.1", port, "/hello/more").status().message().find("404"),
            std::string::npos);
  EXPECT_NE(HttpGet("127.0.0.1", port, "/").status().message().find("404"), std::string::npos);

  const std::string head =
      RawRequest(port, "HEAD /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(head.rfind("HTTP/1.1 200", 0), 0u) << head;
  EXPECT_NE(head.find("Content-Type: text/plain"), std::string::npos) << head;
  EXPECT_EQ(head.find("hello"), std::string::npos) << head;  // no body for HEAD
  const std::string post = RawRequest(
      port, "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(post.rfind("HTTP/1.1 405", 0), 0u) << post;
  EXPECT_NE(post.find("Allow: GET, HEAD"), std::string::npos) << post;
  EXPECT_EQ(calls, 2);  // GET and HEAD ran it; POST did not

  // A route replaced while serving.
  (*server)->AddRoute("/hello", [] { return HttpReply{"text/plain", "replaced"}; });
  body = HttpGet("127.0.0.1", port, "/hello");
  ASSERT_TRUE(body.ok());
  EXPECT_EQ(*body, "replaced");
}

TEST(WebAssetsTest, ThePageIsSelfContained) {
  std::string html, js;
  for (const WebAsset& a : WebAssets()) {
    if (a.path == "/index.html") html = std::string(a.body);
    if (a.path == "/ui.js") js = std::string(a.body);
  }
  ASSERT_FALSE(html.empty());
  ASSERT_FALSE(js.empty());
  EXPECT_NE(html.find("<script src=\"ui.js\"></script>"), std::string::npos);
  EXPECT_NE(js.find("fetch(\"api/cluster\""), std::string::npos);
  // Nothing loaded from elsewhere: no absolute URLs in src/href, no CSS imports.
  for (const std::string* text : {&html, &js}) {
    for (const char* bad : {"src=\"http", "href=\"http", "src=\"//", "href=\"//", "@import",
                            "url(http", "fetch(\"http"}) {
      EXPECT_EQ(text->find(bad), std::string::npos) << bad;
    }
  }
}

TEST(ClusterPageRoutesTest, ServesThePageAndTheRouterState) {
  Placement placement;
  placement.num_shards = 2;
  placement.n_layers = 2;
  placement.n_routed_experts = 4;
  placement.shard_of = {-1, -1, -1, -1, 0, 0, 1, 1};  // layer 0 dense, layer 1 MoE
  RouterServerOptions options;
  options.identity.set_model_name("tiny");
  RouterServiceImpl router(placement, options);
  MetricsRegistry registry;
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start(&registry, "127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  AddClusterPageRoutes(**server, router, {.experts_per_token = 2, .num_hidden_layers = 2});
  const int port = (*server)->port();

  absl::StatusOr<std::string> root = HttpGet("127.0.0.1", port, "/");
  absl::StatusOr<std::string> index = HttpGet("127.0.0.1", port, "/index.html");
  absl::StatusOr<std::string> js = HttpGet("127.0.0.1", port, "/ui.js");
  ASSERT_TRUE(root.ok() && index.ok() && js.ok());
  EXPECT_EQ(*root, *index);
  EXPECT_NE(root->find("<svg id=\"heatmap\""), std::string::npos);
  EXPECT_NE(RawRequest(port, "GET /ui.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .find("Content-Type: text/javascript"),
            std::string::npos);

  v1::LoadReportResponse ignored;
  const v1::LoadReport report = Report({{1, 0, 30}, {1, 3, 10}});
  ASSERT_TRUE(router.ReportLoad(nullptr, &report, &ignored).ok());
  absl::StatusOr<std::string> api = HttpGet("127.0.0.1", port, "/api/cluster");
  ASSERT_TRUE(api.ok()) << api.status();
  const json::object o = json::parse(*api).as_object();
  EXPECT_EQ(o.at("model").as_string(), "tiny");
  EXPECT_EQ(o.at("shard_groups").as_array().size(), 2u);
  const json::object& l1 = o.at("layers").as_array().at(0).as_object();
  EXPECT_EQ(json::serialize(l1.at("window")), "[30,0,0,10]");
  EXPECT_EQ(json::serialize(l1.at("total")), "[30,0,0,10]");
  EXPECT_GT(o.at("tokens_per_s").to_number<double>(), 0.0);
  // Both groups lack a replica: healthy_replicas 0 is what the page warns about.
  for (const json::value& g : o.at("shard_groups").as_array()) {
    EXPECT_EQ(g.as_object().at("healthy_replicas").to_number<int64_t>(), 0);
  }
}

}  // namespace
}  // namespace expertmesh
