// The dispatcher against a real control plane and real shards on loopback: a router service
// and 2 shard groups x 2 replicas of expert-service servers (in process, real gRPC, port 0).
// Distribution changes nothing: in the exact combine mode (the default) the dispatcher's output
// equals LocalExperts with every expert bitwise, for any split of the experts; in the partial
// mode it equals LocalExperts computing the same shard split (bitwise); a
// replica killed mid-run changes nothing; with no replica of a shard left, Run fails with
// UNAVAILABLE naming the shard within the step deadline and serves again once a replica
// registers. The fixture's tests run on both transports: the replicas' gRPC Compute streams
// and their framed TCP data planes (dataplane/). The data plane's own cases (answers refused on
// it, a stalled connection, mixed maps, connection pooling and bounds, a new data port,
// data_plane = false) use fake data-plane shards on dataplane::FrameServer where a real replica
// cannot misbehave. (Wall-clock waits here are bounded by the real network's events.)
#include "dispatcher/dispatcher.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>

#include <grpcpp/grpcpp.h>

#include "core/decode/sampling.h"
#include "core/format/wire.h"
#include "dataplane/frame.h"
#include "dataplane/frame_server.h"
#include "expert-service/expert_service.h"
#include "expert-service/live_placement.h"
#include "expertmesh/v1/expert.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "router/router_service.h"
#include "service-common/handshake.h"
#include "service-common/process.h"
#include "tests/cluster/shards_test_util.h"
#include "tests/common/poll.h"

