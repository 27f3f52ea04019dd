// The router's operator page in headless Chromium, against a real cluster on loopback (the
// launcher's router-service with --metrics-port, 2 shard groups x 2 replicas of the bundled
// model, the attention service), as an operator opens it:
//  - after a few greedy requests, once the router has their load reports: the rendered
//    heatmap has a cell per (MoE layer, expert) whose numbers are the router's GetStatus load,
//    the shard-group rows show what `expertmesh status` prints (routed tokens, healthy
//    replicas), tokens/s is positive; a screenshot is saved (its path is printed);
//  - with both replicas of shard group 1 stopped (one SIGTERM, one SIGKILL: deregistered and
//    expired), the page warns that group 1 has no healthy replica, and only group 1.
// Skipped, saying so, when no chromium is installed ($EXPERTMESH_CHROMIUM names another).
#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/format/config.h"
#include "expertmesh/v1/attention.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "gtest/gtest.h"
#include "service-common/grpc_util.h"
#include "tests/cluster/cluster_test_util.h"
#include "tests/common/poll.h"
#include "tools/launcher/cluster.h"
#include "tools/launcher/process.h"

namespace expertmesh {
namespace {

namespace fs = std::filesystem;
using launcher::Cluster;

// The chromium binary: $EXPERTMESH_CHROMIUM, else the first of the usual names on PATH.
std::string FindChromium() {
  if (const char* env = std::getenv("EXPERTMESH_CHROMIUM"); env && *env) return env;
  const char* path = std::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path ? path : "", ':')) {
    for (const char* name : {"chromium", "chromium-browser", "google-chrome"}) {
      const fs::path p = fs::path(std::string(dir)) / name;
      if (::access(p.c_str(), X_OK) == 0) return p.string();
    }
  }
  return "";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// One attribute of an element's start tag ("" when absent).
std::string Attr(const std::string& tag, const std::string& name) {
  const std::regex re(" " + name + "=\"([^\"]*)\"");
  std::smatch m;
  return std::regex_search(tag, m, re) ? m[1].str() : "";
}

// Every start tag `<tag ...>` in `html` that has attribute `marker`.
std::vector<std::string> Tags(const std::string& html, const std::string& tag,
                              const std::string& marker) {
  std::vector<std::string> out;
  const std::regex re("<" + tag + " [^>]*>");
  for (auto it = std::sregex_iterator(html.begin(), html.end(), re); it != std::sregex_iterator();
       ++it) {
    if (it->str().find(" " + marker + "=") != std::string::npos) out.push_back(it->str());
  }
  return out;
}

uint64_t U64(const std::string& s) {
  uint64_t v = 0;
  EXPECT_TRUE(absl::SimpleAtoi(s, &v)) << "'" << s << "'";
  return v;
}

class RouterPageTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    chromium_ = new std::string(FindChromium());
    if (chromium_->empty()) return;  // each test skips
    char tmpl[] = "/tmp/expertmesh-router-page-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = new std::string(tmpl);
    launcher::ClusterOptions o;
    o.model_dir = std::string(EXPERTMESH_SOURCE_DIR) + "/models/expertmesh-tiny";
    o.shards = 2;
    o.replicas = 2;
    o.bin_dir = EXPERTMESH_BINARY_DIR;
    o.log_dir = *dir_ + "/logs";
    o.max_batch = 16;
    o.max_waiting = 16;
    o.prefill_chunk = 32;
    o.step_deadline_ms = 5000;
    absl::StatusOr<std::unique_ptr<Cluster>> c = Cluster::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = c->release();
  }
  static void TearDownTestSuite() {
    if (cluster_) {
      EXPECT_TRUE(cluster_->UnexpectedExits().empty());
      EXPECT_TRUE(cluster_->Stop().ok());
      delete cluster_;
      cluster_ = nullptr;
    }
    // Kept (logs, rendered pages, chromium's output) when a test failed.
    if (dir_ && !::testing::UnitTest::GetInstance()->Failed()) fs::remove_all(*dir_);
    delete dir_;
    dir_ = nullptr;
    delete chromium_;
  }
  void SetUp() override {
    if (chromium_->empty()) {
      GTEST_SKIP() << "no chromium on PATH (and $EXPERTMESH_CHROMIUM unset): install Debian's "
                      "chromium package (tools/install-deps.sh) to test the router's page";
    }
    ASSERT_NE(cluster_, nullptr);
  }

  static std::string PageUrl() {
    return "http://127.0.0.1:" + std::to_string(cluster_->router().metrics_port) + "/";
  }

  // Loads the page in headless Chromium (5 s of virtual time: the first /api/cluster answer
  // and a refresh or two) and returns the rendered DOM; with `screenshot`, saves one there.
  static std::string RenderPage(const std::string& name, const std::string& screenshot = "") {
    const std::string out = *dir_ + "/" + name + ".html";
    std::vector<std::string> args = {"--headless",
                                     "--no-sandbox",
                                     "--disable-gpu",
                                     "--no-first-run",
                                     "--user-data-dir=" + *dir_ + "/chromium-" + name,
                                     "--virtual-time-budget=5000",
                                     "--window-size=1280,900"};
    args.push_back(screenshot.empty() ? "--dump-dom" : "--screenshot=" + screenshot);
    std::string cmd = "exec '" + *chromium_ + "'";
    for (const std::string& a : args) cmd += " '" + a + "'";
    cmd += " '" + PageUrl() + "' > '" + out + "'";
    absl::StatusOr<std::unique_ptr<launcher::ChildProcess>> p = launcher::ChildProcess::Start(
        {"chromium", "/bin/sh", {"-c", cmd}, *dir_ + "/chromium-" + name + ".log"});
    EXPECT_TRUE(p.ok()) << p.status();
    if (!p.ok()) return "";
    const bool exited = (*p)->WaitFor(absl::Seconds(60));
    EXPECT_TRUE(exited) << "chromium did not finish within 60 s";
    if (!exited) (void)(*p)->Stop(absl::Seconds(1));
    EXPECT_EQ((*p)->ExitDescription(), "exited with 0")
        << ReadFile(*dir_ + "/chromium-" + name + ".log");
    return ReadFile(out);
  }

  static absl::StatusOr<v1::StatusResponse> Status() {
    auto stub = v1::RouterService::NewStub(MakeChannel(cluster_->router().grpc_address));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::StatusResponse resp;
    const grpc::Status s = stub->GetStatus(&ctx, v1::StatusRequest{}, &resp);
    if (!s.ok()) return FromGrpcStatus(s);
    return resp;
  }
  static std::map<std::pair<int, int>, uint64_t> LoadOf(const v1::StatusResponse& st) {
    std::map<std::pair<int, int>, uint64_t> out;
    for (const v1::LayerExpertLoad& l : st.expert_load()) out[{l.layer(), l.expert()}] = l.tokens();
    return out;
  }

  // `expertmesh status --router ...`: its stdout.
  static std::string CliStatus() {
    const std::string out = *dir_ + "/status.txt";
    const std::string cmd = "'" + std::string(EXPERTMESH_BINARY_DIR) +
                            "/tools/cli/expertmesh' status --router " +
                            cluster_->router().grpc_address + " > '" + out + "' 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << ReadFile(out);
    return ReadFile(out);
  }

  static std::string* chromium_;
  static std::string* dir_;
  static Cluster* cluster_;
};

