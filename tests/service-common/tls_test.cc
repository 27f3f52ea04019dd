// mTLS between services (service-common/tls.h): a CA, server and client certificates made at
// test time with the openssl CLI; real servers on loopback. A TLS server accepts a client
// with a certificate from its CA and refuses one without a certificate or with one from
// another CA; the server's certificate is rotated in place (the Kubernetes Secret way: a
// symlinked directory swapped) while a client calls in a loop: no call fails, and new
// connections see the new certificate. End to end: router and expert-service started with
// --tls-cert/--tls-key/--tls-ca register over mTLS and stop with exit 0 (under ASan too: the
// process-wide credentials are dropped before main returns); partial or unreadable flags are
// refused.
#include <sys/wait.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "expertmesh/v1/router.grpc.pb.h"
#include "gtest/gtest.h"
#include "service-common/bootstrap.h"
#include "service-common/grpc_util.h"
#include "service-common/process.h"
#include "service-common/tls.h"
#include "tests/common/child_log.h"
#include "tests/common/run_command.h"
#include "tests/common/test_pki.h"
#include "tools/launcher/process.h"

namespace expertmesh {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/em-tls-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// <dir>/<name>.crt and .key: a self-signed CA.
void MakeCa(const TempDir& dir, const std::string& name) {
  const absl::Status s = testing::MakeTestCa(dir.path(), name);
  ASSERT_TRUE(s.ok()) << s;
}

// <out_dir>/tls.crt and tls.key signed by CA <ca>, CN = cn, SAN IP:127.0.0.1 and localhost.
void MakeCert(const TempDir& dir, const std::string& ca, const std::string& cn,
              const std::string& out_dir) {
  const absl::Status s =
      testing::MakeTestCert(dir.path(), ca, cn, "IP:127.0.0.1,DNS:localhost", out_dir);
  ASSERT_TRUE(s.ok()) << s;
}

TlsFiles Files(const std::string& cert_dir, const std::string& ca_file) {
  return TlsFiles{.cert = cert_dir + "/tls.crt",
                  .key = cert_dir + "/tls.key",
                  .ca = ca_file,
                  .refresh_interval_s = 1};
}

// A router stub whose GetStatus answers OK: enough to see a call (and its handshake) pass.
class OkService final : public v1::RouterService::Service {
  grpc::Status GetStatus(grpc::ServerContext*, const v1::StatusRequest*,
                         v1::StatusResponse*) override {
    return grpc::Status::OK;
  }
};

// Its own connection (no subchannel shared with other channels of the process).
std::shared_ptr<grpc::Channel> FreshChannel(const std::string& target,
                                            std::shared_ptr<grpc::ChannelCredentials> creds) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);  // a server that starts late
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
  return grpc::CreateCustomChannel(target, creds, args);
}

// GetStatus; the peer certificate's CN in *peer_cn.
grpc::Status Call(grpc::Channel& channel, std::string* peer_cn = nullptr) {
  auto stub =
      v1::RouterService::NewStub(std::shared_ptr<grpc::Channel>(&channel, [](grpc::Channel*) {}));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::StatusRequest req;
  v1::StatusResponse resp;
  grpc::Status s = stub->GetStatus(&ctx, req, &resp);
  if (peer_cn != nullptr && s.ok()) {
    peer_cn->clear();
    for (const auto& v : ctx.auth_context()->FindPropertyValues("x509_common_name")) {
      peer_cn->assign(v.data(), v.size());
    }
  }
  return s;
}

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MakeCa(dir_, "ca");
    MakeCa(dir_, "other-ca");
    MakeCert(dir_, "ca", "server-1", dir_ / "server-v1");
    MakeCert(dir_, "ca", "client", dir_ / "client");
    MakeCert(dir_, "other-ca", "intruder", dir_ / "intruder");
    // The server reads <dir>/server/tls.*, server -> server-v1 (as a mounted Secret does).
    fs::create_directory_symlink(dir_ / "server-v1", dir_ / "server");
  }

  RunningServer Start() {
    ServerOptions options;
    options.credentials = MakeServerCredentials(Files(dir_ / "server", dir_ / "ca.crt"));
    absl::StatusOr<RunningServer> running = StartGrpcServer(options, {&service_});
    EXPECT_TRUE(running.ok()) << running.status();
    return std::move(*running);
  }

  TempDir dir_;
  OkService service_;
};