namespace expertmesh {
namespace {

using testing::Batch;
using testing::ExpectedShardedOutput;
using testing::RandomBatch;
using testing::ShardTestModel;

// One step through `dispatcher`, checked against LocalExperts bit for bit (and finite).
void RunAndCheckStep(Dispatcher& dispatcher, const ModelConfig& config, const Placement& placement,
                     LocalExperts& all, int layer, int64_t n_rows, uint64_t seed) {
  const Batch b = RandomBatch(config, n_rows, seed);
  std::vector<float> got(n_rows * config.hidden_size);
  const absl::Status s = dispatcher.Run(layer, b.x, b.routes, got);
  ASSERT_TRUE(s.ok()) << s;
  absl::StatusOr<std::vector<float>> want =
      ExpectedShardedOutput(all, placement, layer, b, config.hidden_size);
  ASSERT_TRUE(want.ok()) << want.status();
  for (float v : got) ASSERT_TRUE(std::isfinite(v));
  ASSERT_EQ(got, *want) << "layer " << layer << " seed " << seed;
}

// The bad answers of shard 1's NaN, Inf and short fakes, counted by reason in the metrics text.
void ExpectShard1BadAnswersCounted(const std::string& text) {
  EXPECT_NE(text.find("expertmesh_dispatch_bad_answers_total{shard=\"1\",reason=\"non_finite\"} 2"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("expertmesh_dispatch_bad_answers_total{shard=\"1\",reason=\"size\"} 1"),
            std::string::npos)
      << text;
}

// The replicas listed open are exactly the real ones (the refused ones were cut or failed).
void ExpectOnlyRealReplicasOpen(const Dispatcher& dispatcher,
                                const std::vector<std::unique_ptr<ExpertServer>>& real) {
  for (const Dispatcher::ReplicaState& r : dispatcher.Replicas()) {
    bool is_real = false;
    for (const auto& e : real) is_real = is_real || r.address == e->address();
    EXPECT_EQ(r.open, is_real) << r.replica_id;
  }
}

constexpr int kShards = 2;
constexpr int kReplicas = 2;
const absl::Duration kStepDeadline = absl::Seconds(5);

// How a replica takes the dispatcher's requests: its gRPC Compute stream only, or its framed
// TCP data plane (it listens on one and registers its data_address).
enum class Transport { kStream, kDataPlane };

// A real replica of `shard` of the placement, registering with the router at `router`. With
// `data_plane` it listens on a framed TCP data plane on `data_listen` (default a free loopback
// port); with `metrics` its metrics (expertmesh_expert_data_connections,
// expertmesh_expert_rows_total) go there; `listen`: its gRPC address (default a free port).
absl::StatusOr<std::unique_ptr<ExpertServer>> StartReplica(
    const std::string& dir, const Placement& placement, int shard, const std::string& router,
    std::string instance_id = "", bool data_plane = false, MetricsRegistry* metrics = nullptr,
    std::string listen = "", std::string data_listen = "127.0.0.1:0") {
  ExpertServerOptions o;
  o.model_dir = dir;
  o.experts = placement.ExpertsOf(shard);
  o.shard_id = shard;
  o.router_address = router;
  if (!instance_id.empty()) o.instance_id = std::move(instance_id);
  if (data_plane) o.data_listen = std::move(data_listen);
  if (!listen.empty()) o.server.listen = std::move(listen);
  o.metrics = metrics;
  return ExpertServer::Start(o);
}

// The open data-plane connections of a replica started with `metrics` (its gauge).
double DataConnections(MetricsRegistry& metrics) {
  return metrics
      .GetGauge("expertmesh_expert_data_connections",
                "Open connections of the framed TCP data plane")
      .value();
}
// The rows a replica started with `metrics` computed.
double RowsComputed(MetricsRegistry& metrics) {
  return metrics.GetCounter("expertmesh_expert_rows_total", "Rows computed").value();
}

// Random batches of 1, 5 and 17 rows in layers 1 to 3 (seeds from ++*seed): the dispatcher's
// output equals `local`'s bit for bit. With `outputs`, each output is kept by (layer, rows).
void ExpectEqualsLocal(Dispatcher& dispatcher, RoutedExperts& local, const ModelConfig& config,
                       uint64_t* seed,
                       std::map<std::pair<int, int64_t>, std::vector<float>>* outputs) {
  for (int layer : {1, 2, 3}) {
    for (int64_t n : {1, 5, 17}) {
      const Batch b = RandomBatch(config, n, ++*seed);
      std::vector<float> got(n * config.hidden_size), want(got.size());
      const absl::Status st = dispatcher.Run(layer, b.x, b.routes, got);
      ASSERT_TRUE(st.ok()) << st;
      ASSERT_TRUE(local.Run(layer, b.x, b.routes, want).ok());
      ASSERT_EQ(got, want) << "layer " << layer << ", " << n << " rows";
      if (outputs) (*outputs)[{layer, n}] = std::move(got);
    }
  }
}

// A dispatcher watching the router, returned once its map covers every shard group with a
// version of at least min_version.
absl::StatusOr<std::unique_ptr<Dispatcher>> WatchingDispatcher(const ModelConfig& config,
                                                               DispatcherOptions d,
                                                               const std::string& router,
                                                               uint64_t min_version) {
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher = Dispatcher::Create(config, d);
  if (!dispatcher.ok()) return dispatcher.status();
  (*dispatcher)->WatchRouter(router);
  if (absl::Status s = (*dispatcher)->WaitCovered(absl::Seconds(20), min_version); !s.ok()) {
    return s;
  }
  return dispatcher;
}

// 2 shard groups x 2 replicas behind a router, and a dispatcher watching it. The replicas take
// the requests on the transport data_plane() says.
class DispatcherFixture : public ::testing::Test {
 protected:
  virtual bool data_plane() const = 0;

  void SetUp() override {
    absl::StatusOr<std::string> dir = ShardTestModel();
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *dir;
    absl::StatusOr<ModelConfig> config = LoadModelConfig(dir_ + "/config.json");
    ASSERT_TRUE(config.ok());
    config_ = *config;
    placement_ = *EvenPlacement(config_, kShards);
    absl::StatusOr<v1::PeerIdentity> id = MakeLocalIdentity(dir_, "test", "dispatcher-test");
    ASSERT_TRUE(id.ok());
    identity_ = *id;

    RouterServerOptions ro;
    ro.identity = identity_;
    ro.membership.heartbeat_interval = absl::Milliseconds(100);
    ro.membership.expiry = absl::Milliseconds(600);
    absl::StatusOr<std::unique_ptr<RouterServer>> router = RouterServer::Start(placement_, ro);
    ASSERT_TRUE(router.ok()) << router.status();
    router_ = *std::move(router);

    for (int s = 0; s < kShards; ++s) {
      for (int r = 0; r < kReplicas; ++r) AddReplica(s);
    }
    DispatcherOptions d;
    d.identity = identity_;
    d.step_deadline = kStepDeadline;
    d.attempt_timeout = absl::Seconds(2);
    d.metrics = &metrics_;
    absl::StatusOr<std::unique_ptr<Dispatcher>> disp = Dispatcher::Create(config_, d);
    ASSERT_TRUE(disp.ok()) << disp.status();
    dispatcher_ = *std::move(disp);
    dispatcher_->WatchRouter(router_->address());
    ASSERT_TRUE(dispatcher_->WaitCovered(absl::Seconds(20), router_->service().version()).ok());

    absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir_);
    ASSERT_TRUE(ckpt.ok());
    ckpt_ = *std::move(ckpt);
    absl::StatusOr<std::unique_ptr<LocalExperts>> all =
        LocalExperts::Create(*ckpt_, config_, AllExperts(config_));
    ASSERT_TRUE(all.ok()) << all.status();
    all_ = *std::move(all);
  }

  void TearDown() override {
    dispatcher_.reset();
    replicas_.clear();
    router_.reset();
  }

  // A replica of `shard` on the fixture's transport (with its own metrics registry); `listen`
  // and `data_listen`: its gRPC and data-plane addresses (default free ports).
  ExpertServer* AddReplica(int shard, std::string listen = "",
                           std::string data_listen = "127.0.0.1:0") {
    replica_metrics_.push_back(std::make_unique<MetricsRegistry>());
    absl::StatusOr<std::unique_ptr<ExpertServer>> s =
        StartReplica(dir_, placement_, shard, router_->address(),
                     absl::StrCat("shard", shard, "-", replicas_.size()), data_plane(),
                     replica_metrics_.back().get(), std::move(listen), std::move(data_listen));
    EXPECT_TRUE(s.ok()) << s.status();
    if (!s.ok()) return nullptr;
    replicas_.push_back(*std::move(s));
    return replicas_.back().get();
  }
  ExpertServer& Replica(int shard, int r) { return *replicas_[shard * kReplicas + r]; }
  MetricsRegistry& ReplicaMetrics(int shard, int r) {
    return *replica_metrics_[shard * kReplicas + r];
  }
  // The router's status (its placement map with the replicas, the expert load).
  absl::StatusOr<v1::StatusResponse> RouterStatus() {
    auto stub = v1::RouterService::NewStub(MakeChannel(router_->address()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::StatusResponse status;
    const grpc::Status s = stub->GetStatus(&ctx, v1::StatusRequest{}, &status);
    if (!s.ok()) return FromGrpcStatus(s);
    return status;
  }
  // Crashes both replicas of shard 1 (no deregistration: the router expires them).
  // The router's current map, a dispatcher (2 s step deadline) that applied it, and a newer
  // wrong map giving shard group 1's experts to group 0, whose replicas do not hold them.
  void DispatcherWithAWrongMapAhead(v1::PlacementMap* map, v1::PlacementMap* wrong,
                                    std::unique_ptr<Dispatcher>* dispatcher) {
    auto stub = v1::RouterService::NewStub(MakeChannel(router_->address()));
    grpc::ClientContext ctx;
    v1::WatchPlacementRequest watch;
    *watch.mutable_identity() = identity_;
    std::unique_ptr<grpc::ClientReader<v1::PlacementMap>> reader =
        stub->WatchPlacement(&ctx, watch);
    ASSERT_TRUE(reader->Read(map));
    ctx.TryCancel();
    (void)reader->Finish();
    DispatcherOptions d;
    d.identity = identity_;
    d.step_deadline = absl::Seconds(2);
    *dispatcher = *Dispatcher::Create(config_, d);
    ASSERT_TRUE((*dispatcher)->ApplyPlacement(*map).ok());
    *wrong = *map;
    wrong->set_version(map->version() + 1);
    v1::ShardGroup* group0 = nullptr;
    v1::ShardGroup* group1 = nullptr;
    for (v1::ShardGroup& g : *wrong->mutable_shards()) (g.shard_id() == 0 ? group0 : group1) = &g;
    ASSERT_TRUE(group0 != nullptr && group1 != nullptr);
    for (const v1::LayerExpert& le : group1->experts()) *group0->add_experts() = le;
    group1->clear_experts();
  }

  void KillShard1() {
    Replica(1, 0).Kill();
    Replica(1, 1).Kill();
  }

  // Runs one step through the dispatcher and checks it against LocalExperts.
  void RunAndCheck(int layer, int64_t n_rows, uint64_t seed) {
    RunAndCheckStep(*dispatcher_, config_, placement_, *all_, layer, n_rows, seed);
  }

  // Two micro-batches, a thread each, run `steps` steps of layers 1-3 with both Runs of a layer
  // in flight at once (as ping-pong micro-batches dispatch); each output must be LocalExperts'.
  // A step has rows(mb, step) rows and seed seed_base + 100 mb + 10 step + layer.
  void RunOverlappingMicroBatches(int steps, const std::function<int64_t(int, int)>& rows,
                                  uint64_t seed_base) {
    std::barrier both(2);
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int mb = 0; mb < 2; ++mb) {
      threads.emplace_back([&, mb] {
        RoutedExperts* lane = dispatcher_->MicroBatch(mb);
        for (int step = 0; step < steps; ++step) {
          for (int layer : {1, 2, 3}) {
            const Batch b =
                RandomBatch(config_, rows(mb, step), seed_base + 100 * mb + 10 * step + layer);
            std::vector<float> got(b.x.n_rows * config_.hidden_size), want(got.size());
            both.arrive_and_wait();  // both micro-batches dispatch this layer together
            const absl::Status st = lane->Run(layer, b.x, b.routes, got);
            if (!st.ok() || !all_->Run(layer, b.x, b.routes, want).ok() || got != want) {
              ADD_FAILURE() << "micro-batch " << mb << " step " << step << " layer " << layer
                            << ": " << st;
              ++failures;
            }
          }
        }
      });
    }
    for (auto& t : threads) t.join();
    EXPECT_EQ(failures.load(), 0);
  }

  std::string dir_;
  ModelConfig config_;
  Placement placement_;
  v1::PeerIdentity identity_;
  MetricsRegistry metrics_;
  std::unique_ptr<RouterServer> router_;
  std::vector<std::unique_ptr<MetricsRegistry>> replica_metrics_;  // outlive replicas_
  std::vector<std::unique_ptr<ExpertServer>> replicas_;
  std::unique_ptr<Dispatcher> dispatcher_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::unique_ptr<LocalExperts> all_;
};

// Every test of this fixture runs on both transports: the replicas' gRPC streams and their
// framed TCP data planes.
class DispatcherTest : public DispatcherFixture, public ::testing::WithParamInterface<Transport> {
 protected:
  bool data_plane() const override { return GetParam() == Transport::kDataPlane; }
};
INSTANTIATE_TEST_SUITE_P(Transports, DispatcherTest,
                         ::testing::Values(Transport::kStream, Transport::kDataPlane),
                         [](const ::testing::TestParamInfo<Transport>& info) {
                           return info.param == Transport::kStream ? "GrpcStream" : "DataPlane";
                         });

// The same fixture with every replica on the data plane, for what only the data plane has.
class DataPlaneDispatcherTest : public DispatcherFixture {
 protected:
  bool data_plane() const override { return true; }
};

TEST_P(DispatcherTest, EqualsLocalExpertsWithAllExperts) {
  // Exact combine (the default): bitwise LocalExperts::Run with every expert, for every MoE
  // layer (the MTP layer 3 included) and batch sizes 1..33.
  uint64_t seed = 100;
  for (int layer : {1, 2, 3}) {
    for (int64_t n : {1, 7, 33}) RunAndCheck(layer, n, ++seed);
  }
  // The partial combine: bitwise the same shard split computed locally (each shard's partial
  // sum rounded to BF16, added in shard order), and against LocalExperts with every expert in
  // one call the only difference is that rounding, at most 2^-9 relative per partial
  // (2^-9 ~ 2.0e-3); tolerance 2^-7 ~ 7.8e-3.
  DispatcherOptions d;
  d.identity = identity_;
  d.step_deadline = kStepDeadline;
  d.combine = CombineMode::kPartial;
  absl::StatusOr<std::unique_ptr<Dispatcher>> partial = Dispatcher::Create(config_, d);
  ASSERT_TRUE(partial.ok()) << partial.status();
  (*partial)->WatchRouter(router_->address());
  ASSERT_TRUE((*partial)->WaitCovered(absl::Seconds(20), router_->service().version()).ok());
  double worst = 0;
  for (int layer : {1, 2, 3}) {
    const Batch b = RandomBatch(config_, 16, 7 + layer);
    std::vector<float> got(16 * config_.hidden_size), ref(got.size());
    ASSERT_TRUE((*partial)->Run(layer, b.x, b.routes, got).ok());
    absl::StatusOr<std::vector<float>> want = ExpectedShardedOutput(
        *all_, placement_, layer, b, config_.hidden_size, CombineMode::kPartial);
    ASSERT_TRUE(want.ok());
    ASSERT_EQ(got, *want) << "partial combine, layer " << layer;
    ASSERT_TRUE(all_->Run(layer, b.x, b.routes, ref).ok());
    double ref_max = 0, diff_max = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      ref_max = std::max(ref_max, std::abs(static_cast<double>(ref[i])));
      diff_max = std::max(diff_max, std::abs(static_cast<double>(got[i]) - ref[i]));
    }
    ASSERT_GT(ref_max, 0.0);
    worst = std::max(worst, diff_max / ref_max);
  }
  partial->reset();
  RecordProperty("partial_max_rel_diff_vs_unsharded", std::to_string(worst));
  EXPECT_GT(worst, 0.0) << "the partial combine should differ from the engine somewhere";
  EXPECT_LE(worst, 1.0 / 128) << "measured " << worst;
  std::printf("partial combine vs LocalExperts: max |diff|/max|ref| = %.3g\n", worst);

  const std::string text = metrics_.RenderText();
  EXPECT_NE(text.find("expertmesh_dispatch_latency_seconds_count{layer=\"1\"} 3"),
            std::string::npos);
  EXPECT_NE(text.find("expertmesh_dispatch_bytes_sent_total{shard=\"1\"}"), std::string::npos);
  EXPECT_NE(text.find("expertmesh_dispatch_expert_tokens_total{layer=\"3\",expert=\"7\"}"),
            std::string::npos);
}

// The exact combine against LocalExperts::Run, bit for bit, for random routes and arbitrary
// (random) splits of the experts over 1..4 shard groups with 1 or 2 replicas each, with a
// small max_answer_bytes so that a shard group's rows also go out in several requests.
TEST(DispatcherExactCombineTest, AnySplitEqualsLocalExperts) {
  absl::StatusOr<std::string> dir = ShardTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  const ModelConfig config = *LoadModelConfig(*dir + "/config.json");
  const v1::PeerIdentity identity = *MakeLocalIdentity(*dir, "test", "exact-combine");
  std::unique_ptr<Checkpoint> ckpt = *Checkpoint::Open(*dir);
  std::unique_ptr<LocalExperts> all = *LocalExperts::Create(*ckpt, config, AllExperts(config));
  Rng rng(4242);
  uint64_t seed = 900;
  for (int trial = 0; trial < 5; ++trial) {
    const int shards = 1 + trial % 4;
    const int replicas = 1 + trial % 2;
    Placement placement = *EvenPlacement(config, shards);
    // A random shard for every routed expert; every group keeps at least one expert.
    std::vector<size_t> routed;
    for (size_t i = 0; i < placement.shard_of.size(); ++i) {
      if (placement.shard_of[i] >= 0) routed.push_back(i);
    }
    for (size_t k = 0; k < routed.size(); ++k) {
      placement.shard_of[routed[k]] = k < static_cast<size_t>(shards)
                                          ? static_cast<int32_t>(k)
                                          : static_cast<int32_t>(rng.Next() % shards);
    }
    for (size_t k = routed.size(); k-- > 1;) {  // shuffle, so the forced ones move too
      std::swap(placement.shard_of[routed[k]], placement.shard_of[routed[rng.Next() % (k + 1)]]);
    }
    SCOPED_TRACE(::testing::Message() << "trial " << trial << ": " << shards << " group(s) x "
                                      << replicas << " replica(s), " << PlacementToJson(placement));
    RouterServerOptions ro;
    ro.identity = identity;
    ro.membership.heartbeat_interval = absl::Milliseconds(100);
    ro.membership.expiry = absl::Milliseconds(600);
    absl::StatusOr<std::unique_ptr<RouterServer>> router = RouterServer::Start(placement, ro);
    ASSERT_TRUE(router.ok()) << router.status();
    std::vector<std::unique_ptr<ExpertServer>> servers;
    for (int s = 0; s < shards; ++s) {
      for (int r = 0; r < replicas; ++r) {
        auto e = StartReplica(*dir, placement, s, (*router)->address(),
                              absl::StrCat("t", trial, "-shard", s, "-", r));
        ASSERT_TRUE(e.ok()) << e.status();
        servers.push_back(*std::move(e));
      }
    }
    DispatcherOptions d;
    d.identity = identity;
    d.step_deadline = kStepDeadline;
    // 3 rows' worth of per-expert answers per request.
    d.max_answer_bytes = 3 * OutputBytes(config.num_experts_per_tok, config.hidden_size);
    absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher =
        WatchingDispatcher(config, d, (*router)->address(), (*router)->service().version());
    ASSERT_TRUE(dispatcher.ok()) << dispatcher.status();
    ASSERT_NO_FATAL_FAILURE(ExpectEqualsLocal(**dispatcher, *all, config, &seed, nullptr));
    dispatcher->reset();
    servers.clear();
    router->reset();
  }
}

// RoutedExperts' generic RunPerExpert (any backend: one Run per pair rank) and LocalExperts'
// one-pass override give the same bits, and CombinePerExpert of them is LocalExperts::Run.
TEST(DispatcherExactCombineTest, GenericPerExpertEqualsLocalExperts) {
  absl::StatusOr<std::string> dir = ShardTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  const ModelConfig config = *LoadModelConfig(*dir + "/config.json");
  std::unique_ptr<Checkpoint> ckpt = *Checkpoint::Open(*dir);
  std::unique_ptr<LocalExperts> all = *LocalExperts::Create(*ckpt, config, AllExperts(config));
  // Only Run: RunPerExpert is RoutedExperts' default.
  struct RunOnly final : RoutedExperts {
    LocalExperts* inner;
    absl::Status Run(int layer, const QuantizedActivations& x, const ExpertRoutes& routes,
                     std::span<float> out) override {
      return inner->Run(layer, x, routes, out);
    }
  } generic;
  generic.inner = all.get();
  const int64_t H = config.hidden_size;
  for (int layer : {1, 2, 3}) {
    Batch b = RandomBatch(config, 9, 40 + layer);
    ExpertRoutes uneven;  // rows with 0..k pairs
    for (int64_t r = 0; r < b.routes.n_rows(); ++r) {
      const int32_t begin = b.routes.offsets[r];
      const int32_t n = static_cast<int32_t>(r % (config.num_experts_per_tok + 1));
      uneven.AddRow(std::span<const int32_t>(b.routes.experts.data() + begin, n),
                    std::span<const float>(b.routes.weights.data() + begin, n));
    }
    for (const ExpertRoutes* routes : {&b.routes, &uneven}) {
      const size_t n_pairs = routes->experts.size();
      std::vector<uint16_t> one_pass(n_pairs * H), per_rank(n_pairs * H, 0xffff);
      ASSERT_TRUE(all->RunPerExpert(layer, b.x, *routes, one_pass).ok());
      ASSERT_TRUE(generic.RunPerExpert(layer, b.x, *routes, per_rank).ok());
      EXPECT_EQ(one_pass, per_rank) << "layer " << layer;
      std::vector<float> combined(b.x.n_rows * H), run(combined.size());
      ASSERT_TRUE(CombinePerExpert(*routes, one_pass, H, combined).ok());
      ASSERT_TRUE(all->Run(layer, b.x, *routes, run).ok());
      EXPECT_EQ(combined, run) << "layer " << layer;
    }
  }
}

TEST_P(DispatcherTest, ConcurrentStepsStayExact) {
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 6; ++i) {
        const int layer = 1 + (i + t) % 3;
        const Batch b = RandomBatch(config_, 5 + t, 1000 * t + i);
        std::vector<float> got(b.x.n_rows * config_.hidden_size);
        absl::StatusOr<std::vector<float>> want =
            ExpectedShardedOutput(*all_, placement_, layer, b, config_.hidden_size);
        if (!dispatcher_->Run(layer, b.x, b.routes, got).ok() || !want.ok() || got != *want) {
          ++failures;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
}

// One step at a time (an attention replica's normal pace) leaves every replica with no rows
// outstanding when the next is chosen; the replicas must still take turns, or a replica added
// by scaling out would never get work while the first one lives.
TEST_P(DispatcherTest, SequentialStepsTakeTurnsOverTheReplicas) {
  for (int i = 0; i < 2 * kReplicas; ++i) {
    const Batch b = RandomBatch(config_, 4, 500 + i);
    std::vector<float> got(b.x.n_rows * config_.hidden_size);
    ASSERT_TRUE(dispatcher_->Run(1, b.x, b.routes, got).ok());
    absl::StatusOr<std::vector<float>> want =
        ExpectedShardedOutput(*all_, placement_, 1, b, config_.hidden_size);
    ASSERT_TRUE(want.ok());
    EXPECT_EQ(got, *want);
  }
  int open = 0;
  for (const Dispatcher::ReplicaState& r : dispatcher_->Replicas()) {
    EXPECT_TRUE(r.open) << r.replica_id << " of shard " << r.shard << " was never chosen";
    open += r.open ? 1 : 0;
  }
  EXPECT_EQ(open, kShards * kReplicas);
  // On the data plane each replica served its requests on one pooled connection (kept open
  // between steps, never one per request); on the streams no data connection exists.
  for (int s = 0; s < kShards; ++s) {
    for (int r = 0; r < kReplicas; ++r) {
      const double want = data_plane() ? 1 : 0;
      EXPECT_TRUE(testing::PollUntil([&] { return DataConnections(ReplicaMetrics(s, r)) == want; },
                                     absl::Seconds(5)))
          << "shard " << s << " replica " << r << ": " << DataConnections(ReplicaMetrics(s, r))
          << " data connections open";
    }
  }
}

TEST_P(DispatcherTest, ReplicaKilledMidRunFailsOverWithTheSameOutput) {
  std::atomic<int> steps{0};
  std::thread killer([&] {
    while (steps.load() < 4) std::this_thread::yield();
    Replica(0, 0).Kill();  // a crash: no deregistration, streams cut
    while (steps.load() < 12) std::this_thread::yield();
    Replica(1, 0).Drain();  // a graceful stop: deregisters first
  });
  for (int i = 0; i < 30; ++i) {
    RunAndCheck(1 + i % 3, 9, 500 + i);
    if (HasFatalFailure()) break;
    steps.fetch_add(1);
  }
  steps.store(1000);
  killer.join();
  // The map order makes replica 0 of each shard the first choice; once killed, its shard's
  // requests went to replica 1 (through a failover when the kill hit a request in flight).
  EXPECT_EQ(Replica(0, 0).service().outstanding_rows(), 0u);
}

// A replica that crashed and was restarted on its addresses (its gRPC port and, on the data
// plane, its data port: the dispatcher's map entry is the same) gets work again: after its
// crash it was tried last, but once it registered again it takes its turns. (Before: never,
// while the other replica of its shard lived.)
TEST_P(DispatcherTest, AReplicaRestartedOnItsAddressGetsWorkAgain) {
  const int port = Replica(1, 0).port();
  const std::string data_address = Replica(1, 0).data_address();
  Replica(1, 0).Kill();
  for (int i = 0; i < 4; ++i) RunAndCheck(1 + i % 3, 6, 40 + i);  // shard 1 fails over to r1
  ASSERT_NE(AddReplica(1, LoopbackAddress(port), data_plane() ? data_address : "127.0.0.1:0"),
            nullptr);
  ASSERT_EQ(replicas_.back()->data_address(), data_address);
  MetricsRegistry& restarted = *replica_metrics_.back();
  ASSERT_TRUE(dispatcher_->WaitCovered(absl::Seconds(10), router_->service().version()).ok());
  for (int i = 0; i < 4 * kReplicas; ++i) RunAndCheck(1 + i % 3, 6, 50 + i);
  EXPECT_GT(RowsComputed(restarted), 0) << "the restarted replica never got work";
}

TEST_P(DispatcherTest, NoReplicaLeftIsUnavailableNamingTheShard) {
  RunAndCheck(2, 4, 1);
  KillShard1();
  const Batch b = RandomBatch(config_, 6, 77);
  std::vector<float> out(6 * config_.hidden_size);
  const absl::Time start = absl::Now();
  const absl::Status s = dispatcher_->Run(2, b.x, b.routes, out);
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("shard 1"), std::string::npos) << s;
  EXPECT_LT(took, kStepDeadline);
  // Still failing once the router has expired them (no replica registered at all).
  testing::PollUntil([&] { return !dispatcher_->Covered(); }, absl::Seconds(10));  // expiry
  EXPECT_FALSE(dispatcher_->Covered());
  const absl::Status s2 = dispatcher_->Run(2, b.x, b.routes, out);
  EXPECT_EQ(s2.code(), absl::StatusCode::kUnavailable) << s2;
  EXPECT_NE(s2.message().find("shard 1"), std::string::npos) << s2;
}

TEST_P(DispatcherTest, ServesAgainOnceAReplicaRegisters) {
  KillShard1();
  testing::PollUntil([&] { return !dispatcher_->Covered(); }, absl::Seconds(10));  // expiry
  ASSERT_FALSE(dispatcher_->Covered());
  // A new replica registers: the next map covers shard 1 again and steps succeed.
  ASSERT_NE(AddReplica(1), nullptr);
  ASSERT_TRUE(dispatcher_->WaitCovered(absl::Seconds(10), router_->service().version()).ok());
  RunAndCheck(2, 6, 77);
  RunAndCheck(1, 3, 78);
}

TEST_P(DispatcherTest, ReportsExpertLoadToTheRouter) {
  std::map<std::pair<int, int>, uint64_t> sent;
  for (int i = 0; i < 4; ++i) {
    const int layer = 1 + i % 2;
    const Batch b = RandomBatch(config_, 3 + i, 900 + i);
    std::vector<float> out(b.x.n_rows * config_.hidden_size);
    ASSERT_TRUE(dispatcher_->Run(layer, b.x, b.routes, out).ok());
    for (int32_t e : b.routes.experts) ++sent[{layer, e}];
  }
  ASSERT_TRUE(dispatcher_->ReportLoad().ok());
  absl::StatusOr<v1::StatusResponse> got = RouterStatus();
  ASSERT_TRUE(got.ok()) << got.status();
  const v1::StatusResponse& status = *got;
  std::map<std::pair<int, int>, uint64_t> reported;
  for (const v1::LayerExpertLoad& l : status.expert_load()) {
    reported[{l.layer(), l.expert()}] = l.tokens();
  }
  EXPECT_EQ(reported, sent);
  EXPECT_EQ(status.placement().shards_size(), kShards);
  EXPECT_EQ(status.placement().shards(1).replicas_size(), kReplicas);
  EXPECT_TRUE(status.placement().shards(1).replicas(0).healthy());
}

TEST_P(DispatcherTest, FollowsARestartedRouterWhoseVersionsStartAgain) {
  // Membership changes push the old router's version well above what a fresh router reaches
  // with the 4 live replicas: 4 registrations, then 2 per shard (a drain, a registration).
  for (int shard = 0; shard < kShards; ++shard) {
    Replica(shard, 1).Drain();
    ASSERT_NE(AddReplica(shard), nullptr);
  }
  const uint64_t old_version = router_->service().version();
  ASSERT_GE(old_version, 1u + 4 + 2 * kShards);
  ASSERT_TRUE(dispatcher_->WaitCovered(absl::Seconds(10), old_version).ok());
  RunAndCheck(1, 4, 31);

  const int port = router_->port();
  router_.reset();  // the replicas' heartbeats fail; the dispatcher's watch breaks
  RouterServerOptions ro;
  ro.server.listen = LoopbackAddress(port);
  ro.identity = identity_;
  ro.membership.heartbeat_interval = absl::Milliseconds(100);
  ro.membership.expiry = absl::Milliseconds(600);
  absl::StatusOr<std::unique_ptr<RouterServer>> router = RouterServer::Start(placement_, ro);
  ASSERT_TRUE(router.ok()) << router.status();
  router_ = *std::move(router);
  // The 4 live replicas learn from their heartbeats that the router forgot them and register
  // again. How many maps the new router publishes meanwhile depends on heartbeat timing (a
  // replica expired and registered again adds two); what does not: it ends up listing every
  // live replica, after at least the 4 registrations (version >= 5), and the dispatcher
  // follows that map although its version is below the old router's.
  absl::StatusOr<v1::StatusResponse> status;
  const bool followed = testing::PollUntil(
      [&] {
        status = RouterStatus();
        if (!status.ok() || status->placement().shards_size() != kShards) return false;
        for (const auto& shard : status->placement().shards()) {
          if (shard.replicas_size() != kReplicas) return false;
        }
        return dispatcher_->placement_version() == status->placement().version();
      },
      absl::Seconds(20), absl::Milliseconds(20));
  ASSERT_TRUE(status.ok()) << status.status();
  ASSERT_TRUE(followed) << "router map v" << status->placement().version() << ", dispatcher v"
                        << dispatcher_->placement_version();
  const uint64_t new_version = status->placement().version();
  EXPECT_GE(new_version, 5u);
  ASSERT_LT(new_version, old_version);
  EXPECT_TRUE(dispatcher_->Covered());
  RunAndCheck(2, 5, 32);
}

TEST_P(DispatcherTest, RefusesAStepItCannotPlace) {
  const Batch b = RandomBatch(config_, 2, 5);
  std::vector<float> out(2 * config_.hidden_size);
  // Layer 0 is dense: no shard holds its experts.
  EXPECT_EQ(dispatcher_->Run(0, b.x, b.routes, out).code(), absl::StatusCode::kFailedPrecondition);
  std::vector<float> short_out(config_.hidden_size);
  EXPECT_EQ(dispatcher_->Run(1, b.x, b.routes, short_out).code(),
            absl::StatusCode::kInvalidArgument);
}

// A step keeps the placement table it took at its first MoE layer (layer 1 here): a newer map
// applied mid-step (here a wrong one, giving group 1's experts to group 0, whose replicas do not
// hold them) is used from the next step on. A layer not after the last one dispatched also
// begins a step.
TEST_P(DispatcherTest, AStepKeepsItsTableUntilTheNextStep) {
  v1::PlacementMap map, wrong;
  std::unique_ptr<Dispatcher> dispatcher;
  ASSERT_NO_FATAL_FAILURE(DispatcherWithAWrongMapAhead(&map, &wrong, &dispatcher));
  const Batch b = RandomBatch(config_, 6, 77);
  std::vector<float> out(6 * config_.hidden_size), want(out.size());
  ASSERT_TRUE(dispatcher->Run(1, b.x, b.routes, out).ok());
  const absl::Status applied = dispatcher->ApplyPlacement(wrong);
  ASSERT_TRUE(applied.ok()) << applied;
  EXPECT_EQ(dispatcher->placement_version(), wrong.version());
  for (int layer : {2, 3}) {  // the rest of the step: the table of layer 1
    const absl::Status st = dispatcher->Run(layer, b.x, b.routes, out);
    ASSERT_TRUE(st.ok()) << "layer " << layer << ": " << st;
    ASSERT_TRUE(all_->Run(layer, b.x, b.routes, want).ok());
    EXPECT_EQ(out, want) << "layer " << layer;
  }
  // The next step takes the new table: group 0's replicas refuse experts they do not hold.
  EXPECT_FALSE(dispatcher->Run(1, b.x, b.routes, out).ok());
  // The right map again: layer 3 still belongs to the step begun at layer 1 (the wrong table);
  // layer 2, not after 3, begins a step and takes the right one.
  map.set_version(wrong.version() + 1);
  ASSERT_TRUE(dispatcher->ApplyPlacement(map).ok());
  EXPECT_FALSE(dispatcher->Run(3, b.x, b.routes, out).ok());
  const absl::Status back = dispatcher->Run(2, b.x, b.routes, out);
  ASSERT_TRUE(back.ok()) << back;
  ASSERT_TRUE(all_->Run(2, b.x, b.routes, want).ok());
  EXPECT_EQ(out, want);
}

// Micro-batches (Dispatcher::MicroBatch) are separate sequences of steps, each with its own
// step table: a map applied while micro-batch 0 is mid-step is taken by the step micro-batch 1
// begins then, and micro-batch 0 keeps its table to its own step boundary (with one shared step
// table, micro-batch 1's new step would switch micro-batch 0's table mid-step).
TEST_P(DispatcherTest, MicroBatchesKeepTheirOwnStepTables) {
  v1::PlacementMap map, wrong;
  std::unique_ptr<Dispatcher> dispatcher;
  ASSERT_NO_FATAL_FAILURE(DispatcherWithAWrongMapAhead(&map, &wrong, &dispatcher));

  RoutedExperts* mb0 = dispatcher->MicroBatch(0);
  RoutedExperts* mb1 = dispatcher->MicroBatch(1);
  EXPECT_EQ(dispatcher->MicroBatch(1), mb1);
  EXPECT_NE(mb0, mb1);
  const Batch b = RandomBatch(config_, 6, 78);
  std::vector<float> out(6 * config_.hidden_size), want(out.size());
  ASSERT_TRUE(mb0->Run(1, b.x, b.routes, out).ok());
  EXPECT_EQ(dispatcher->step_version(0), map.version());
  EXPECT_EQ(dispatcher->step_version(1), 0u);  // no step yet
  ASSERT_TRUE(dispatcher->ApplyPlacement(wrong).ok());
  // Micro-batch 1 begins a step now: the wrong table, refused by the replicas.
  EXPECT_FALSE(mb1->Run(1, b.x, b.routes, out).ok());
  EXPECT_EQ(dispatcher->step_version(1), wrong.version());
  for (int layer : {2, 3}) {  // micro-batch 0's step goes on with its own table
    const absl::Status st = mb0->Run(layer, b.x, b.routes, out);
    ASSERT_TRUE(st.ok()) << "layer " << layer << ": " << st;
    ASSERT_TRUE(all_->Run(layer, b.x, b.routes, want).ok());
    EXPECT_EQ(out, want) << "layer " << layer;
    EXPECT_EQ(dispatcher->step_version(0), map.version());
  }
  // The right map again: micro-batch 1's step (begun at layer 1) keeps the wrong table until
  // its next step; Run() is micro-batch 0, whose next step takes the right one.
  map.set_version(wrong.version() + 1);
  ASSERT_TRUE(dispatcher->ApplyPlacement(map).ok());
  EXPECT_FALSE(mb1->Run(2, b.x, b.routes, out).ok());
  ASSERT_TRUE(dispatcher->Run(1, b.x, b.routes, out).ok());
  EXPECT_EQ(dispatcher->step_version(0), map.version());
  const absl::Status back = mb1->Run(1, b.x, b.routes, out);
  ASSERT_TRUE(back.ok()) << back;
  ASSERT_TRUE(all_->Run(1, b.x, b.routes, want).ok());
  EXPECT_EQ(out, want);
  EXPECT_EQ(dispatcher->step_version(1), map.version());
}

// Two micro-batches' steps overlapping (both Runs of a layer in flight at once, as ping-pong
// micro-batches dispatch) give each exactly LocalExperts' output.
TEST_P(DispatcherTest, OverlappingMicroBatchStepsStayExact) {
  RunOverlappingMicroBatches(
      4, [](int mb, int step) { return 3 + 4 * mb + step; }, 7000);
}

// Registers a replica of `shard` (the placement's experts of it) with the router at `router`
// as `address`, with the data plane at `data_address` ("": none). No heartbeats follow: the
// router's expiry must outlast the test.
absl::Status RegisterReplica(const std::string& router, const v1::PeerIdentity& identity, int shard,
                             const Placement& placement, const std::string& address,
                             const std::string& data_address) {
  v1::RegisterRequest reg;
  *reg.mutable_identity() = identity;
  reg.set_address(address);
  reg.set_data_address(data_address);
  reg.set_shard_id(shard);
  for (const LayerExpert& le : placement.ExpertsOf(shard)) {
    v1::LayerExpert* p = reg.add_experts();
    p->set_layer(le.layer);
    p->set_expert(le.expert);
  }
  auto stub = v1::RouterService::NewStub(MakeChannel(router));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::RegisterResponse resp;
  return FromGrpcStatus(stub->Register(&ctx, reg, &resp));
}

// A shard replica that misbehaves: it speaks the real protocol (handshake with the model's
// identity, the Compute stream, registration with the router for shard 1) but answers every
// request with NaN outputs (kNaN), Inf outputs (kInf) or one row too few (kShortAnswer).
class FakeShard final : public v1::ExpertService::Service {
 public:
  enum class Mode { kNaN, kInf, kShortAnswer };
  FakeShard(Mode mode, v1::PeerIdentity identity, int64_t hidden)
      : mode_(mode), identity_(std::move(identity)), hidden_(hidden) {}

