// AttentionPool targets and membership: parsing of host:port / dns:///name:port /
// dns://server/name:port, resolution through a DNS server on loopback (tests/cluster/
// elasticity_dns.h) and through the system resolver, members joining and leaving as the DNS
// answers change, and a Submit refused before its first event opened again on another replica
// (against small AttentionService servers speaking the real protocol, one of them draining).
// Serving through dynamic members of real attention replicas is in tests/cluster/elasticity_test.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>

#include "gateway/attention_pool.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service-common/grpc_util.h"
#include "service-common/process.h"
#include "service-common/tls.h"
#include "tests/cluster/elasticity_dns.h"
#include "tests/common/test_pki.h"

namespace expertmesh::gateway {
namespace {

using ::testing::ElementsAre;

std::vector<std::string> Addresses(const AttentionPool& pool) {
  std::vector<std::string> out;
  for (const AttentionPool::ReplicaState& r : pool.Snapshot()) out.push_back(r.address);
  std::sort(out.begin(), out.end());
  return out;
}

TEST(AttentionTargetTest, Parses) {
  absl::StatusOr<AttentionTarget> t = ParseAttentionTarget("attention-0:7100");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE(t->dns);
  EXPECT_EQ(t->host, "attention-0:7100");

  t = ParseAttentionTarget("dns:///attention.default.svc.cluster.local:7100");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE(t->dns);
  EXPECT_EQ(t->authority, "");
  EXPECT_EQ(t->host, "attention.default.svc.cluster.local");
  EXPECT_EQ(t->port, 7100);

  t = ParseAttentionTarget("dns://10.0.0.10:53/attention:7100");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->authority, "10.0.0.10:53");
  EXPECT_EQ(t->host, "attention");

