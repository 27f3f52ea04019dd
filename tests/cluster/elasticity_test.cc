// Elasticity under load (issue 13, part 4): router, expert shards, attention replicas and the
// gateway as separate processes on loopback, with kStreams greedy streams running through the
// gateway's gRPC API the whole time while the test
//  (a) scales shard group 0 from 1 to 3 replicas,
//  (b) scales it back to 1 by SIGTERM -- the original replica and one new one, so the survivor
//      is a replica that joined under load,
//  (c) scales the attention replicas 1 -> 2 -> 1 behind the gateway, which finds them through
//      DNS: --attention dns://<loopback DNS server>/attention.elastic.test:<port>, one A record
//      per replica (127.0.0.2, 127.0.0.3, the same port), as a Kubernetes headless Service
//      answers; the scale-in removes the record and sends SIGTERM at once, as Kubernetes does,
//  (d) kills the router (SIGKILL) and starts it again on its port; shards and attention
//      replicas reach it as localhost:<port> (a name, as a Service name in Kubernetes).
// At the end the gateway gets SIGTERM with requests in flight, which must complete too.
// Every request must complete with exactly the in-process engine's tokens (the exact combine:
// the plain engine, whatever the placement) and every drained process must exit 0. Printed:
// requests sent / completed / with wrong tokens / failed, the time a new shard replica takes to its
// first rows and a new attention replica to its first request, drain times, the router outage.
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "expertmesh/v1/gateway.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "gtest/gtest.h"
#include "service-common/grpc_util.h"
#include "service-common/metrics_http.h"
#include "service-common/process.h"
#include "tests/cluster/cluster_test_util.h"
#include "tests/cluster/elasticity_dns.h"
#include "tests/common/metrics_text.h"
#include "tests/common/poll.h"
#include "tests/gateway/gateway_test_util.h"
#include "tools/launcher/cluster.h"
#include "tools/launcher/process.h"

namespace expertmesh {
namespace {

using launcher::ChildProcess;
using testing::PollUntil;

constexpr int kShards = 2;
constexpr int kStreams = 8;
constexpr int kPrompts = 16;
constexpr int kMaxTokens = 12;
constexpr char kName[] = "attention.elastic.test";

double Seconds(absl::Duration d) { return absl::ToDoubleSeconds(d); }

struct Service {
  std::string name;
  std::vector<std::string> args;
  std::string address;  // gRPC host:port
  std::string metrics_host;
  int metrics_port = 0;
  std::unique_ptr<ChildProcess> process;
  absl::Time started;
};

class ElasticityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::string> dir = gateway::testing::MakeGatewayTestModel();
    ASSERT_TRUE(dir.ok()) << dir.status();
    model_dir_ = *dir;
    prompts_ = testing::MakePrompts(kPrompts, 24, 4096, 13);
    absl::StatusOr<std::vector<std::vector<int32_t>>> want =
        testing::ReferenceGreedy(model_dir_, prompts_, kMaxTokens);
    ASSERT_TRUE(want.ok()) << want.status();
    want_ = *std::move(want);
    bin_dir_ = EXPERTMESH_BINARY_DIR;
  }
  void TearDown() override {
    for (Service* s : All()) {
      if (s->process) s->process->Stop(absl::Seconds(5)).IgnoreError();
    }
    stop_watch_ = true;
    for (std::thread& t : watchers_) t.join();
    // The services' logs stay with the model on failure (or with EXPERTMESH_KEEP_TEST_LOGS).
    if (!HasFailure() && std::getenv("EXPERTMESH_KEEP_TEST_LOGS") == nullptr) {
      std::filesystem::remove_all(model_dir_);
    } else {
      std::printf("logs in %s\n", model_dir_.c_str());
    }
  }
  std::vector<Service*> All() {
    std::vector<Service*> out = {&gateway_, &router_};
    for (auto& [k, s] : services_) out.push_back(&s);
    return out;
  }