  // Starts the server on a free loopback port and registers it with the router as shard s.
  absl::Status Start(const std::string& router, int shard, const Placement& placement) {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(this);
    server_ = b.BuildAndStart();
    if (!server_ || port_ == 0) return absl::InternalError("fake shard did not start");
    return RegisterReplica(router, identity_, shard, placement, LoopbackAddress(port_),
                           /*data_address=*/"");
  }
  ~FakeShard() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
  }
  int answered() const { return answered_.load(); }

  grpc::Status Handshake(grpc::ServerContext*, const v1::HandshakeRequest*,
                         v1::HandshakeResponse* resp) override {
    *resp->mutable_server() = identity_;
    return grpc::Status::OK;
  }
  grpc::Status Compute(
      grpc::ServerContext*,
      grpc::ServerReaderWriter<v1::ExpertResponse, v1::ExpertRequest>* stream) override {
    v1::ExpertRequest req;
    while (stream->Read(&req)) {
      v1::ExpertResponse resp;
      resp.set_request_id(req.request_id());
      resp.set_batch_id(req.batch_id());
      resp.set_layer(req.layer());
      const uint32_t rows = mode_ == Mode::kShortAnswer ? req.n_rows() - 1 : req.n_rows();
      resp.set_n_rows(rows);
      // The answer's BF16 rows: one per pair in the per-expert (exact) mode, else one per row;
      // one short for kShortAnswer.
      const uint32_t answer_rows =
          (req.combine() == v1::COMBINE_PER_EXPERT ? static_cast<uint32_t>(req.experts_size())
                                                   : req.n_rows()) -
          (mode_ == Mode::kShortAnswer ? 1 : 0);
      // BF16 0.5 everywhere (0x3F00), with one NaN (0x7FC0) or -Inf (0xFF80) in the middle of
      // the last row: one bad value must be enough.
      std::string out(OutputBytes(answer_rows, hidden_), '\0');
      for (size_t i = 0; i + 1 < out.size(); i += 2) out[i + 1] = '\x3F';
      if (mode_ != Mode::kShortAnswer && out.size() >= 4) {
        const size_t at = out.size() - 2 * (hidden_ / 2);
        out[at] = mode_ == Mode::kNaN ? '\xC0' : '\x80';
        out[at + 1] = mode_ == Mode::kNaN ? '\x7F' : '\xFF';
      }
      resp.set_outputs(std::move(out));
      ++answered_;
      if (!stream->Write(resp)) break;
    }
    return grpc::Status::OK;
  }