std::string* RouterPageTest::chromium_ = nullptr;
std::string* RouterPageTest::dir_ = nullptr;
Cluster* RouterPageTest::cluster_ = nullptr;

TEST_F(RouterPageTest, HeatmapShowsTheRoutersLoad) {
  // Load: 6 greedy requests at once, each to its end.
  absl::StatusOr<ModelConfig> config =
      LoadModelConfig(cluster_->options().model_dir + "/config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  const std::vector<std::vector<int32_t>> prompts =
      testing::MakePrompts(6, 24, static_cast<int>(config->vocab_size), 5);
  auto stub = v1::AttentionService::NewStub(MakeChannel(cluster_->attention().grpc_address));
  std::vector<testing::SubmitResult> results(prompts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] {
      results[i] = testing::SubmitAndCollect(
          *stub, testing::GreedyRequest("page" + std::to_string(i), prompts[i], 12));
    });
  }
  for (std::thread& t : threads) t.join();
  for (const testing::SubmitResult& r : results) {
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens.size(), 12u);
  }
  // The dispatcher reports load every 5 s: wait for a report.
  ASSERT_TRUE(expertmesh::testing::PollUntil(
      [] {
        absl::StatusOr<v1::StatusResponse> st = Status();
        return st.ok() && st->expert_load_size() > 0;
      },
      absl::Seconds(20), absl::Milliseconds(200)))
      << "no load report reached the router within 20 s";

  // Read GetStatus before and after rendering: when both agree, that is what the page shows
  // (a report or a new map may land in between: then again).
  std::string dom;
  v1::StatusResponse st;
  for (int attempt = 0;; ++attempt) {
    ASSERT_LT(attempt, 4) << "the load kept changing while the page rendered";
    absl::StatusOr<v1::StatusResponse> before = Status();
    ASSERT_TRUE(before.ok()) << before.status();
    dom = RenderPage("load");
    absl::StatusOr<v1::StatusResponse> after = Status();
    ASSERT_TRUE(after.ok()) << after.status();
    if (LoadOf(*before) == LoadOf(*after) &&
        before->placement().version() == after->placement().version()) {
      st = *after;
      break;
    }
  }
  ASSERT_NE(dom.find("data-rendered="), std::string::npos) << "the page never rendered:\n" << dom;

  // The heatmap: one cell per (MoE layer, expert) of the map; data-total is GetStatus's load,
  // data-groups every shard group holding the expert (several: redundant copies).
  const v1::PlacementMap& map = st.placement();
  std::map<std::pair<int, int>, std::vector<int>> holders;
  for (const v1::ShardGroup& g : map.shards()) {
    for (const v1::LayerExpert& le : g.experts()) {
      holders[{le.layer(), le.expert()}].push_back(g.shard_id());
    }
  }
  const std::map<std::pair<int, int>, uint64_t> load = LoadOf(st);
  const std::vector<std::string> cells = Tags(dom, "rect", "data-expert");
  ASSERT_EQ(cells.size(), holders.size()) << dom;
  std::map<int, double> group_tokens;  // a copied expert's tokens split evenly over its copies
  uint64_t window_sum = 0;
  bool copies = false;
  for (const std::string& cell : cells) {
    const int layer = static_cast<int>(U64(Attr(cell, "data-layer")));
    const int expert = static_cast<int>(U64(Attr(cell, "data-expert")));
    ASSERT_TRUE(holders.count({layer, expert})) << cell;
    const std::vector<int>& groups = holders[{layer, expert}];
    const auto it = load.find({layer, expert});
    const uint64_t want = it == load.end() ? 0 : it->second;
    EXPECT_EQ(U64(Attr(cell, "data-total")), want) << cell;
    const uint64_t window = U64(Attr(cell, "data-window"));
    EXPECT_LE(window, want) << cell;
    window_sum += window;
    EXPECT_EQ(Attr(cell, "data-groups"), absl::StrJoin(groups, ",")) << cell;
    EXPECT_EQ(Attr(cell, "class"), groups.size() > 1 ? "cell copy" : "cell") << cell;
    copies |= groups.size() > 1;
    for (int g : groups) group_tokens[g] += static_cast<double>(want) / groups.size();
  }
  EXPECT_GT(window_sum, 0u) << "the page's window shows no load";

  // The shard-group rows against `expertmesh status` (whose routed tokens per group count a
  // copied expert once, so they are compared only without copies).
  const std::string cli = CliStatus();
  const std::vector<std::string> rows = Tags(dom, "tr", "data-healthy");
  ASSERT_EQ(rows.size(), 2u) << dom;
  for (const std::string& row : rows) {
    const int shard = static_cast<int>(U64(Attr(row, "data-shard")));
    const std::string line = "shard " + std::to_string(shard) + ": ";
    const size_t at = cli.find(line);
    ASSERT_NE(at, std::string::npos) << cli;
    const std::string status_line = cli.substr(at, cli.find('\n', at) - at);
    EXPECT_NE(status_line.find(Attr(row, "data-healthy") + "/" + Attr(row, "data-replicas") +
                               " replica(s) healthy"),
              std::string::npos)
        << status_line << "\n"
        << row;
    EXPECT_EQ(Attr(row, "data-healthy"), "2") << row;
    if (!copies) {
      EXPECT_NE(status_line.find(", " + Attr(row, "data-total-tokens") + " routed tokens"),
                std::string::npos)
          << status_line << "\n"
          << row;
    }
    double shown = -1;
    EXPECT_TRUE(absl::SimpleAtod(Attr(row, "data-total-tokens"), &shown)) << row;
    EXPECT_NEAR(shown, group_tokens[shard], 1e-6 * (1 + group_tokens[shard])) << row;
  }
  EXPECT_EQ(dom.find("class=\"warning\""), std::string::npos) << "a warning with every group up";
  const std::string version = "data-version=\"" + std::to_string(map.version()) + "\"";
  EXPECT_NE(dom.find(version), std::string::npos) << version;
  std::map<std::string, double> facts;  // <b id=... data-value=...>: tokens/s, group max/mean
  for (const std::string& b : Tags(dom, "b", "data-value")) {
    EXPECT_TRUE(absl::SimpleAtod(Attr(b, "data-value"), &facts[Attr(b, "id")])) << b;
  }
  EXPECT_GT(facts["tokens-per-s"], 0.0);
  // The groups' load max/mean, from the window tokens the rows show.
  double most = 0, all = 0;
  for (const std::string& row : rows) {
    double tokens = 0;
    EXPECT_TRUE(absl::SimpleAtod(Attr(row, "data-window-tokens"), &tokens)) << row;
    most = std::max(most, tokens);
    all += tokens;
  }
  ASSERT_GT(all, 0.0);
  EXPECT_NEAR(facts["group-imbalance"], most / (all / rows.size()), 1e-3);
  EXPECT_GE(facts["group-imbalance"], 1.0);

  const std::string shot = std::string(EXPERTMESH_BINARY_DIR) + "/tests/router/router-page.png";
  RenderPage("screenshot", shot);
  ASSERT_TRUE(fs::exists(shot) && fs::file_size(shot) > 10000) << shot;
  std::printf("router page screenshot: %s\n", shot.c_str());
}