  absl::Status Launch(Service& s, const std::string& binary, const std::string& subdir) {
    absl::StatusOr<std::string> path = launcher::FindServiceBinary(bin_dir_, binary, subdir);
    if (!path.ok()) return path.status();
    launcher::ProcessSpec spec;
    spec.name = s.name;
    spec.binary = *path;
    spec.args = s.args;
    spec.log_path = absl::StrCat(model_dir_, "/", s.name, ".log");
    s.started = absl::Now();
    absl::StatusOr<std::unique_ptr<ChildProcess>> p = ChildProcess::Start(spec);
    if (!p.ok()) return p.status();
    s.process = *std::move(p);
    absl::Status ready = launcher::WaitServing(s.address, absl::Seconds(60), s.process.get());
    if (!ready.ok()) {
      return absl::Status(ready.code(), absl::StrCat(s.name, ": ", ready.message(), "\n",
                                                     launcher::TailOfFile(spec.log_path)));
    }
    return absl::OkStatus();
  }
  static int Port() {
    absl::StatusOr<int> p = PickFreePort();
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? *p : 0;
  }
  Service& Expert(int shard, int replica) {
    Service& s = services_[absl::StrCat("expert-s", shard, "r", replica)];
    if (s.name.empty()) {
      s.name = absl::StrCat("expert-s", shard, "r", replica);
      const int port = Port();
      s.metrics_port = Port();
      s.metrics_host = "127.0.0.1";
      s.address = absl::StrCat("127.0.0.1:", port);
      s.args = {"--model",        model_dir_,
                "--shard-id",     std::to_string(shard),
                "--num-shards",   std::to_string(kShards),
                "--listen",       s.address,
                "--router",       absl::StrCat("localhost:", router_port_),
                "--metrics-port", std::to_string(s.metrics_port),
                "--instance-id",  s.name};
    }
    return s;
  }
  Service& Attention(int i) {
    Service& s = services_[absl::StrCat("attention-", i)];
    if (s.name.empty()) {
      s.name = absl::StrCat("attention-", i);
      s.metrics_host = absl::StrCat("127.0.0.", i + 2);  // --metrics-host follows --listen
      s.metrics_port = Port();
      s.address = absl::StrCat(s.metrics_host, ":", attention_port_);
      s.args = {"--model",
                model_dir_,
                "--router",
                absl::StrCat("localhost:", router_port_),
                "--listen",
                s.address,
                "--metrics-port",
                std::to_string(s.metrics_port),
                "--kv-blocks",
                "512",
                "--max-batch",
                "32",
                "--prefill-chunk",
                "16",
                "--step-deadline-ms",
                "3000",
                "--attempt-timeout-ms",
                "1000",
                "--drain-grace-s",
                "30",
                "--instance-id",
                s.name};
    }
    return s;
  }
  // SIGTERM, then the time until the process exited; expects exit status 0.
  absl::Duration Drain(Service& s) {
    const absl::Time t0 = absl::Now();
    s.process->Signal(SIGTERM);
    EXPECT_TRUE(s.process->WaitFor(absl::Seconds(40))) << s.name << " did not exit";
    const absl::Duration took = absl::Now() - t0;
    EXPECT_EQ(s.process->ExitDescription(), "exited with 0") << s.name;
    s.process.reset();
    return took;
  }
  // The load flows for at least a second and `n` more completed requests between phases.
  void AwaitCompletions(int n) {
    const int target = completed_.load() + n;
    const absl::Time until = absl::Now() + absl::Seconds(1);
    EXPECT_TRUE(PollUntil(
        [&] {
          return (completed_.load() >= target && absl::Now() >= until) || failed_.load() > 20;
        },
        absl::Seconds(60), absl::Milliseconds(10)))
        << "the load stalled at " << completed_.load() << " completed";
  }
  // From now on, records in `*first` when `series` of `s` first exceeds 0 (polled every 5 ms).
  void WatchFirst(const Service& s, const std::string& series, std::atomic<absl::Time>* first) {
    *first = absl::InfiniteFuture();
    watchers_.emplace_back([this, host = s.metrics_host, port = s.metrics_port, series, first] {
      while (!stop_watch_.load()) {
        absl::StatusOr<std::string> text = HttpGet(host, port, "/metrics");
        if (text.ok() && testing::MetricValue(*text, series) > 0) {
          *first = absl::Now();
          return;
        }
        absl::SleepFor(absl::Milliseconds(5));
      }
    });
  }

  // One client stream: greedy requests one after another until stopped.
  void Client(int t, v1::Gateway::Stub& stub) {
    for (int k = 0; !stop_.load(); ++k) {
      const int i = (t * 5 + k) % kPrompts;
      v1::GenerateRequest request;
      request.mutable_prompt_token_ids()->mutable_ids()->Add(prompts_[i].begin(),
                                                             prompts_[i].end());
      request.mutable_sampling()->set_temperature(0.0f);
      request.mutable_sampling()->set_top_p(1.0f);
      request.set_max_tokens(kMaxTokens);
      request.set_ignore_eos(true);
      request.set_return_token_ids(true);
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
      const absl::Time start = absl::Now();
      ++sent_;
      std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
          stub.Generate(&ctx, request);
      std::vector<int32_t> tokens;
      v1::GenerateResponse response;
      while (reader->Read(&response)) {
        tokens.insert(tokens.end(), response.token_ids().begin(), response.token_ids().end());
      }
      const grpc::Status status = reader->Finish();
      std::lock_guard lock(mu_);
      busy_ += absl::Now() - start;
      if (!status.ok()) {
        ++failed_;
        errors_.push_back(absl::StrCat("prompt ", i, ": ", status.error_message()));
      } else if (tokens != want_[i]) {
        ++wrong_;
        errors_.push_back(absl::StrCat("prompt ", i, ": wrong tokens"));
      } else {
        ++completed_;
      }
    }
  }