 private:
  const Mode mode_;
  const v1::PeerIdentity identity_;
  const int64_t hidden_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::atomic<int> answered_{0};
};

// Shard 1's replicas, in the router's map order: a NaN answerer, a short answerer, an Inf
// answerer and a real replica. The dispatcher tries them in that order (none is open yet):
// each bad answer is refused, counted and failed over, and the step's output is the real
// replica's, bitwise. The bad replicas' streams are cut, so the next steps go straight to the
// real one.
TEST(DispatcherBadAnswerTest, NonFiniteAndMisSizedAnswersFailOverAndAreCounted) {
  absl::StatusOr<std::string> dir = ShardTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  const ModelConfig config = *LoadModelConfig(*dir + "/config.json");
  const Placement placement = *EvenPlacement(config, 2);
  const v1::PeerIdentity identity = *MakeLocalIdentity(*dir, "test", "bad-answers");
  RouterServerOptions ro;
  ro.identity = identity;
  ro.membership.expiry = absl::Seconds(60);  // the fakes do not heartbeat
  absl::StatusOr<std::unique_ptr<RouterServer>> router = RouterServer::Start(placement, ro);
  ASSERT_TRUE(router.ok()) << router.status();
  const std::string router_addr = (*router)->address();

  std::vector<std::unique_ptr<ExpertServer>> real;
  auto add_real = [&](int shard) {
    absl::StatusOr<std::unique_ptr<ExpertServer>> e =
        StartReplica(*dir, placement, shard, router_addr);
    ASSERT_TRUE(e.ok()) << e.status();
    real.push_back(*std::move(e));
  };
  add_real(0);  // shard0-r0
  std::vector<std::unique_ptr<FakeShard>> fakes;
  for (FakeShard::Mode mode :
       {FakeShard::Mode::kNaN, FakeShard::Mode::kShortAnswer, FakeShard::Mode::kInf}) {
    fakes.push_back(std::make_unique<FakeShard>(mode, identity, config.hidden_size));
    ASSERT_TRUE(fakes.back()->Start(router_addr, 1, placement).ok());  // shard1-r1..r3
  }
  add_real(1);  // shard1-r4: last in the map

  MetricsRegistry metrics;
  DispatcherOptions d;
  d.identity = identity;
  d.step_deadline = absl::Seconds(10);
  d.metrics = &metrics;
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher = Dispatcher::Create(config, d);
  ASSERT_TRUE(dispatcher.ok());
  (*dispatcher)->WatchRouter(router_addr);
  ASSERT_TRUE((*dispatcher)->WaitCovered(absl::Seconds(20), 5).ok());
  const std::vector<Dispatcher::ReplicaState> replicas = (*dispatcher)->Replicas();
  ASSERT_EQ(replicas.size(), 5u);
  ASSERT_EQ(replicas.back().address, real[1]->address());  // the real one is tried last

  std::unique_ptr<Checkpoint> ckpt = *Checkpoint::Open(*dir);
  std::unique_ptr<LocalExperts> all = *LocalExperts::Create(*ckpt, config, AllExperts(config));
  auto run_and_check = [&](int layer, int64_t n, uint64_t seed) {
    RunAndCheckStep(**dispatcher, config, placement, *all, layer, n, seed);
  };
  run_and_check(1, 8, 61);
  for (const auto& f : fakes) EXPECT_EQ(f->answered(), 1);  // every fake was asked and refused
  EXPECT_EQ((*dispatcher)->failovers(), 3u);
  const std::string text = metrics.RenderText();
  ExpectShard1BadAnswersCounted(text);
  EXPECT_NE(text.find("expertmesh_dispatch_bad_answers_total{shard=\"0\",reason=\"size\"} 0"),
            std::string::npos)
      << text;
  // The refused replicas' streams are cut: they are not open, the real ones are.
  ExpectOnlyRealReplicasOpen(**dispatcher, real);
  // Later steps go to the open (real) replica first: no more failovers, same exactness.
  for (int i = 0; i < 3; ++i) run_and_check(1 + i % 3, 5, 70 + i);
  EXPECT_EQ((*dispatcher)->failovers(), 3u);
  for (const auto& f : fakes) EXPECT_EQ(f->answered(), 1);
  dispatcher->reset();
}

// The control plane absent at start-up and restarted while steps run: the shard replicas and
// the dispatcher start with no router listening (they retry with bounded backoff), serve once
// it comes up, keep serving on their open streams while it is down, and follow the restarted
// router (its versions counting from 1 again).
TEST(DispatcherRouterOutageTest, RouterStartedLateAndRestartedMidRun) {
  absl::StatusOr<std::string> dir = ShardTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  const ModelConfig config = *LoadModelConfig(*dir + "/config.json");
  const Placement placement = *EvenPlacement(config, 2);
  const v1::PeerIdentity identity = *MakeLocalIdentity(*dir, "test", "router-outage");
  absl::StatusOr<int> port = PickFreePort();
  ASSERT_TRUE(port.ok());
  const std::string router_addr = LoopbackAddress(*port);
  const auto start_router = [&]() -> std::unique_ptr<RouterServer> {
    RouterServerOptions ro;
    ro.server.listen = router_addr;
    ro.identity = identity;
    ro.membership.heartbeat_interval = absl::Milliseconds(100);
    ro.membership.expiry = absl::Milliseconds(600);
    absl::StatusOr<std::unique_ptr<RouterServer>> r = RouterServer::Start(placement, ro);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *std::move(r) : nullptr;
  };

  // No router yet: everything starts anyway.
  std::vector<std::unique_ptr<ExpertServer>> shards;
  for (int s = 0; s < 2; ++s) {
    absl::StatusOr<std::unique_ptr<ExpertServer>> e = StartReplica(*dir, placement, s, router_addr);
    ASSERT_TRUE(e.ok()) << e.status();
    shards.push_back(*std::move(e));
  }
  DispatcherOptions d;
  d.identity = identity;
  d.step_deadline = absl::Seconds(5);
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher = Dispatcher::Create(config, d);
  ASSERT_TRUE(dispatcher.ok());
  (*dispatcher)->WatchRouter(router_addr);

  std::unique_ptr<Checkpoint> ckpt = *Checkpoint::Open(*dir);
  std::unique_ptr<LocalExperts> all = *LocalExperts::Create(*ckpt, config, AllExperts(config));
  uint64_t seed = 300;
  const auto step = [&]() -> absl::Status {
    const int layer = 1 + static_cast<int>(seed % 3);
    const Batch b = RandomBatch(config, 6, ++seed);
    std::vector<float> got(6 * config.hidden_size);
    EM_RETURN_IF_ERROR((*dispatcher)->Run(layer, b.x, b.routes, got));
    absl::StatusOr<std::vector<float>> want =
        ExpectedShardedOutput(*all, placement, layer, b, config.hidden_size);
    if (!want.ok()) return want.status();
    if (got != *want) return absl::InternalError(absl::StrCat("wrong output, seed ", seed));
    return absl::OkStatus();
  };
  EXPECT_EQ(step().code(), absl::StatusCode::kUnavailable);  // no placement map yet
  absl::SleepFor(absl::Milliseconds(1500));  // a few failed attempts: the backoffs grow
  EXPECT_FALSE((*dispatcher)->Covered());

  std::unique_ptr<RouterServer> router = start_router();
  ASSERT_NE(router, nullptr);
  // Both replicas register and the dispatcher's watch connects, within the backoff bound
  // (2 s) plus the network's events.
  ASSERT_TRUE((*dispatcher)->WaitCovered(absl::Seconds(10)).ok())
      << "router v" << router->service().version();
  ASSERT_TRUE(step().ok());

  // The router goes away mid-run: steps keep being served on the open streams.
  router.reset();
  const absl::Time down = absl::Now();
  while (absl::Now() - down < absl::Milliseconds(1500)) {
    const absl::Status s = step();
    ASSERT_TRUE(s.ok()) << s;
  }
  // It comes back (versions from 1 again): the replicas register again (it forgot them) and
  // the dispatcher follows its map; steps go on succeeding all along.
  router = start_router();
  ASSERT_NE(router, nullptr);
  const bool followed = testing::PollUntil(
      [&] {
        EXPECT_TRUE(step().ok());
        return router->service().version() >= 2 &&
               (*dispatcher)->placement_version() == router->service().version() &&
               (*dispatcher)->Covered();
      },
      absl::Seconds(10), absl::Milliseconds(20));
  ASSERT_TRUE(followed) << "router v" << router->service().version() << ", dispatcher v"
                        << (*dispatcher)->placement_version();
  ASSERT_TRUE(step().ok());
  dispatcher->reset();
  shards.clear();
}

// A placement from a JSON plan that stripes experts over the shards (and differs per
// layer), served by replicas started with explicit expert lists: the same exactness.
TEST(DispatcherPlacementTest, StripedJsonPlacementGivesTheSameOutput) {
  absl::StatusOr<std::string> dir = ShardTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<ModelConfig> config = LoadModelConfig(*dir + "/config.json");
  ASSERT_TRUE(config.ok());
  absl::StatusOr<Placement> placement = PlacementFromJson(
      R"({"num_shards": 3, "layers": {"1": [0,1,2,0,1,2,0,1], "2": [2,2,2,1,1,0,0,0],)"
      R"( "3": [1,0,1,0,2,0,1,0]}})",
      *config);
  ASSERT_TRUE(placement.ok()) << placement.status();
  const v1::PeerIdentity identity = *MakeLocalIdentity(*dir, "test", "striped");
  RouterServerOptions ro;
  ro.identity = identity;
  absl::StatusOr<std::unique_ptr<RouterServer>> router = RouterServer::Start(*placement, ro);
  ASSERT_TRUE(router.ok()) << router.status();
  std::vector<std::unique_ptr<ExpertServer>> shards;
  for (int s = 0; s < 3; ++s) {
    absl::StatusOr<std::unique_ptr<ExpertServer>> e =
        StartReplica(*dir, *placement, s, (*router)->address());
    ASSERT_TRUE(e.ok()) << e.status();
    shards.push_back(*std::move(e));
  }
  // A replica whose experts disagree with the router's plan is refused at start-up.
  ExpertServerOptions wrong;
  wrong.model_dir = *dir;
  wrong.experts = EvenPlacement(*config, 3)->ExpertsOf(0);
  wrong.shard_id = 0;
  wrong.router_address = (*router)->address();
  wrong.live_placement = false;  // a live replica would be told its target instead
  absl::StatusOr<std::unique_ptr<ExpertServer>> refused = ExpertServer::Start(wrong);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();

  DispatcherOptions d;
  d.identity = identity;
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher =
      WatchingDispatcher(*config, d, (*router)->address(), 4);
  ASSERT_TRUE(dispatcher.ok()) << dispatcher.status();
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(*dir);
  ASSERT_TRUE(ckpt.ok());
  absl::StatusOr<std::unique_ptr<LocalExperts>> all =
      LocalExperts::Create(**ckpt, *config, AllExperts(*config));
  ASSERT_TRUE(all.ok());
  for (int layer : {1, 2, 3}) {
    const Batch b = RandomBatch(*config, 11, 40 + layer);
    std::vector<float> got(11 * config->hidden_size);
    ASSERT_TRUE((*dispatcher)->Run(layer, b.x, b.routes, got).ok());
    absl::StatusOr<std::vector<float>> want =
        ExpectedShardedOutput(**all, *placement, layer, b, config->hidden_size);
    ASSERT_TRUE(want.ok());
    EXPECT_EQ(got, *want) << "layer " << layer;
  }
}

// Redundant copies: an expert held by several shard groups goes, per (row, expert) pair, to the
// copy ChooseShards picks; in the exact combine mode the output is LocalExperts' bit for bit,
// the same as without copies. Shard group 2 holds only copies (of every expert of the 2-group
// even plan that groups 0 and 1 split), so the rows it computes all came through the copy choice.
TEST(DispatcherCopiesTest, CopiesGiveTheOutputOfOneCopy) {
  absl::StatusOr<std::string> dir = ShardTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  const ModelConfig config = *LoadModelConfig(*dir + "/config.json");
  const v1::PeerIdentity identity = *MakeLocalIdentity(*dir, "test", "copies");
  std::unique_ptr<Checkpoint> ckpt = *Checkpoint::Open(*dir);
  std::unique_ptr<LocalExperts> all = *LocalExperts::Create(*ckpt, config, AllExperts(config));
  const Placement even = *EvenPlacement(config, 2);
  Placement copies = *EvenPlacement(config, 3);
  std::vector<std::vector<int32_t>> table(even.shard_of.size());
  for (size_t i = 0; i < even.shard_of.size(); ++i) {
    if (even.shard_of[i] >= 0) table[i] = {even.shard_of[i], 2};
  }
  ASSERT_TRUE(copies.SetCopies(table).ok());
  ASSERT_TRUE(copies.HasCopies());
  std::map<std::pair<int, int64_t>, std::vector<float>> outputs[2];  // (layer, rows) -> out
  for (int variant = 0; variant < 2; ++variant) {
    const Placement& placement = variant == 0 ? even : copies;
    SCOPED_TRACE(PlacementToJson(placement));
    RouterServerOptions ro;
    ro.identity = identity;
    ro.membership.heartbeat_interval = absl::Milliseconds(100);
    absl::StatusOr<std::unique_ptr<RouterServer>> router = RouterServer::Start(placement, ro);
    ASSERT_TRUE(router.ok()) << router.status();
    std::vector<MetricsRegistry> metrics(static_cast<size_t>(placement.num_shards));
    std::vector<std::unique_ptr<ExpertServer>> servers;
    for (int s = 0; s < placement.num_shards; ++s) {
      ExpertServerOptions o;
      o.model_dir = *dir;
      o.experts = placement.ExpertsOf(s);
      o.shard_id = s;
      o.router_address = (*router)->address();
      o.instance_id = absl::StrCat("copies", variant, "-shard", s);
      o.metrics = &metrics[static_cast<size_t>(s)];
      absl::StatusOr<std::unique_ptr<ExpertServer>> e = ExpertServer::Start(o);
      ASSERT_TRUE(e.ok()) << e.status();
      servers.push_back(*std::move(e));
    }
    DispatcherOptions d;
    d.identity = identity;
    d.step_deadline = kStepDeadline;
    absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher =
        WatchingDispatcher(config, d, (*router)->address(), (*router)->service().version());
    ASSERT_TRUE(dispatcher.ok()) << dispatcher.status();
    uint64_t seed = 7000;
    ASSERT_NO_FATAL_FAILURE(
        ExpectEqualsLocal(**dispatcher, *all, config, &seed, &outputs[variant]));
    if (variant == 1) {  // the copies-only group computed rows
      EXPECT_GT(metrics[2].GetCounter("expertmesh_expert_rows_total", "Rows computed").value(), 0);
      EXPECT_GT(metrics[0].GetCounter("expertmesh_expert_rows_total", "Rows computed").value(), 0);
    }
    dispatcher->reset();
    servers.clear();
    router->reset();
  }
  EXPECT_EQ(outputs[0], outputs[1]);
}

// A live placement change (router BeginPlacementChange) under a stream of steps: the shards
// load the experts they gain, the router publishes the new map once they hold them, the
// dispatcher switches at a step boundary, and the shards release what they lost after the
// grace period. No step fails and every output equals LocalExperts bit for bit, before,
// during and after the change.
TEST(DispatcherLivePlacementTest, StepsStayExactThroughALivePlacementChange) {
  absl::StatusOr<std::string> dir = ShardTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  const ModelConfig config = *LoadModelConfig(*dir + "/config.json");
  const v1::PeerIdentity identity = *MakeLocalIdentity(*dir, "test", "live-placement");
  std::unique_ptr<Checkpoint> ckpt = *Checkpoint::Open(*dir);
  std::unique_ptr<LocalExperts> all = *LocalExperts::Create(*ckpt, config, AllExperts(config));
  const Placement before = *EvenPlacement(config, 2);
  // After: experts striped over the groups (e % 2), and expert 0 of every layer copied to both.
  Placement after = before;
  std::vector<std::vector<int32_t>> table(before.shard_of.size());
  for (size_t i = 0; i < before.shard_of.size(); ++i) {
    if (before.shard_of[i] < 0) continue;
    const int32_t e = static_cast<int32_t>(i % static_cast<size_t>(before.n_routed_experts));
    table[i] = e == 0 ? std::vector<int32_t>{0, 1} : std::vector<int32_t>{e % 2};
  }
  ASSERT_TRUE(after.SetCopies(table).ok());
  RouterServerOptions ro;
  ro.identity = identity;
  ro.membership.heartbeat_interval = absl::Milliseconds(100);
  ro.membership.expiry = absl::Milliseconds(2000);
  absl::StatusOr<std::unique_ptr<RouterServer>> router = RouterServer::Start(before, ro);
  ASSERT_TRUE(router.ok()) << router.status();
  std::vector<std::unique_ptr<ExpertServer>> servers;
  for (int s = 0; s < 2; ++s) {
    for (int r = 0; r < 2; ++r) {
      ExpertServerOptions o;
      o.model_dir = *dir;
      o.experts = before.ExpertsOf(s);
      o.shard_id = s;
      o.router_address = (*router)->address();
      o.instance_id = absl::StrCat("live-shard", s, "-", r);
      o.release_grace = absl::Milliseconds(500);
      absl::StatusOr<std::unique_ptr<ExpertServer>> e = ExpertServer::Start(o);
      ASSERT_TRUE(e.ok()) << e.status();
      ASSERT_NE((*e)->live_placement(), nullptr);
      servers.push_back(*std::move(e));
    }
  }
  DispatcherOptions d;
  d.identity = identity;
  d.step_deadline = kStepDeadline;
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher =
      WatchingDispatcher(config, d, (*router)->address(), (*router)->service().version());
  ASSERT_TRUE(dispatcher.ok()) << dispatcher.status();
  const uint64_t version_before = (*dispatcher)->placement_version();

  std::atomic<bool> stop{false};
  std::atomic<int> steps{0};
  std::thread stepper([&] {
    uint64_t seed = 50000;
    while (!stop.load()) {
      for (int layer : {1, 2, 3}) {  // one forward: the table is taken at layer 1
        const int64_t n = 1 + static_cast<int64_t>(seed % 9);
        const Batch b = RandomBatch(config, n, ++seed);
        std::vector<float> got(n * config.hidden_size), want(got.size());
        const absl::Status st = (*dispatcher)->Run(layer, b.x, b.routes, got);
        if (!st.ok()) {
          ADD_FAILURE() << "step " << steps.load() << " layer " << layer << ": " << st;
          stop = true;
          return;
        }
        ASSERT_TRUE(all->Run(layer, b.x, b.routes, want).ok());
        if (got != want) {
          ADD_FAILURE() << "step " << steps.load() << " layer " << layer << " differs";
          stop = true;
          return;
        }
      }
      ++steps;
    }
  });
  ASSERT_TRUE(
      testing::PollUntil([&] { return steps.load() >= 5 || stop.load(); }, absl::Seconds(30)));
  ASSERT_TRUE((*router)->service().BeginPlacementChange(after).ok());
  // Committed and published: the dispatcher has a newer map whose groups hold the new plan.
  ASSERT_TRUE(testing::PollUntil(
      [&] {
        for (int s = 0; s < 2; ++s) {
          for (int r = 0; r < 2; ++r) {
            if (servers[static_cast<size_t>(s * 2 + r)]->live_placement()->Held() !=
                after.ExpertsOf(s)) {
              return false;
            }
          }
        }
        return (*dispatcher)->placement_version() > version_before || stop.load();
      },
      absl::Seconds(60)))
      << "the shards did not reach the new placement";
  const int at_commit = steps.load();
  ASSERT_TRUE(testing::PollUntil([&] { return steps.load() >= at_commit + 5 || stop.load(); },
                                 absl::Seconds(30)));
  stop = true;
  stepper.join();
  EXPECT_GT(steps.load(), at_commit);
  for (const auto& server : servers) {
    EXPECT_GE(server->live_placement()->releases(), 1u);
    EXPECT_EQ(server->live_placement()->load_error(), "");
  }
}

// Callback Compute streams hold no thread, so the shard bounds how many are open at once
// (ExpertRequestLimits::max_streams): one more is ended with RESOURCE_EXHAUSTED, and a slot
// freed by a closed stream is usable again.
TEST(ExpertStreamLimitTest, StreamsOverTheLimitAreRefusedAndFreedSlotsReused) {
  absl::StatusOr<std::string> dir = ShardTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<ModelConfig> config = LoadModelConfig(*dir + "/config.json");
  ASSERT_TRUE(config.ok());
  ExpertServerOptions o;
  o.model_dir = *dir;
  o.experts = EvenPlacement(*config, 1)->ExpertsOf(0);
  o.limits.max_streams = 1;
  absl::StatusOr<std::unique_ptr<ExpertServer>> server = ExpertServer::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::ExpertService::NewStub(MakeChannel((*server)->address()));
  const auto deadline = [] { return std::chrono::system_clock::now() + std::chrono::seconds(10); };

  // An empty request is answered in-band with an error: a round trip that proves the stream
  // is open on the server.
  const auto round_trip = [](grpc::ClientReaderWriter<v1::ExpertRequest, v1::ExpertResponse>& s) {
    v1::ExpertRequest req;
    req.set_request_id(7);
    v1::ExpertResponse resp;
    return s.Write(req) && s.Read(&resp) && resp.request_id() == 7 &&
           resp.error_code() == static_cast<int>(absl::StatusCode::kInvalidArgument);
  };
  grpc::ClientContext first_ctx;
  first_ctx.set_deadline(deadline());
  auto first = stub->Compute(&first_ctx);
  ASSERT_TRUE(round_trip(*first));

  grpc::ClientContext second_ctx;
  second_ctx.set_deadline(deadline());
  auto second = stub->Compute(&second_ctx);
  v1::ExpertResponse resp;
  EXPECT_FALSE(second->Read(&resp));
  const grpc::Status refused = second->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();

  ASSERT_TRUE(round_trip(*first));  // the open stream is unaffected
  ASSERT_TRUE(first->WritesDone());
  EXPECT_TRUE(first->Finish().ok());

  // The slot comes back once the server has seen the first stream end.
  bool reopened = false;
  for (int attempt = 0; attempt < 100 && !reopened; ++attempt) {
    grpc::ClientContext ctx;
    ctx.set_deadline(deadline());
    auto again = stub->Compute(&ctx);
    reopened = round_trip(*again);
    again->WritesDone();
    (void)again->Finish();
    if (!reopened) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(reopened);
}

// ---- What only the framed TCP data plane has ---------------------------------------------

// A shard replica whose data plane misbehaves after a correct handshake (the model's
// identity, a kHelloOk frame): to every request it answers
//   kNaN / kInf: outputs of the right size with one NaN / -Inf value,
//   kShortAnswer: one row too few,
//   kWrongFrameType: a well-formed, finite answer of the right size in a kHelloOk frame,
//   kWrongRequestId: the same in a kResponse frame naming another request,
//   kErrorFrame: a kError frame (UNAVAILABLE), then it closes the connection,
//   kInvalidArgument: a kError frame (INVALID_ARGUMENT: "your request is malformed"),
//   kClose: nothing: it closes the connection,
//   kStall: nothing: it keeps the connection open and never answers.
// It runs on a dataplane::FrameServer, except kClose (a FrameServer session always answers
// before it closes), which runs on a plain listener that reads the request and closes.
// Its gRPC address is never dialled (a data-plane replica gets no stream): it registers the
// data plane's own address there.
class FakeDataPlaneShard {
 public:
  enum class Mode {
    kNaN,
    kInf,
    kShortAnswer,
    kWrongFrameType,
    kWrongRequestId,
    kErrorFrame,
    kInvalidArgument,
    kClose,
    kStall
  };
  FakeDataPlaneShard(Mode mode, v1::PeerIdentity identity, int64_t hidden)
      : mode_(mode), identity_(std::move(identity)), hidden_(hidden) {}
  ~FakeDataPlaneShard() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      released_ = true;
    }
    cv_.notify_all();
    if (server_) server_->Stop();
    if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
    if (acceptor_.joinable()) acceptor_.join();
    if (listen_fd_ >= 0) ::close(listen_fd_);
  }