TEST_F(TlsTest, AcceptsAClientWithACertificateFromTheCa) {
  RunningServer server = Start();
  auto channel = FreshChannel(LoopbackAddress(server.port),
                              MakeChannelCredentials(Files(dir_ / "client", dir_ / "ca.crt")));
  std::string cn;
  const grpc::Status s = Call(*channel, &cn);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(cn, "server-1");
  server.server->Shutdown();
}

TEST_F(TlsTest, RefusesClientsWithoutACertificateOrFromAnotherCa) {
  RunningServer server = Start();
  const std::string target = LoopbackAddress(server.port);
  // TLS that trusts the server, but presents no certificate.
  std::ifstream ca_in(dir_ / "ca.crt");
  grpc::SslCredentialsOptions no_cert;
  no_cert.pem_root_certs.assign(std::istreambuf_iterator<char>(ca_in), {});
  EXPECT_FALSE(Call(*FreshChannel(target, grpc::SslCredentials(no_cert))).ok());
  // A certificate from another CA (the client itself trusts the server's CA).
  EXPECT_FALSE(
      Call(*FreshChannel(target, MakeChannelCredentials(Files(dir_ / "intruder", dir_ / "ca.crt"))))
          .ok());
  // Plaintext.
  EXPECT_FALSE(Call(*FreshChannel(target, grpc::InsecureChannelCredentials())).ok());
  // And a client that does not trust the server's CA refuses the server.
  EXPECT_FALSE(Call(*FreshChannel(target, MakeChannelCredentials(
                                              Files(dir_ / "client", dir_ / "other-ca.crt"))))
                   .ok());
  server.server->Shutdown();
}