  std::string model_dir_, bin_dir_;
  std::vector<std::vector<int32_t>> prompts_, want_;
  int router_port_ = 0, attention_port_ = 0;
  Service router_, gateway_;
  std::map<std::string, Service> services_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> stop_watch_{false};
  std::vector<std::thread> watchers_;
  std::atomic<int> sent_{0}, completed_{0}, wrong_{0}, failed_{0};
  std::mutex mu_;
  std::vector<std::string> errors_;
  absl::Duration busy_;  // the requests' latencies summed (under mu_)
};

TEST_F(ElasticityTest, ScalingUnderLoadLosesNothing) {
  absl::StatusOr<std::unique_ptr<testing::LoopbackDns>> dns = testing::LoopbackDns::Start();
  ASSERT_TRUE(dns.ok()) << dns.status();
  router_port_ = Port();
  attention_port_ = Port();
  router_.name = "router";
  router_.address = absl::StrCat("127.0.0.1:", router_port_);
  router_.args = {"--model",  model_dir_,     "--num-shards", std::to_string(kShards),
                  "--listen", router_.address};
  ASSERT_TRUE(Launch(router_, "router-service", "router").ok());
  for (int shard = 0; shard < kShards; ++shard) {
    absl::Status s = Launch(Expert(shard, 0), "expert-service", "expert-service");
    ASSERT_TRUE(s.ok()) << s;
  }
  {
    absl::Status s = Launch(Attention(0), "attention-service", "attention-service");
    ASSERT_TRUE(s.ok()) << s;
  }
  (*dns)->Set(kName, {"127.0.0.2"});
  gateway_.name = "gateway";
  gateway_.address = absl::StrCat("127.0.0.1:", Port());
  gateway_.args = {
      "--model",
      model_dir_,
      "--attention",
      absl::StrCat("dns://127.0.0.1:", (*dns)->port(), "/", kName, ":", attention_port_),
      "--attention-resolve-ms",
      "200",
      "--listen",
      gateway_.address,
      "--http-host",
      "127.0.0.1",
      "--request-timeout-s",
      "120",
      "--drain-grace-s",
      "30"};
  {
    absl::Status s = Launch(gateway_, "gateway", "gateway");
    ASSERT_TRUE(s.ok()) << s;
  }

  // The load: kStreams streams through the gateway for the whole test.
  auto channel = MakeChannel(gateway_.address);
  auto stub = v1::Gateway::NewStub(channel);
  std::vector<std::thread> clients;
  for (int t = 0; t < kStreams; ++t) clients.emplace_back([&, t] { Client(t, *stub); });
  AwaitCompletions(kStreams);
  std::map<std::string, double> figures;

  // (a) shard group 0: 1 -> 3 replicas. A replica's first rows: its rows counter moves.
  std::atomic<absl::Time> first_rows[3];
  for (int r = 1; r <= 2; ++r) {
    Service& e = Expert(0, r);
    absl::Status s = Launch(e, "expert-service", "expert-service");
    ASSERT_TRUE(s.ok()) << s;
    figures[absl::StrCat("shard0 replica ", r, ": start -> SERVING (s)")] =
        Seconds(absl::Now() - e.started);
    WatchFirst(e, "expertmesh_expert_rows_total", &first_rows[r]);
  }
  AwaitCompletions(2 * kStreams);
  const absl::Time scale_in = absl::Now();
  // A new replica takes rows while the old one serves (the dispatcher's replicas take turns).
  for (int r = 1; r <= 2; ++r) {
    EXPECT_LT(first_rows[r].load(), scale_in)
        << "shard0 replica " << r << " got no rows in the "
        << Seconds(scale_in - Expert(0, r).started) << " s it served beside replica 0";
    if (first_rows[r].load() < scale_in) {
      figures[absl::StrCat("shard0 replica ", r, ": start -> first rows (s)")] =
          Seconds(first_rows[r].load() - Expert(0, r).started);
    }
  }

  // (b) back to 1 by SIGTERM: the original replica and replica 1; replica 2 stays.
  for (int r = 0; r <= 1; ++r) {
    figures[absl::StrCat("shard0 replica ", r, ": SIGTERM -> exit 0 (drain, s)")] =
        Seconds(Drain(Expert(0, r)));
  }
  // The survivor takes every row of its group.
  AwaitCompletions(2 * kStreams);
  EXPECT_LT(first_rows[2].load(), absl::Now()) << "the surviving replica never got rows";

  // (c) attention 1 -> 2: a second replica on 127.0.0.3, then its DNS record.
  {
    absl::Status s = Launch(Attention(1), "attention-service", "attention-service");
    ASSERT_TRUE(s.ok()) << s;
  }
  std::atomic<absl::Time> first_request;
  WatchFirst(Attention(1), "expertmesh_attention_prompt_tokens_total", &first_request);
  const absl::Time published = absl::Now();
  (*dns)->Set(kName, {"127.0.0.2", "127.0.0.3"});
  AwaitCompletions(2 * kStreams);
  // The bound: one re-resolution (200 ms here) + the first poll of the new member (immediate)
  // + the next request the gateway places; 3 s leaves room for a loaded machine.
  EXPECT_LT(first_request.load() - published, absl::Seconds(3))
      << "the new attention replica took no request within 3 s of its DNS record";
  figures["attention replica 1: DNS record -> first request (s)"] =
      Seconds(first_request.load() - published);
  // 2 -> 1: replica 0's record goes and it gets SIGTERM at the same moment.
  (*dns)->Set(kName, {"127.0.0.3"});
  figures["attention replica 0: SIGTERM -> exit 0 (drain, s)"] = Seconds(Drain(Attention(0)));
  AwaitCompletions(2 * kStreams);

  // (d) the router killed and started again on its port.
  router_.process->Signal(SIGKILL);
  ASSERT_TRUE(router_.process->WaitFor(absl::Seconds(10)));
  const absl::Time killed = absl::Now();
  const int before_outage = completed_.load();
  absl::SleepFor(absl::Seconds(2));
  const int during_outage = completed_.load() - before_outage;
  EXPECT_GT(during_outage, 0) << "nothing completed while the router was down";
  {
    absl::Status s = Launch(router_, "router-service", "router");
    ASSERT_TRUE(s.ok()) << s;
  }
  figures["router: requests completed while it was down (2 s)"] = during_outage;
  // Both remaining shard replicas register again.
  auto router_stub = v1::RouterService::NewStub(MakeChannel(router_.address));
  EXPECT_TRUE(PollUntil(
      [&] {
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
        v1::StatusResponse status;
        if (!router_stub->GetStatus(&ctx, v1::StatusRequest(), &status).ok()) return false;
        int replicas = 0;
        for (const v1::ShardGroup& g : status.placement().shards()) replicas += g.replicas_size();
        return replicas == 2;
      },
      absl::Seconds(20), absl::Milliseconds(20)));
  figures["router: SIGKILL -> both shards registered again (s)"] = Seconds(absl::Now() - killed);
  AwaitCompletions(2 * kStreams);

  // The gateway drains with requests in flight: the clients send no new ones (a client between
  // its stop check and its call has 20 ms to make it), the open ones must complete.
  stop_ = true;
  absl::SleepFor(absl::Milliseconds(20));
  const int in_flight = sent_.load() - completed_.load() - failed_.load() - wrong_.load();
  figures["gateway: requests in flight at its SIGTERM"] = in_flight;
  std::thread gateway_drain(
      [&] { figures["gateway: SIGTERM -> exit 0 (drain, s)"] = Seconds(Drain(gateway_)); });
  for (std::thread& t : clients) t.join();
  gateway_drain.join();

  figures["request latency, mean (s)"] = Seconds(busy_) / std::max(1, sent_.load());
  std::printf(
      "elasticity: %d streams, requests sent %d, completed %d, wrong tokens %d, "
      "failed %d\n",
      kStreams, sent_.load(), completed_.load(), wrong_.load(), failed_.load());
  for (const auto& [name, value] : figures) std::printf("  %-58s %.3f\n", name.c_str(), value);
  for (size_t i = 0; i < errors_.size() && i < 10; ++i) {
    std::printf("  error: %s\n", errors_[i].c_str());
  }
  std::fflush(stdout);
  EXPECT_EQ(wrong_.load(), 0);
  EXPECT_EQ(failed_.load(), 0);
  EXPECT_EQ(completed_.load(), sent_.load());
  EXPECT_GT((*dns)->queries(), 0);

  // Every other service drains and exits 0.
  for (Service* s : All()) {
    if (s->process) Drain(*s);
  }
}

}  // namespace
}  // namespace expertmesh