  absl::Status Start(const std::string& router, int shard, const Placement& placement) {
    int port = 0;
    if (mode_ == Mode::kClose) {
      listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      socklen_t len = sizeof a;
      if (listen_fd_ < 0 || ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
          ::listen(listen_fd_, 16) != 0 ||
          ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
        return absl::InternalError("fake data plane: cannot listen");
      }
      port = ntohs(a.sin_port);
      acceptor_ = std::thread([this] { AcceptAndClose(); });
    } else {
      dataplane::FrameServerOptions o;
      o.listen = "127.0.0.1:0";
      absl::StatusOr<std::unique_ptr<dataplane::FrameServer>> server =
          dataplane::FrameServer::Start(o, [this] { return std::make_unique<Session>(this); });
      if (!server.ok()) return server.status();
      server_ = *std::move(server);
      port = server_->port();
    }
    address_ = LoopbackAddress(port);
    return RegisterReplica(router, identity_, shard, placement, address_, address_);
  }
  const std::string& address() const { return address_; }
  int requests() const { return requests_.load(); }  // request frames received

 private:
  class Session final : public dataplane::FrameSession {
   public:
    explicit Session(FakeDataPlaneShard* fake) : fake_(fake) {}
    absl::Status OnFrame(dataplane::FrameType type, std::string_view payload,
                         dataplane::FrameType* reply_type, std::string* reply) override {
      using dataplane::FrameType;
      if (type == FrameType::kHello) {
        *reply_type = FrameType::kHelloOk;
        reply->assign(fake_->HelloAnswer());
        return absl::OkStatus();
      }
      v1::ExpertRequest req;
      if (type != FrameType::kRequest ||
          !req.ParseFromArray(payload.data(), static_cast<int>(payload.size()))) {
        return absl::InvalidArgumentError("fake data plane: not a request");
      }
      ++fake_->requests_;
      switch (fake_->mode_) {
        case Mode::kErrorFrame:
          return absl::UnavailableError("fake data plane: going away");
        case Mode::kInvalidArgument:
          return absl::InvalidArgumentError("fake data plane: malformed request");
        case Mode::kStall: {
          std::unique_lock<std::mutex> lock(fake_->mu_);
          fake_->cv_.wait(lock, [this] { return fake_->released_; });
          return absl::CancelledError("fake data plane: released");
        }
        default:
          break;
      }
      v1::ExpertResponse resp = fake_->Answer(req);
      *reply_type =
          fake_->mode_ == Mode::kWrongFrameType ? FrameType::kHelloOk : FrameType::kResponse;
      resp.SerializeToString(reply);
      return absl::OkStatus();
    }

