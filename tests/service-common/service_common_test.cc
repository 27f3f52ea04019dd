// service-common: the metrics registry and its text format, /metrics over real HTTP on
// loopback, the Status mapping, the handshake rule, and grpc.health.v1 on a real server.
#include <fstream>
#include <set>

#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include "core/format/wire.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "service-common/bootstrap.h"
#include "service-common/grpc_util.h"
#include "service-common/handshake.h"
#include "service-common/metrics.h"
#include "service-common/metrics_http.h"
#include "service-common/process.h"

namespace expertmesh {
namespace {

TEST(MetricsTest, TextExposition) {
  MetricsRegistry r;
  r.GetCounter("em_requests_total", "Requests", {{"code", "OK"}}).Inc();
  r.GetCounter("em_requests_total", "Requests", {{"code", "OK"}}).Inc(2);
  r.GetCounter("em_requests_total", "Requests", {{"code", "INVALID_ARGUMENT"}}).Inc();
  r.GetGauge("em_queue", "Queue \"length\"\nnow").Set(-3.5);
  Histogram& h = r.GetHistogram("em_latency_seconds", "Latency", {0.1, 1.0}, {{"layer", "a\"b"}});
  h.Observe(0.05);
  h.Observe(0.1);  // le is inclusive
  h.Observe(0.5);
  h.Observe(7.0);
  const std::string text = r.RenderText();
  EXPECT_NE(text.find("# HELP em_requests_total Requests\n# TYPE em_requests_total counter\n"),
            std::string::npos);
  EXPECT_NE(text.find("em_requests_total{code=\"OK\"} 3\n"), std::string::npos) << text;
  EXPECT_NE(text.find("em_requests_total{code=\"INVALID_ARGUMENT\"} 1\n"), std::string::npos);
  EXPECT_NE(
      text.find("# HELP em_queue Queue \"length\"\\nnow\n# TYPE em_queue gauge\nem_queue -3.5\n"),
      std::string::npos)
      << text;
  EXPECT_NE(text.find("em_latency_seconds_bucket{layer=\"a\\\"b\",le=\"0.10000000000000001\"} 2\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("em_latency_seconds_bucket{layer=\"a\\\"b\",le=\"1\"} 3\n"),
            std::string::npos);
  EXPECT_NE(text.find("em_latency_seconds_bucket{layer=\"a\\\"b\",le=\"+Inf\"} 4\n"),
            std::string::npos);
  EXPECT_NE(text.find("em_latency_seconds_sum{layer=\"a\\\"b\"} 7.6500000000000004\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("em_latency_seconds_count{layer=\"a\\\"b\"} 4\n"), std::string::npos);
  // Families are sorted by name.
  EXPECT_LT(text.find("em_latency_seconds"), text.find("em_queue"));
  EXPECT_LT(text.find("em_queue"), text.find("em_requests_total"));
}

TEST(MetricsTest, CountersIgnoreNegativeIncrementsAndCollectorsRunAtScrape) {
  MetricsRegistry r;
  Counter& c = r.GetCounter("em_c", "c");
  c.Inc(-5);
  EXPECT_EQ(c.value(), 0.0);
  int calls = 0;
  r.AddCollector([&] { r.GetGauge("em_g", "g").Set(++calls); });
  EXPECT_NE(r.RenderText().find("em_g 1\n"), std::string::npos);
  EXPECT_NE(r.RenderText().find("em_g 2\n"), std::string::npos);
}

TEST(MetricsTest, HistogramQuantileInterpolatesWithinBuckets) {
  Histogram h({1.0, 2.0, 4.0});
  EXPECT_EQ(h.Quantile(0.5), 0.0);              // empty
  for (int i = 0; i < 10; ++i) h.Observe(1.5);  // all in (1, 2]
  EXPECT_DOUBLE_EQ(h.Quantile(0.5), 1.5);
  EXPECT_DOUBLE_EQ(h.Quantile(1.0), 2.0);
  h.Observe(100.0);  // +Inf bucket reports the largest finite bound
  EXPECT_DOUBLE_EQ(h.Quantile(1.0), 4.0);
}

TEST(MetricsHttpTest, ServesMetricsAnd404) {
  MetricsRegistry r;
  r.GetCounter("em_hits_total", "Hits").Inc(41);
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> server =
      MetricsHttpServer::Start(&r, "127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->port(), 0);
  absl::StatusOr<std::string> body = HttpGet("127.0.0.1", (*server)->port(), "/metrics");
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_NE(body->find("em_hits_total 41\n"), std::string::npos);
  r.GetCounter("em_hits_total", "Hits").Inc();
  body = HttpGet("127.0.0.1", (*server)->port(), "/metrics?x=1");
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_NE(body->find("em_hits_total 42\n"), std::string::npos);
  absl::StatusOr<std::string> missing = HttpGet("127.0.0.1", (*server)->port(), "/nope");
  EXPECT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("404"), std::string::npos);
}

TEST(GrpcUtilTest, StatusMappingKeepsCodeAndMessage) {
  const absl::Status s = absl::FailedPreconditionError("other model");
  const grpc::Status g = ToGrpcStatus(s);
  EXPECT_EQ(g.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(g.error_message(), "other model");
  EXPECT_EQ(FromGrpcStatus(g), s);
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_EQ(StatusFromCode(14, "x"), absl::UnavailableError("x"));
  EXPECT_TRUE(StatusFromCode(0, "").ok());
  EXPECT_EQ(StatusFromCode(99, "x").code(), absl::StatusCode::kUnknown);
}

TEST(HandshakeTest, SameModelAndProtocolOnly) {
  v1::PeerIdentity local;
  local.set_model_name("tiny");
  local.set_model_fingerprint(ModelFingerprint("{}"));
  local.set_protocol_version(kProtocolVersion);
  local.set_service("router");
  v1::PeerIdentity remote = local;
  remote.set_service("expert-service");
  EXPECT_TRUE(CheckPeer(local, remote).ok());
  v1::PeerIdentity other_model = remote;
  other_model.set_model_fingerprint(ModelFingerprint("{\"x\":1}"));
  EXPECT_EQ(CheckPeer(local, other_model).code(), absl::StatusCode::kFailedPrecondition);
  v1::PeerIdentity other_protocol = remote;
  other_protocol.set_protocol_version(kProtocolVersion + 1);
  EXPECT_EQ(CheckPeer(local, other_protocol).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(CheckPeer(local, v1::PeerIdentity{}).code(), absl::StatusCode::kFailedPrecondition);
}

// A service with nothing implemented: enough to host health and reflection.
class EmptyRouter final : public v1::RouterService::Service {};

TEST(GrpcUtilTest, HealthIsNotServingUntilSetAndReflectsChanges) {
  EmptyRouter service;
  ServerOptions options;
  options.health_service_names = {v1::RouterService::service_full_name()};
  absl::StatusOr<RunningServer> server = StartGrpcServer(options, {&service});
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT(server->port, 0);
  absl::StatusOr<bool> named = CheckHealth(*MakeChannel(LoopbackAddress(server->port)),
                                           "expertmesh.v1.RouterService", absl::Seconds(5));
  ASSERT_TRUE(named.ok()) << named.status();
  EXPECT_FALSE(*named);
  auto channel = MakeChannel(LoopbackAddress(server->port));
  absl::StatusOr<bool> serving = CheckHealth(*channel, "", absl::Seconds(5));
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_FALSE(*serving);
  SetServing(*server->server, true);
  serving = CheckHealth(*channel, "", absl::Seconds(5));
  ASSERT_TRUE(serving.ok());
  EXPECT_TRUE(*serving);
  serving = CheckHealth(*channel, "expertmesh.v1.RouterService", absl::Seconds(5));
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_TRUE(*serving);
  EXPECT_TRUE(WaitForServing(*channel, absl::Seconds(5)).ok());
  // An unknown service name is NOT_FOUND from the health service.
  EXPECT_EQ(CheckHealth(*channel, "no.such.Service", absl::Seconds(5)).status().code(),
            absl::StatusCode::kNotFound);
  SetServing(*server->server, false);
  EXPECT_FALSE(*CheckHealth(*channel, "", absl::Seconds(5)));
  server->server->Shutdown();
  // Nothing listens any more: the call itself fails.
  EXPECT_FALSE(CheckHealth(*channel, "", absl::Milliseconds(500)).ok());
}

// Liveness and readiness apart (bootstrap.h): "" says the process is up, the name follows the
// service's dependencies; a drain (SetServing false) ends both; CheckReady asks the name and
// falls back to "" for a server that does not register it.
TEST(GrpcUtilTest, LivenessIsTheOverallStatusAndReadinessTheName) {
  EmptyRouter service;
  ServerOptions options;
  const std::string name = v1::RouterService::service_full_name();
  options.health_service_names = {name};
  absl::StatusOr<RunningServer> server = StartGrpcServer(options, {&service});
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = MakeChannel(LoopbackAddress(server->port));
  auto health = [&](const std::string& service) {
    absl::StatusOr<bool> s = CheckHealth(*channel, service, absl::Seconds(5));
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() && *s;
  };
  SetLive(*server->server);
  EXPECT_TRUE(health(""));
  EXPECT_FALSE(health(name));
  absl::StatusOr<bool> ready = CheckReady(*channel, name, absl::Seconds(5));
  ASSERT_TRUE(ready.ok()) << ready.status();
  EXPECT_FALSE(*ready);
  // A name the server does not register: the overall status answers.
  ready = CheckReady(*channel, "no.such.Service", absl::Seconds(5));
  ASSERT_TRUE(ready.ok()) << ready.status();
  EXPECT_TRUE(*ready);
  SetReady(*server->server, name, true);
  EXPECT_TRUE(health(name));
  EXPECT_TRUE(*CheckReady(*channel, name, absl::Seconds(5)));
  SetReady(*server->server, name, false);  // a dependency lost: still live
  EXPECT_FALSE(health(name));
  EXPECT_TRUE(health(""));
  SetServing(*server->server, false);  // a drain: neither
  EXPECT_FALSE(health(name));
  EXPECT_FALSE(health(""));
  server->server->Shutdown();
}

// grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo with list_services, over a
// generic bidi call (no generated reflection stubs ship with the Debian packages): the
// request is field 7 (list_services) = ""; the answer names the registered services.
TEST(GrpcUtilTest, ReflectionListsTheServices) {
  EmptyRouter service;
  absl::StatusOr<RunningServer> server = StartGrpcServer(ServerOptions{}, {&service});
  ASSERT_TRUE(server.ok()) << server.status();
  grpc::GenericStub stub(MakeChannel(LoopbackAddress(server->port)));
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  ASSERT_NE(call, nullptr);
  void* tag;
  bool ok;
  auto step = [&](intptr_t want) {
    EXPECT_TRUE(cq.Next(&tag, &ok));
    EXPECT_EQ(reinterpret_cast<intptr_t>(tag), want);
    return ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(step(1));
  const std::string request("\x3a\x00", 2);
  grpc::Slice slice(request);
  grpc::ByteBuffer out(&slice, 1);
  call->Write(out, reinterpret_cast<void*>(2));
  ASSERT_TRUE(step(2));
  grpc::ByteBuffer in;
  call->Read(&in, reinterpret_cast<void*>(3));
  ASSERT_TRUE(step(3));
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(in.Dump(&slices).ok());
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_NE(bytes.find("expertmesh.v1.RouterService"), std::string::npos);
  EXPECT_NE(bytes.find("grpc.health.v1.Health"), std::string::npos);
  call->WritesDone(reinterpret_cast<void*>(4));
  step(4);
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  step(5);
  EXPECT_TRUE(status.ok()) << status.error_message();
  server->server->Shutdown();
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
}

TEST(ProcessTest, FreePortIsBindable) {
  absl::StatusOr<int> port = PickFreePort();
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_GT(*port, 0);
  EmptyRouter service;
  ServerOptions o;
  o.listen = LoopbackAddress(*port);
  absl::StatusOr<RunningServer> server = StartGrpcServer(o, {&service});
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_EQ(server->port, *port);
  server->server->Shutdown();
}

// Ports handed to child processes come from below the ephemeral range, so that port-0 binds
// and outgoing connections (which take ephemeral ports) cannot take one before the child binds
// it; and they differ from call to call.
TEST(ProcessTest, FreePortsAreBelowTheEphemeralRange) {
  int low = 0, high = 0;
  std::ifstream range("/proc/sys/net/ipv4/ip_local_port_range");
  if (!(range >> low >> high) || low - 10000 < 1024) {
    GTEST_SKIP() << "no ephemeral port range with room below it on this machine";
  }
  std::set<int> seen;
  for (int i = 0; i < 20; ++i) {
    absl::StatusOr<int> port = PickFreePort();
    ASSERT_TRUE(port.ok()) << port.status();
    EXPECT_GE(*port, 10000);
    EXPECT_LT(*port, low);
    seen.insert(*port);
  }
  EXPECT_GT(seen.size(), 15u);
}

}  // namespace
}  // namespace expertmesh