TEST_F(TlsTest, RotatedServerCertificateIsServedWithoutARestartAndNoCallFails) {
  RunningServer server = Start();
  const std::string target = LoopbackAddress(server.port);
  const TlsFiles client = Files(dir_ / "client", dir_ / "ca.crt");
  std::atomic<bool> stop{false};
  std::atomic<int> calls{0}, failures{0};
  std::thread caller([&] {
    auto channel = FreshChannel(target, MakeChannelCredentials(client));
    while (!stop.load()) {
      if (!Call(*channel).ok()) failures.fetch_add(1);
      calls.fetch_add(1);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  while (calls.load() < 20) std::this_thread::sleep_for(std::chrono::milliseconds(10));

  // A new pair from the same CA, swapped in atomically.
  MakeCert(dir_, "ca", "server-2", dir_ / "server-v2");
  fs::create_directory_symlink(dir_ / "server-v2", dir_ / "server.tmp");
  fs::rename(dir_ / "server.tmp", dir_ / "server");

  // New connections see it within a few refresh intervals (1 s).
  std::string cn;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    const grpc::Status s = Call(*FreshChannel(target, MakeChannelCredentials(client)), &cn);
    EXPECT_TRUE(s.ok()) << s.error_message();
    if (cn == "server-2") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_EQ(cn, "server-2");
  const int before = calls.load();
  while (calls.load() < before + 20) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  stop = true;
  caller.join();
  EXPECT_EQ(failures.load(), 0) << "of " << calls.load() << " calls";
  server.server->Shutdown();
}

// --- the process-wide setting and the service binaries ---

// Regression (issue 12, under ASan): the process-wide credentials lived in a function-local
// static made before OpenSSL initialised, so they were destroyed after OpenSSL's atexit clean-up;
// gRPC then shut down with OpenSSL's thread-local keys deleted, the OpenSSL error state of each
// of its threads leaked, and LeakSanitizer turned the services' exit 0 after SIGTERM into 1.
// ServiceMain drops them when it ends (it is the first object of every service's main).
TEST_F(TlsTest, ServiceMainDropsTheProcessCredentialsWhenItEnds) {
  std::weak_ptr<grpc::ServerCredentials> server;
  std::weak_ptr<grpc::ChannelCredentials> channel;
  {
    ServiceMain main("tls-test", "a service main without a command line");
    SetProcessTls(Files(dir_ / "client", dir_ / "ca.crt"));
    server = ProcessServerCredentials();
    channel = ProcessChannelCredentials();
    ASSERT_FALSE(server.expired());
    ASSERT_FALSE(channel.expired());
    EXPECT_EQ(ProcessServerCredentials(), server.lock()) << "built once per process";
  }
  EXPECT_TRUE(server.expired());
  EXPECT_TRUE(channel.expired());
  EXPECT_FALSE(ProcessTls().enabled());
}

using testing::Binary;
using testing::Outcome;
using testing::RunCommand;

const std::string kModel = std::string(EXPERTMESH_SOURCE_DIR) + "/models/expertmesh-tiny";

TEST_F(TlsTest, PartialTlsFlagsAreAUsageErrorAndUnreadableFilesFailToStart) {
  const std::string router =
      Binary("router", "router-service") + " --model " + kModel + " --listen 127.0.0.1:0 ";
  Outcome o = RunCommand("timeout 30 " + router + "--tls-cert " + (dir_ / "client/tls.crt"));
  EXPECT_EQ(o.exit_code, kExitUsage) << o.output;
  EXPECT_NE(o.output.find("--tls-key"), std::string::npos) << o.output;
  EXPECT_NE(o.output.find("--tls-ca"), std::string::npos) << o.output;

  o = RunCommand("timeout 30 " + router + "--tls-cert " + (dir_ / "client/tls.crt") +
                 " --tls-key " + (dir_ / "client/tls.key") + " --tls-ca /nonexistent/ca.pem");
  EXPECT_EQ(o.exit_code, kExitStartFailed) << o.output;
  EXPECT_NE(o.output.find("/nonexistent/ca.pem"), std::string::npos) << o.output;
}

TEST_F(TlsTest, RouterAndExpertServiceRegisterOverMtls) {
  MakeCert(dir_, "ca", "router", dir_ / "router");
  MakeCert(dir_, "ca", "expert", dir_ / "expert");
  const absl::StatusOr<int> port = PickFreePort();
  ASSERT_TRUE(port.ok()) << port.status();
  const std::string router_address = LoopbackAddress(*port);
  auto tls_args = [&](const std::string& who) {
    return std::vector<std::string>{"--tls-cert", dir_ / (who + "/tls.crt"),
                                    "--tls-key",  dir_ / (who + "/tls.key"),
                                    "--tls-ca",   dir_ / "ca.crt"};
  };
  launcher::ProcessSpec router_spec{.name = "router",
                                    .binary = Binary("router", "router-service"),
                                    .args = {"--model", kModel, "--num-shards", "1", "--listen",
                                             router_address, "--heartbeat-interval-ms", "200"},
                                    .log_path = dir_ / "router.log"};
  for (auto& a : tls_args("router")) router_spec.args.push_back(a);
  launcher::ProcessSpec expert_spec{
      .name = "expert",
      .binary = Binary("expert-service", "expert-service"),
      .args = {"--model", kModel, "--shard-id", "0", "--num-shards", "1", "--listen", "127.0.0.1:0",
               "--router", router_address},
      .log_path = dir_ / "expert.log"};
  for (auto& a : tls_args("expert")) expert_spec.args.push_back(a);

  auto router = launcher::ChildProcess::Start(router_spec);
  ASSERT_TRUE(router.ok()) << router.status();
  auto expert = launcher::ChildProcess::Start(expert_spec);
  ASSERT_TRUE(expert.ok()) << expert.status();

  // A new connection each try (a channel that failed before the router listened backs off).
  const auto client_credentials = MakeChannelCredentials(Files(dir_ / "client", dir_ / "ca.crt"));
  int replicas = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (replicas == 0 && std::chrono::steady_clock::now() < deadline) {
    auto stub = v1::RouterService::NewStub(FreshChannel(router_address, client_credentials));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    v1::StatusRequest req;
    v1::StatusResponse resp;
    if (stub->GetStatus(&ctx, req, &resp).ok()) {
      for (const auto& shard : resp.placement().shards()) replicas += shard.replicas_size();
    }
    if (replicas == 0) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_EQ(replicas, 1);
  // A plaintext client is refused by the router.
  EXPECT_FALSE(Call(*FreshChannel(router_address, grpc::InsecureChannelCredentials())).ok());
  if (replicas == 0) {
    std::ifstream r(dir_ / "router.log"), e(dir_ / "expert.log");
    ADD_FAILURE() << "router log:\n"
                  << std::string(std::istreambuf_iterator<char>(r), {}) << "\nexpert log:\n"
                  << std::string(std::istreambuf_iterator<char>(e), {});
  }
  // Exit 0 after SIGTERM; otherwise the failure shows the log's end or the sanitizer report.
  auto expect_stopped = [](launcher::ChildProcess& process, const std::string& log_path) {
    const absl::Status stopped = process.Stop(absl::Seconds(10));
    EXPECT_TRUE(stopped.ok()) << stopped << "\n" << testing::ChildLogReport(log_path);
  };
  expect_stopped(**expert, expert_spec.log_path);
  expect_stopped(**router, router_spec.log_path);
}

}  // namespace
}  // namespace expertmesh