   private:
    FakeDataPlaneShard* const fake_;
  };

  std::string HelloAnswer() const {
    v1::HandshakeResponse resp;
    *resp.mutable_server() = identity_;
    return resp.SerializeAsString();
  }

  // An answer shaped like a real one (BF16 0.5 everywhere), spoiled as mode_ says.
  v1::ExpertResponse Answer(const v1::ExpertRequest& req) const {
    v1::ExpertResponse resp;
    resp.set_request_id(req.request_id() + (mode_ == Mode::kWrongRequestId ? 1 : 0));
    resp.set_batch_id(req.batch_id());
    resp.set_layer(req.layer());
    const uint32_t short_by = mode_ == Mode::kShortAnswer ? 1 : 0;
    resp.set_n_rows(req.n_rows() - short_by);
    const uint32_t answer_rows =
        (req.combine() == v1::COMBINE_PER_EXPERT ? static_cast<uint32_t>(req.experts_size())
                                                 : req.n_rows()) -
        short_by;
    std::string out(OutputBytes(answer_rows, hidden_), '\0');
    for (size_t i = 0; i + 1 < out.size(); i += 2) out[i + 1] = '\x3F';
    if ((mode_ == Mode::kNaN || mode_ == Mode::kInf) && out.size() >= 4) {
      const size_t at = out.size() - 2 * static_cast<size_t>(hidden_ / 2);
      out[at] = mode_ == Mode::kNaN ? '\xC0' : '\x80';
      out[at + 1] = mode_ == Mode::kNaN ? '\x7F' : '\xFF';
    }
    resp.set_outputs(std::move(out));
    return resp;
  }

  // kClose: per connection, reads the hello and answers it, reads the request, closes.
  void AcceptAndClose() {
    while (true) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) return;  // shut down
      const timeval tv{5, 0};
      ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      const auto read_frame = [fd](dataplane::FrameHeader* h) {
        char header[dataplane::kFrameHeaderBytes];
        if (::recv(fd, header, sizeof header, MSG_WAITALL) != sizeof header) return false;
        absl::StatusOr<dataplane::FrameHeader> d =
            dataplane::DecodeFrameHeader(std::string_view(header, sizeof header), 64u << 20);
        if (!d.ok()) return false;
        *h = *d;
        std::string payload(d->length, '\0');
        return d->length == 0 || ::recv(fd, payload.data(), payload.size(), MSG_WAITALL) ==
                                     static_cast<ssize_t>(payload.size());
      };
      dataplane::FrameHeader h;
      if (read_frame(&h) && h.type == dataplane::FrameType::kHello) {
        const std::string hello = HelloAnswer();
        char header[dataplane::kFrameHeaderBytes];
        dataplane::EncodeFrameHeader(dataplane::FrameType::kHelloOk,
                                     static_cast<uint32_t>(hello.size()), header);
        std::string frame(header, sizeof header);
        frame += hello;
        if (::send(fd, frame.data(), frame.size(), MSG_NOSIGNAL) ==
                static_cast<ssize_t>(frame.size()) &&
            read_frame(&h) && h.type == dataplane::FrameType::kRequest) {
          ++requests_;
        }
      }
      ::close(fd);
    }
  }

  const Mode mode_;
  const v1::PeerIdentity identity_;
  const int64_t hidden_;
  std::string address_;
  std::unique_ptr<dataplane::FrameServer> server_;
  int listen_fd_ = -1;
  std::thread acceptor_;
  std::atomic<int> requests_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool released_ = false;  // under mu_: stalled sessions return
};

// A router (expiry long enough for fakes that never heartbeat), real data-plane replicas and
// a dispatcher for the data-plane tests that build their own shard groups.
struct DataPlaneCluster {
  std::string dir;
  ModelConfig config;
  Placement placement;
  v1::PeerIdentity identity;
  std::unique_ptr<RouterServer> router;
  std::unique_ptr<Checkpoint> ckpt;
  std::unique_ptr<LocalExperts> all;

  void Start(const std::string& name) {
    absl::StatusOr<std::string> d = ShardTestModel();
    ASSERT_TRUE(d.ok()) << d.status();
    dir = *d;
    config = *LoadModelConfig(dir + "/config.json");
    placement = *EvenPlacement(config, 2);
    identity = *MakeLocalIdentity(dir, "test", name);
    RouterServerOptions ro;
    ro.identity = identity;
    ro.membership.heartbeat_interval = absl::Milliseconds(100);
    ro.membership.expiry = absl::Seconds(60);
    absl::StatusOr<std::unique_ptr<RouterServer>> r = RouterServer::Start(placement, ro);
    ASSERT_TRUE(r.ok()) << r.status();
    router = *std::move(r);
    ckpt = *Checkpoint::Open(dir);
    all = *LocalExperts::Create(*ckpt, config, AllExperts(config));
  }
  // One step through `dispatcher`, bitwise LocalExperts or a failure.
  void RunAndCheck(Dispatcher& dispatcher, int layer, int64_t n, uint64_t seed) {
    RunAndCheckStep(dispatcher, config, placement, *all, layer, n, seed);
  }
};