TEST_F(RouterPageTest, WarnsWhenAShardGroupHasNoHealthyReplica) {
  ASSERT_TRUE(cluster_->KillExpert(1, 0, SIGTERM).ok());  // drains and deregisters
  ASSERT_TRUE(cluster_->KillExpert(1, 1, SIGKILL).ok());  // expires after --expiry-ms
  ASSERT_TRUE(expertmesh::testing::PollUntil(
      [] {
        absl::StatusOr<v1::StatusResponse> st = Status();
        if (!st.ok() || st->placement().shards_size() != 2) return false;
        for (const v1::ShardReplica& r : st->placement().shards(1).replicas()) {
          if (r.healthy()) return false;
        }
        return true;
      },
      absl::Seconds(20), absl::Milliseconds(100)))
      << "shard group 1 still has a healthy replica";
  const std::string dom = RenderPage("down");
  const std::vector<std::string> warnings = Tags(dom, "p", "data-shard");
  ASSERT_EQ(warnings.size(), 1u) << dom;
  EXPECT_EQ(Attr(warnings[0], "data-shard"), "1");
  EXPECT_EQ(Attr(warnings[0], "class"), "warning");
  EXPECT_NE(dom.find("Shard group 1 has no healthy replica"), std::string::npos);
  for (const std::string& row : Tags(dom, "tr", "data-healthy")) {
    const std::string shard = Attr(row, "data-shard");
    EXPECT_EQ(Attr(row, "data-healthy"), shard == "1" ? "0" : "2") << row;
    EXPECT_EQ(Attr(row, "class") == "down", shard == "1") << row;
  }
  EXPECT_NE(CliStatus().find("NO LIVE REPLICA"), std::string::npos);
  const std::string shot =
      std::string(EXPERTMESH_BINARY_DIR) + "/tests/router/router-page-down.png";
  RenderPage("down-screenshot", shot);
  ASSERT_TRUE(fs::exists(shot) && fs::file_size(shot) > 10000) << shot;
  std::printf("router page screenshot (group 1 down): %s\n", shot.c_str());
}

}  // namespace
}  // namespace expertmesh