  for (const char* bad : {"attention", "attention:0", "attention:70000", "dns://attention:7100",
                          "dns:///attention", "http://attention:7100", ":7100"}) {
    EXPECT_EQ(ParseAttentionTarget(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(AttentionTargetTest, ResolvesThroughADnsServer) {
  absl::StatusOr<std::unique_ptr<testing::LoopbackDns>> dns = testing::LoopbackDns::Start();
  ASSERT_TRUE(dns.ok()) << dns.status();
  (*dns)->Set("attention.test", {"127.0.0.3", "127.0.0.2"});
  const std::string server = "127.0.0.1:" + std::to_string((*dns)->port());
  absl::StatusOr<AttentionTarget> t =
      ParseAttentionTarget("dns://" + server + "/attention.test:7100");
  ASSERT_TRUE(t.ok());
  absl::StatusOr<std::vector<std::string>> got =
      ResolveAttentionTarget(*t, std::chrono::milliseconds(2000));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(*got, ElementsAre("127.0.0.2:7100", "127.0.0.3:7100"));

  // A name that does not exist, and one without records: NotFound (no replicas).
  t = ParseAttentionTarget("dns://" + server + "/missing.test:7100");
  EXPECT_EQ(ResolveAttentionTarget(*t, std::chrono::milliseconds(2000)).status().code(),
            absl::StatusCode::kNotFound);
  (*dns)->Set("empty.test", {});
  t = ParseAttentionTarget("dns://" + server + "/empty.test:7100");
  EXPECT_EQ(ResolveAttentionTarget(*t, std::chrono::milliseconds(2000)).status().code(),
            absl::StatusCode::kNotFound);

  // A DNS server that does not answer: Unavailable (the pool keeps its last members).
  const int silent = socket(AF_INET, SOCK_DGRAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(silent, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  socklen_t len = sizeof addr;
  getsockname(silent, reinterpret_cast<sockaddr*>(&addr), &len);
  t = ParseAttentionTarget("dns://127.0.0.1:" + std::to_string(ntohs(addr.sin_port)) +
                           "/attention.test:7100");
  EXPECT_EQ(ResolveAttentionTarget(*t, std::chrono::milliseconds(1000)).status().code(),
            absl::StatusCode::kUnavailable);
  close(silent);
}

TEST(AttentionTargetTest, ResolvesThroughTheSystemResolver) {
  absl::StatusOr<AttentionTarget> t = ParseAttentionTarget("dns:///localhost:7100");
  ASSERT_TRUE(t.ok());
  absl::StatusOr<std::vector<std::string>> got =
      ResolveAttentionTarget(*t, std::chrono::milliseconds(2000));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_NE(std::find(got->begin(), got->end(), "127.0.0.1:7100"), got->end());
}

TEST(AttentionPoolTest, MembersFollowTheDnsAnswers) {
  absl::StatusOr<std::unique_ptr<testing::LoopbackDns>> dns = testing::LoopbackDns::Start();
  ASSERT_TRUE(dns.ok()) << dns.status();
  absl::StatusOr<int> port = PickFreePort();  // nothing listens there: members stay unready
  ASSERT_TRUE(port.ok());
  const std::string p = std::to_string(*port);
  (*dns)->Set("attention.test", {"127.0.0.2"});
  AttentionPool::Options o;
  o.addresses = {"127.0.0.1:" + p,
                 "dns://127.0.0.1:" + std::to_string((*dns)->port()) + "/attention.test:" + p};
  o.resolve_interval = std::chrono::hours(1);  // resolved by hand below
  o.rpc_timeout = std::chrono::milliseconds(500);
  absl::StatusOr<std::unique_ptr<AttentionPool>> pool = AttentionPool::Create(o);
  ASSERT_TRUE(pool.ok()) << pool.status();
  // The static member and the name's one address (resolved at creation).
  EXPECT_THAT(Addresses(**pool), ElementsAre("127.0.0.1:" + p, "127.0.0.2:" + p));

  (*dns)->Set("attention.test", {"127.0.0.2", "127.0.0.3"});
  (*pool)->ResolveOnce();
  EXPECT_THAT(Addresses(**pool), ElementsAre("127.0.0.1:" + p, "127.0.0.2:" + p, "127.0.0.3:" + p));

  (*dns)->Set("attention.test", {"127.0.0.3"});
  (*pool)->ResolveOnce();
  EXPECT_THAT(Addresses(**pool), ElementsAre("127.0.0.1:" + p, "127.0.0.3:" + p));

  // No records: the name's members go; the static one stays.
  (*dns)->Set("attention.test", {});
  (*pool)->ResolveOnce();
  EXPECT_THAT(Addresses(**pool), ElementsAre("127.0.0.1:" + p));
  EXPECT_FALSE((*pool)->AnyReady());
  EXPECT_EQ(
      (*pool)
          ->Submit(v1::SubmitRequest(), std::chrono::system_clock::now() + std::chrono::seconds(1))
          .status()
          .code(),
      absl::StatusCode::kUnavailable);
}

// An AttentionService that reports `load` and answers every Submit with one final event of
// token 7, or, while `draining`, refuses it with UNAVAILABLE as a draining replica does; with
// `fail_after_first`, it sends one event and then fails the stream with UNAVAILABLE.
class StubReplica final : public v1::AttentionService::Service {
 public:
  explicit StubReplica(uint32_t load) : load_(load) {}
  grpc::Status Submit(grpc::ServerContext*, const v1::SubmitRequest*,
                      grpc::ServerWriter<v1::TokenEvent>* writer) override {
    ++submits;
    if (draining) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "draining");
    v1::TokenEvent event;
    event.add_token_ids(7);
    if (fail_after_first) {
      writer->Write(event);
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "replica went away");
    }
    event.set_finish_reason(v1::FINISH_REASON_LENGTH);
    writer->Write(event);
    return grpc::Status::OK;
  }
  grpc::Status GetLoad(grpc::ServerContext*, const v1::LoadRequest*,
                       v1::LoadResponse* resp) override {
    resp->set_running(load_);
    resp->set_max_context(64);
    return grpc::Status::OK;
  }
  std::atomic<bool> draining{false};
  std::atomic<bool> fail_after_first{false};
  std::atomic<int> submits{0};

 private:
  const uint32_t load_;
};

struct StubServer {
  explicit StubServer(uint32_t load) : service(load) {
    absl::StatusOr<RunningServer> r = StartGrpcServer(ServerOptions{}, {&service});
    EXPECT_TRUE(r.ok()) << r.status();
    running = *std::move(r);
    SetServing(*running.server, true);
  }
  ~StubServer() { running.server->Shutdown(); }
  std::string address() const { return LoopbackAddress(running.port); }
  StubReplica service;
  RunningServer running;
};

TEST(AttentionPoolTest, ARefusedSubmitIsOpenedOnAnotherReplica) {
  // The idle replica is chosen first (least load) but drains, as one does between its SIGTERM
  // and the gateway's next poll.
  StubServer idle(0), busy(5);
  AttentionPool::Options o;
  o.addresses = {idle.address(), busy.address()};
  o.poll_interval = std::chrono::hours(1);  // only the polls below
  absl::StatusOr<std::unique_ptr<AttentionPool>> pool = AttentionPool::Create(o);
  ASSERT_TRUE(pool.ok()) << pool.status();
  (*pool)->PollOnce();
  ASSERT_TRUE((*pool)->WaitReady(std::chrono::seconds(5)));
  idle.service.draining = true;
  const auto deadline = std::chrono::system_clock::now() + std::chrono::seconds(10);
  v1::SubmitRequest request;
  request.set_request_id("r1");
  absl::StatusOr<std::unique_ptr<SubmitCall>> call = (*pool)->Submit(request, deadline);
  ASSERT_TRUE(call.ok()) << call.status();
  v1::TokenEvent event;
  ASSERT_TRUE((*call)->Read(&event));
  EXPECT_EQ(event.token_ids(0), 7);
  EXPECT_EQ((*call)->attempts(), 2);
  EXPECT_EQ((*call)->replica_address(), busy.address());
  EXPECT_FALSE((*call)->Read(&event));
  EXPECT_TRUE((*call)->Finish().ok());
  EXPECT_EQ(idle.service.submits.load(), 1);
  EXPECT_EQ(busy.service.submits.load(), 1);
  call->reset();
  for (const AttentionPool::ReplicaState& r : (*pool)->Snapshot()) EXPECT_EQ(r.outstanding, 0);

  // A stream that failed after its first event is not opened again: the client has tokens.
  busy.service.fail_after_first = true;
  idle.service.draining = false;
  (*pool)->PollOnce();  // the idle replica is ready again
  idle.service.fail_after_first = true;
  call = (*pool)->Submit(request, deadline);
  ASSERT_TRUE(call.ok()) << call.status();
  ASSERT_TRUE((*call)->Read(&event));
  EXPECT_FALSE((*call)->Read(&event));
  EXPECT_EQ((*call)->attempts(), 1);
  EXPECT_EQ((*call)->Finish().code(), absl::StatusCode::kUnavailable);

  // Every replica refusing: the call ends UNAVAILABLE after trying each ready one once.
  idle.service.fail_after_first = false;
  busy.service.fail_after_first = false;
  idle.service.draining = true;
  busy.service.draining = true;
  (*pool)->PollOnce();
  call = (*pool)->Submit(request, deadline);
  ASSERT_TRUE(call.ok()) << call.status();
  EXPECT_FALSE((*call)->Read(&event));
  EXPECT_EQ((*call)->attempts(), 2);
  EXPECT_EQ((*call)->Finish().code(), absl::StatusCode::kUnavailable);
}

// Under mTLS a member found through DNS is dialed by address but its certificate is checked
// against the name (a headless Service's certificate names the Service, not pod IPs). The
// certificate here names only attention.test: the same server listed as 127.0.0.1:port fails
// the check, found as attention.test it passes.
TEST(AttentionPoolTest, DnsMembersAreCheckedUnderTheirNameWithMtls) {
  char tmpl[] = "/tmp/expertmesh-pool-tls-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const absl::Status pki = testing::MakeTestPki(dir, "DNS:attention.test", "attention");
  ASSERT_TRUE(pki.ok()) << pki;
  SetProcessTls(TlsFiles{.cert = dir + "/tls.crt", .key = dir + "/tls.key", .ca = dir + "/ca.crt"});
  {
    StubServer server(0);  // the process-wide mTLS credentials
    absl::StatusOr<std::unique_ptr<testing::LoopbackDns>> dns = testing::LoopbackDns::Start();
    ASSERT_TRUE(dns.ok()) << dns.status();
    (*dns)->Set("attention.test", {"127.0.0.1"});
    AttentionPool::Options o;
    o.addresses = {server.address(), "dns://127.0.0.1:" + std::to_string((*dns)->port()) +
                                         "/attention.test:" + std::to_string(server.running.port)};
    o.poll_interval = std::chrono::hours(1);
    o.rpc_timeout = std::chrono::milliseconds(2000);
    absl::StatusOr<std::unique_ptr<AttentionPool>> pool = AttentionPool::Create(o);
    ASSERT_TRUE(pool.ok()) << pool.status();
    (*pool)->PollOnce();
    const std::vector<AttentionPool::ReplicaState> members = (*pool)->Snapshot();
    ASSERT_EQ(members.size(), 2u);
    EXPECT_FALSE(members[0].ready) << "a certificate without the address passed for it";
    EXPECT_TRUE(members[1].ready) << members[1].last_error;
  }
  SetProcessTls(TlsFiles{});
  std::filesystem::remove_all(dir);
}

TEST(AttentionPoolTest, RefusesBadTargets) {
  AttentionPool::Options o;
  o.addresses = {"dns:///attention"};
  EXPECT_EQ(AttentionPool::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.addresses = {};
  EXPECT_EQ(AttentionPool::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace expertmesh::gateway