// Shard 1's replicas, in the router's map order: one fake data plane per way of answering
// wrong (NaN, short, Inf, wrong frame type, wrong request id, an error frame, a closed
// connection), then a real data-plane replica. The dispatcher tries them in that order: each
// answer is refused (the NaN, Inf and short ones counted in
// expertmesh_dispatch_bad_answers_total), the request fails over, and the step's output is the
// real replica's, bitwise. The refused replicas are marked failed, so the next steps go straight
// to the real one.
TEST(DispatcherDataPlaneTest, BadAnswersFailOverAndAreCounted) {
  DataPlaneCluster c;
  ASSERT_NO_FATAL_FAILURE(c.Start("dp-bad-answers"));
  std::vector<std::unique_ptr<ExpertServer>> real;
  auto add_real = [&](int shard) {
    absl::StatusOr<std::unique_ptr<ExpertServer>> e = StartReplica(
        c.dir, c.placement, shard, c.router->address(), absl::StrCat("real", shard), true);
    ASSERT_TRUE(e.ok()) << e.status();
    ASSERT_FALSE((*e)->data_address().empty());
    real.push_back(*std::move(e));
  };
  ASSERT_NO_FATAL_FAILURE(add_real(0));
  using Mode = FakeDataPlaneShard::Mode;
  const std::vector<Mode> modes = {Mode::kNaN,
                                   Mode::kShortAnswer,
                                   Mode::kInf,
                                   Mode::kWrongFrameType,
                                   Mode::kWrongRequestId,
                                   Mode::kErrorFrame,
                                   Mode::kClose};
  std::vector<std::unique_ptr<FakeDataPlaneShard>> fakes;
  for (Mode mode : modes) {
    fakes.push_back(std::make_unique<FakeDataPlaneShard>(mode, c.identity, c.config.hidden_size));
    const absl::Status s = fakes.back()->Start(c.router->address(), 1, c.placement);
    ASSERT_TRUE(s.ok()) << s;
  }
  ASSERT_NO_FATAL_FAILURE(add_real(1));  // last in the map

  MetricsRegistry metrics;
  DispatcherOptions d;
  d.identity = c.identity;
  d.step_deadline = absl::Seconds(10);
  d.metrics = &metrics;
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher =
      WatchingDispatcher(c.config, d, c.router->address(), c.router->service().version());
  ASSERT_TRUE(dispatcher.ok()) << dispatcher.status();
  ASSERT_EQ((*dispatcher)->Replicas().size(), 2 + modes.size());
  ASSERT_EQ((*dispatcher)->Replicas().back().address, real[1]->address());

  ASSERT_NO_FATAL_FAILURE(c.RunAndCheck(**dispatcher, 1, 8, 61));
  for (size_t i = 0; i < fakes.size(); ++i) {
    EXPECT_EQ(fakes[i]->requests(), 1) << "fake " << i;  // every fake was asked once
  }
  EXPECT_EQ((*dispatcher)->failovers(), modes.size());
  const std::string text = metrics.RenderText();
  ExpectShard1BadAnswersCounted(text);
  EXPECT_NE(text.find("expertmesh_dispatch_replica_failovers_total{shard=\"1\"} 7"),
            std::string::npos)
      << text;
  ExpectOnlyRealReplicasOpen(**dispatcher, real);
  // Later steps go to the real replica first: no more failovers, the same exactness.
  for (int i = 0; i < 3; ++i)
    ASSERT_NO_FATAL_FAILURE(c.RunAndCheck(**dispatcher, 1 + i, 5, 70 + i));
  EXPECT_EQ((*dispatcher)->failovers(), modes.size());
  for (const auto& f : fakes) EXPECT_EQ(f->requests(), 1);
  dispatcher->reset();
}

// A data-plane replica that takes the request and never answers (a stalled process): the
// request fails over once attempt_timeout has passed, the output is the next replica's bit for
// bit, and the step takes the attempt timeout plus the real work, nowhere near the step
// deadline. The stalled replica is then marked failed: the next steps do not ask it.
TEST(DispatcherDataPlaneTest, StalledReplicaFailsOverAfterTheAttemptTimeout) {
  DataPlaneCluster c;
  ASSERT_NO_FATAL_FAILURE(c.Start("dp-stall"));
  std::vector<std::unique_ptr<ExpertServer>> real;
  absl::StatusOr<std::unique_ptr<ExpertServer>> r0 =
      StartReplica(c.dir, c.placement, 0, c.router->address(), "real0", true);
  ASSERT_TRUE(r0.ok()) << r0.status();
  FakeDataPlaneShard stall(FakeDataPlaneShard::Mode::kStall, c.identity, c.config.hidden_size);
  ASSERT_TRUE(stall.Start(c.router->address(), 1, c.placement).ok());
  absl::StatusOr<std::unique_ptr<ExpertServer>> r1 =
      StartReplica(c.dir, c.placement, 1, c.router->address(), "real1", true);
  ASSERT_TRUE(r1.ok()) << r1.status();

  const absl::Duration attempt = absl::Milliseconds(600);
  DispatcherOptions d;
  d.identity = c.identity;
  d.attempt_timeout = attempt;
  d.step_deadline = absl::Seconds(8);
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher =
      WatchingDispatcher(c.config, d, c.router->address(), c.router->service().version());
  ASSERT_TRUE(dispatcher.ok()) << dispatcher.status();
  ASSERT_EQ((*dispatcher)->Replicas().size(), 3u);
  ASSERT_EQ((*dispatcher)->Replicas()[1].address, stall.address());  // shard 1's first choice

  const absl::Time start = absl::Now();
  ASSERT_NO_FATAL_FAILURE(c.RunAndCheck(**dispatcher, 2, 9, 5));
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(stall.requests(), 1);
  EXPECT_EQ((*dispatcher)->failovers(), 1u);
  EXPECT_GE(took, attempt);
  EXPECT_LT(took, attempt + absl::Seconds(2)) << "the failover waited beyond its timeout";
  // Later steps go to the real replica first (the stalled one is marked failed): it is not
  // asked again and nothing fails over.
  for (int i = 0; i < 3; ++i) {
    ASSERT_NO_FATAL_FAILURE(c.RunAndCheck(**dispatcher, 1 + i, 4, 10 + i));
  }
  EXPECT_EQ(stall.requests(), 1);
  EXPECT_EQ((*dispatcher)->failovers(), 1u);
  dispatcher->reset();
}

// A mixed map: shard 0 on the data plane; shard 1 with one replica on its gRPC stream only and
// one on the data plane. The replicas of shard 1 take turns, so half the steps have one group on
// a stream and the other on the data plane (Run's thread polls the data connection and the
// stream answers' eventfd together): every output is exact and nothing times out. Either
// replica of shard 1 killed: the other serves, exactly.
TEST(DispatcherDataPlaneTest, MixedStreamAndDataPlaneReplicasStayExact) {
  DataPlaneCluster c;
  ASSERT_NO_FATAL_FAILURE(c.Start("dp-mixed"));
  std::vector<std::unique_ptr<MetricsRegistry>> metrics;
  std::vector<std::unique_ptr<ExpertServer>> servers;
  auto add = [&](int shard, bool data_plane) {
    metrics.push_back(std::make_unique<MetricsRegistry>());
    absl::StatusOr<std::unique_ptr<ExpertServer>> e =
        StartReplica(c.dir, c.placement, shard, c.router->address(),
                     absl::StrCat("mixed", servers.size()), data_plane, metrics.back().get());
    ASSERT_TRUE(e.ok()) << e.status();
    servers.push_back(*std::move(e));
  };
  ASSERT_NO_FATAL_FAILURE(add(0, true));   // servers[0]
  ASSERT_NO_FATAL_FAILURE(add(1, false));  // servers[1]: gRPC only
  ASSERT_NO_FATAL_FAILURE(add(1, true));   // servers[2]
  DispatcherOptions d;
  d.identity = c.identity;
  d.step_deadline = absl::Seconds(8);
  d.attempt_timeout = absl::Seconds(3);
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher =
      WatchingDispatcher(c.config, d, c.router->address(), c.router->service().version());
  ASSERT_TRUE(dispatcher.ok()) << dispatcher.status();
  uint64_t seed = 3000;
  for (int i = 0; i < 40; ++i) {
    ASSERT_NO_FATAL_FAILURE(c.RunAndCheck(**dispatcher, 1 + i % 3, 1 + i % 7, ++seed));
  }
  EXPECT_EQ((*dispatcher)->failovers(), 0u);
  EXPECT_GT(RowsComputed(*metrics[1]), 0) << "the stream replica of shard 1 got no work";
  EXPECT_GT(RowsComputed(*metrics[2]), 0) << "the data-plane replica of shard 1 got no work";
  EXPECT_EQ(DataConnections(*metrics[1]), 0);
  EXPECT_EQ(DataConnections(*metrics[2]), 1);

  servers[1]->Kill();  // the stream replica
  for (int i = 0; i < 6; ++i) {
    ASSERT_NO_FATAL_FAILURE(c.RunAndCheck(**dispatcher, 1 + i % 3, 5, ++seed));
  }
  // A new stream replica, then the data-plane one killed: the stream serves shard 1 alone.
  ASSERT_NO_FATAL_FAILURE(add(1, false));  // servers[3]
  ASSERT_TRUE((*dispatcher)->WaitCovered(absl::Seconds(10), c.router->service().version()).ok());
  servers[2]->Kill();
  const double before = RowsComputed(*metrics[3]);
  for (int i = 0; i < 6; ++i) {
    ASSERT_NO_FATAL_FAILURE(c.RunAndCheck(**dispatcher, 1 + i % 3, 5, ++seed));
  }
  EXPECT_GT(RowsComputed(*metrics[3]), before);
  dispatcher->reset();
}

// Connections are pooled: each step's request takes an idle connection of its replica, so
// overlapping steps open at most one per request in flight (2 micro-batches: at most 2 per
// replica), and they stay open for the next steps.
TEST_F(DataPlaneDispatcherTest, OverlappingStepsUseOneConnectionPerRequestInFlight) {
  RunOverlappingMicroBatches(
      6, [](int mb, int step) { return 2 + mb + step; }, 8000);
  EXPECT_EQ(dispatcher_->failovers(), 0u);
  double total = 0;
  for (int s = 0; s < kShards; ++s) {
    for (int r = 0; r < kReplicas; ++r) {
      const double open = DataConnections(ReplicaMetrics(s, r));
      EXPECT_LE(open, 2) << "shard " << s << " replica " << r;
      total += open;
    }
  }
  EXPECT_GE(total, kShards);  // pooled: still open after the steps
}

// max_data_connections_per_replica bounds the connections one replica gets from this
// dispatcher. With 1: two overlapping steps on 2 replicas per shard stay exact (a request that
// finds its chosen replica's only connection in use goes to the other replica's data plane) and
// no replica ever has more than one connection. A step split into more requests per shard group
// than its 2 replicas x 1 connection sends the rest on the replicas' gRPC streams: exact, still
// at most one data connection per replica.
TEST_F(DataPlaneDispatcherTest, ConnectionLimitPerReplicaIsHonoured) {
  DispatcherOptions d;
  d.identity = identity_;
  d.step_deadline = kStepDeadline;
  d.attempt_timeout = absl::Seconds(2);
  d.max_data_connections_per_replica = 1;
  absl::StatusOr<std::unique_ptr<Dispatcher>> one =
      WatchingDispatcher(config_, d, router_->address(), router_->service().version());
  ASSERT_TRUE(one.ok()) << one.status();
  std::atomic<int> max_open{0};
  const auto note_open = [&] {
    for (int s = 0; s < kShards; ++s) {
      for (int r = 0; r < kReplicas; ++r) {
        const int open = static_cast<int>(DataConnections(ReplicaMetrics(s, r)));
        int seen = max_open.load();
        while (open > seen && !max_open.compare_exchange_weak(seen, open)) {
        }
      }
    }
  };
  std::barrier both(2);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int mb = 0; mb < 2; ++mb) {
    threads.emplace_back([&, mb] {
      RoutedExperts* lane = (*one)->MicroBatch(mb);
      for (int step = 0; step < 6; ++step) {
        const int layer = 1 + step % 3;
        const Batch b = RandomBatch(config_, 3 + mb, 9000 + 100 * mb + step);
        std::vector<float> got(b.x.n_rows * config_.hidden_size), want(got.size());
        both.arrive_and_wait();
        const absl::Status st = lane->Run(layer, b.x, b.routes, got);
        if (!st.ok() || !all_->Run(layer, b.x, b.routes, want).ok() || got != want) {
          ADD_FAILURE() << "micro-batch " << mb << " step " << step << ": " << st;
          ++failures;
        }
        note_open();
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(max_open.load(), 1);
  // The bound is per dispatcher: this one's connections close with it before the next.
  one->reset();
  ASSERT_TRUE(testing::PollUntil(
      [&] {
        for (const auto& m : replica_metrics_) {
          if (DataConnections(*m) != 0) return false;
        }
        return true;
      },
      absl::Seconds(5)));
  max_open = 0;

  // One step of 12 rows with at most one row's pairs per request: about 6 requests per shard
  // group at once, more than its 2 replicas x 1 connection.
  d.max_answer_bytes = OutputBytes(config_.num_experts_per_tok, config_.hidden_size);
  absl::StatusOr<std::unique_ptr<Dispatcher>> split =
      WatchingDispatcher(config_, d, router_->address(), router_->service().version());
  ASSERT_TRUE(split.ok()) << split.status();
  const auto requests = [&](int shard) {
    double n = 0;
    for (int r = 0; r < kReplicas; ++r) {
      n += ReplicaMetrics(shard, r)
               .GetCounter("expertmesh_expert_requests_total", "Expert requests by outcome",
                           {{"code", "OK"}})
               .value();
    }
    return n;
  };
  const double before[kShards] = {requests(0), requests(1)};
  for (int i = 0; i < 3; ++i) {
    const Batch b = RandomBatch(config_, 12, 4321 + i);
    std::vector<float> got(12 * config_.hidden_size), want(got.size());
    const absl::Status st = (*split)->Run(1 + i, b.x, b.routes, got);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_TRUE(all_->Run(1 + i, b.x, b.routes, want).ok());
    EXPECT_EQ(got, want);
    note_open();
  }
  for (int s = 0; s < kShards; ++s) {
    EXPECT_GE(requests(s) - before[s], 3 * (kReplicas + 1)) << "shard " << s;
  }
  EXPECT_EQ(max_open.load(), 1);
  EXPECT_EQ((*split)->failovers(), 0u);
}

// A replica restarted on its gRPC address with a data plane on a new port registers again
// (replacing its old registration): the dispatcher follows the new data_address. Shard 1's
// other replica is gone, so a step that used the old data address could not succeed.
TEST_F(DataPlaneDispatcherTest, FollowsAReplicaRestartedOnANewDataPort) {
  RunAndCheck(1, 4, 1);
  const std::string grpc_address = Replica(1, 0).address();
  const std::string old_data = Replica(1, 0).data_address();
  const int grpc_port = Replica(1, 0).port();
  Replica(1, 1).Kill();
  Replica(1, 0).Kill();
  ASSERT_NE(AddReplica(1, LoopbackAddress(grpc_port)), nullptr);
  ExpertServer& restarted = *replicas_.back();
  ASSERT_EQ(restarted.address(), grpc_address);
  ASSERT_NE(restarted.data_address(), old_data) << "the new data plane took the old port";
  // The router expires the other killed replica; the dispatcher's map then lists shard 1's
  // restarted replica alone, with its new data address.
  absl::StatusOr<v1::StatusResponse> status;
  ASSERT_TRUE(testing::PollUntil(
      [&] {
        status = RouterStatus();
        return status.ok() && status->placement().shards(1).replicas_size() == 1 &&
               status->placement().shards(1).replicas(0).data_address() ==
                   restarted.data_address() &&
               dispatcher_->placement_version() == status->placement().version();
      },
      absl::Seconds(10), absl::Milliseconds(20)));
  for (int i = 0; i < 3; ++i) RunAndCheck(1 + i, 5, 20 + i);
  EXPECT_EQ(DataConnections(*replica_metrics_.back()), 1);
}

// data_plane = false: every request goes on the gRPC streams although the replicas advertise
// data addresses (no data connection is opened); the fixture's dispatcher (data_plane on)
// uses them.
TEST_F(DataPlaneDispatcherTest, DataPlaneOffUsesTheStreams) {
  DispatcherOptions d;
  d.identity = identity_;
  d.step_deadline = kStepDeadline;
  d.data_plane = false;
  absl::StatusOr<std::unique_ptr<Dispatcher>> grpc_only =
      WatchingDispatcher(config_, d, router_->address(), router_->service().version());
  ASSERT_TRUE(grpc_only.ok()) << grpc_only.status();
  for (int i = 0; i < 2 * kReplicas; ++i) {
    const Batch b = RandomBatch(config_, 5, 600 + i);
    std::vector<float> got(5 * config_.hidden_size), want(got.size());
    ASSERT_TRUE((*grpc_only)->Run(1 + i % 3, b.x, b.routes, got).ok());
    ASSERT_TRUE(all_->Run(1 + i % 3, b.x, b.routes, want).ok());
    EXPECT_EQ(got, want);
  }
  for (const Dispatcher::ReplicaState& r : (*grpc_only)->Replicas()) {
    EXPECT_TRUE(r.open) << r.replica_id;  // its stream
  }
  double open = 0;
  for (const auto& m : replica_metrics_) open += DataConnections(*m);
  EXPECT_EQ(open, 0);
  for (int i = 0; i < 2 * kReplicas; ++i) RunAndCheck(1, 5, 700 + i);  // data plane on
  for (const auto& m : replica_metrics_) EXPECT_EQ(DataConnections(*m), 1);
}

// Shard replicas that refuse data-plane connections over their own bound
// (ExpertRequestLimits::max_data_connections = 1: a kError RESOURCE_EXHAUSTED frame, then
// close) while a step has more requests in flight on them (a group split into about 6 requests
// per shard): the requests that get no connection go on the replicas' gRPC streams (gRPC is the
// fallback data plane) and the step is exact; the request already on that stream is not cut
// when a later one is refused a connection.
TEST(DispatcherDataPlaneTest, RequestsRefusedADataConnectionTakeTheStream) {
  DataPlaneCluster c;
  ASSERT_NO_FATAL_FAILURE(c.Start("dp-refused"));
  std::vector<std::unique_ptr<MetricsRegistry>> metrics;
  std::vector<std::unique_ptr<ExpertServer>> servers;
  for (int s = 0; s < 2; ++s) {
    metrics.push_back(std::make_unique<MetricsRegistry>());
    ExpertServerOptions o;
    o.model_dir = c.dir;
    o.experts = c.placement.ExpertsOf(s);
    o.shard_id = s;
    o.router_address = c.router->address();
    o.instance_id = absl::StrCat("refusing", s);
    o.data_listen = "127.0.0.1:0";
    o.limits.max_data_connections = 1;
    o.metrics = metrics.back().get();
    absl::StatusOr<std::unique_ptr<ExpertServer>> e = ExpertServer::Start(o);
    ASSERT_TRUE(e.ok()) << e.status();
    servers.push_back(*std::move(e));
  }
  DispatcherOptions d;
  d.identity = c.identity;
  d.step_deadline = absl::Seconds(8);
  d.max_answer_bytes = OutputBytes(c.config.num_experts_per_tok, c.config.hidden_size);
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher =
      WatchingDispatcher(c.config, d, c.router->address(), c.router->service().version());
  ASSERT_TRUE(dispatcher.ok()) << dispatcher.status();
  for (int i = 0; i < 3; ++i) {
    ASSERT_NO_FATAL_FAILURE(c.RunAndCheck(**dispatcher, 1 + i, 12, 100 + i));
  }
  EXPECT_EQ((*dispatcher)->failovers(), 0u);
  for (int s = 0; s < 2; ++s) {
    MetricsRegistry& m = *metrics[static_cast<size_t>(s)];
    EXPECT_GT(m.GetCounter("expertmesh_expert_data_connections_refused_total",
                           "Data-plane connections refused over --max-data-connections")
                  .value(),
              0)
        << "shard " << s << " never refused a connection: the test did not test the fallback";
    EXPECT_LE(DataConnections(m), 1) << "shard " << s;
  }
}

// An error frame that says the request itself is wrong (INVALID_ARGUMENT: every replica would
// say so) is not failed over, as on the streams: the step fails with that code, naming the
// shard and the replica, and the next replica is not asked.
TEST(DispatcherDataPlaneTest, InvalidArgumentErrorFrameFailsTheStep) {
  DataPlaneCluster c;
  ASSERT_NO_FATAL_FAILURE(c.Start("dp-invalid"));
  absl::StatusOr<std::unique_ptr<ExpertServer>> r0 =
      StartReplica(c.dir, c.placement, 0, c.router->address(), "real0", true);
  ASSERT_TRUE(r0.ok()) << r0.status();
  FakeDataPlaneShard fake(FakeDataPlaneShard::Mode::kInvalidArgument, c.identity,
                          c.config.hidden_size);
  ASSERT_TRUE(fake.Start(c.router->address(), 1, c.placement).ok());
  MetricsRegistry real_metrics;
  absl::StatusOr<std::unique_ptr<ExpertServer>> r1 =
      StartReplica(c.dir, c.placement, 1, c.router->address(), "real1", true, &real_metrics);
  ASSERT_TRUE(r1.ok()) << r1.status();
  DispatcherOptions d;
  d.identity = c.identity;
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher =
      WatchingDispatcher(c.config, d, c.router->address(), c.router->service().version());
  ASSERT_TRUE(dispatcher.ok()) << dispatcher.status();
  ASSERT_EQ((*dispatcher)->Replicas()[1].address, fake.address());  // shard 1's first choice
  const Batch b = RandomBatch(c.config, 6, 17);
  std::vector<float> out(6 * c.config.hidden_size);
  const absl::Status s = (*dispatcher)->Run(1, b.x, b.routes, out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("shard 1"), std::string::npos) << s;
  EXPECT_NE(s.message().find("malformed request"), std::string::npos) << s;
  EXPECT_EQ(fake.requests(), 1);
  EXPECT_EQ((*dispatcher)->failovers(), 0u);
  EXPECT_EQ(RowsComputed(real_metrics), 0);
  dispatcher->reset();
}

// A TCP relay in front of a shard's data port that, when armed, swallows the next request
// sent on a connection it has already forwarded a request on and closes that connection
// without an answer: what a dispatcher sees when the replica closes a pooled connection (idle
// timeout, eviction at its connection bound) in the moment the dispatcher takes it.
class CuttingRelay {
 public:
  CuttingRelay() {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (listen_fd_ >= 0 && ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
        ::listen(listen_fd_, 16) == 0 &&
        ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
      port_ = ntohs(a.sin_port);
    }
  }
  ~CuttingRelay() {
    stop_ = true;
    if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
    if (acceptor_.joinable()) acceptor_.join();
    if (listen_fd_ >= 0) ::close(listen_fd_);
    std::lock_guard<std::mutex> lock(mu_);
    for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    for (std::thread& t : pumps_) t.join();
    for (int fd : fds_) ::close(fd);
  }
  int port() const { return port_; }
  void Forward(int upstream_port) {
    upstream_port_ = upstream_port;
    acceptor_ = std::thread([this] { AcceptLoop(); });
  }
  void ArmCut() { armed_ = true; }
  int cuts() const { return cuts_.load(); }

 private:
  void AcceptLoop() {
    while (!stop_) {
      const int client = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (client < 0) return;
      const int server = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      a.sin_port = htons(static_cast<uint16_t>(upstream_port_));
      if (::connect(server, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
        ::close(client);
        ::close(server);
        continue;
      }
      timeval tv{10, 0};  // no pump blocks for ever
      for (int fd : {client, server}) ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      std::lock_guard<std::mutex> lock(mu_);
      fds_.push_back(client);
      fds_.push_back(server);
      pumps_.emplace_back([this, client, server] { Pump(client, server, true); });
      pumps_.emplace_back([this, client, server] { Pump(server, client, false); });
    }
  }
  // Copies from -> to. Client to server: counts the request frames that begin in a read
  // (each request here is written in one piece and answered before the next), and when armed
  // swallows the second or later one and ends both directions.
  void Pump(int from, int to, bool from_client) {
    char buf[1 << 16];
    int frames = 0;
    while (true) {
      const ssize_t n = ::recv(from, buf, sizeof buf, 0);
      if (n <= 0) break;
      if (from_client && n >= 5 && std::memcmp(buf, "EMD1", 4) == 0 && buf[4] == 3) {
        if (++frames >= 2 && armed_.exchange(false)) {
          cuts_.fetch_add(1);
          break;
        }
      }
      if (::send(to, buf, static_cast<size_t>(n), MSG_NOSIGNAL) != n) break;
    }
    ::shutdown(from, SHUT_RDWR);
    ::shutdown(to, SHUT_RDWR);
  }

  int listen_fd_ = -1;
  int port_ = 0;
  int upstream_port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<bool> armed_{false};
  std::atomic<int> cuts_{0};
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<int> fds_;
  std::vector<std::thread> pumps_;
};

// A pooled data-plane connection that the replica closes as the dispatcher takes it (the
// request goes out, the connection ends without a byte of answer) is not a replica failure:
// the request goes to the same replica again on a fresh connection, once, with no failover,
// and the step's output is exact. Here each shard group has a single replica, so without that
// the step would fail with UNAVAILABLE.
TEST(DispatcherDataPlaneTest, APooledConnectionClosedAsItIsTakenIsResentOnAFreshOne) {
  DataPlaneCluster c;
  ASSERT_NO_FATAL_FAILURE(c.Start("dp-stale-pooled"));
  std::vector<std::unique_ptr<CuttingRelay>> relays;
  std::vector<std::unique_ptr<ExpertServer>> shards;
  for (int shard = 0; shard < 2; ++shard) {
    relays.push_back(std::make_unique<CuttingRelay>());
    ASSERT_GT(relays.back()->port(), 0);
    ExpertServerOptions o;
    o.model_dir = c.dir;
    o.experts = c.placement.ExpertsOf(shard);
    o.shard_id = shard;
    o.router_address = c.router->address();
    o.data_listen = "127.0.0.1:0";
    o.data_advertise_address = LoopbackAddress(relays.back()->port());  // reached through it
    absl::StatusOr<std::unique_ptr<ExpertServer>> e = ExpertServer::Start(o);
    ASSERT_TRUE(e.ok()) << e.status();
    relays.back()->Forward((*e)->data_port());
    shards.push_back(*std::move(e));
  }
  DispatcherOptions d;
  d.identity = c.identity;
  d.step_deadline = absl::Seconds(10);
  d.attempt_timeout = absl::Seconds(5);
  absl::StatusOr<std::unique_ptr<Dispatcher>> dispatcher =
      WatchingDispatcher(c.config, d, c.router->address(), 2);
  ASSERT_TRUE(dispatcher.ok()) << dispatcher.status();
  c.RunAndCheck(**dispatcher, 1, 6, 501);  // each shard's connection is pooled now
  for (int i = 0; i < 3; ++i) {
    for (auto& r : relays) r->ArmCut();
    c.RunAndCheck(**dispatcher, 1 + i % 3, 6, 502 + i);
  }
  for (auto& r : relays) EXPECT_EQ(r->cuts(), 3);
  EXPECT_EQ((*dispatcher)->failovers(), 0u);
  for (const Dispatcher::ReplicaState& r : (*dispatcher)->Replicas()) EXPECT_TRUE(r.open);
  dispatcher->reset();
}

}  // namespace
}  // namespace expertmesh
