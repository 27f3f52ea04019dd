// gRPC plumbing every ExpertMesh service shares: the one place absl::Status maps to
// grpc::Status and back, server start-up (grpc.health.v1 default service, server
// reflection, explicit message-size limits, port 0 support), serving-status control, and a
// grpc.health.v1 client.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "service-common/tls.h"

namespace expertmesh {

// Default limit on one gRPC message, both directions, set explicitly on servers and
// channels (an expert request of 4096 rows at DeepSeek-V3's hidden 7168 is ~29 MiB of FP8).
inline constexpr int kDefaultMaxMessageBytes = 64 << 20;

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);
// google.rpc.Code as carried in a message field (ExpertResponse.error_code) -> absl::Status.
absl::Status StatusFromCode(int code, std::string_view message);

struct ServerOptions {
  std::string listen = "127.0.0.1:0";  // host:port; port 0 = any free port
  int max_message_bytes = kDefaultMaxMessageBytes;
  bool reflection = true;
  int max_sync_threads = 64;  // bounds the sync-API thread pool (one per open stream)
  // Service names grpc.health.v1 also answers for (besides "" = the whole server), e.g.
  // v1::ExpertService::service_full_name(); each follows SetServing().
  std::vector<std::string> health_service_names;
  // Credentials of the listening port; null: MakeServerCredentials(ProcessTls()) (mTLS when
  // the service was started with --tls-cert/--tls-key/--tls-ca, insecure otherwise).
  std::shared_ptr<grpc::ServerCredentials> credentials;
};

struct RunningServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;  // the bound port (the one chosen when listen asked for 0)
};

// Starts a server with `services` registered, the default grpc.health.v1 service (status
// NOT_SERVING until SetServing(true)) and server reflection. Credentials: options.credentials,
// else the process-wide TLS setting (service-common/tls.h; insecure by default). An error when the
// address cannot be bound.
absl::StatusOr<RunningServer> StartGrpcServer(const ServerOptions& options,
                                              const std::vector<grpc::Service*>& services);

// Sets grpc.health.v1 status for the whole server ("") and each registered service.
void SetServing(grpc::Server& server, bool serving);

// grpc.health.v1 for probes and load balancers. The overall status (service "") is liveness:
// SERVING while the process runs and is not draining. Each registered service name (e.g.
// expertmesh.v1.AttentionService) is readiness: it follows what the service needs in order to
// serve (the attention service: every shard group has a replica; the gateway: an attention
// replica is ready). SetServing(server, false) ends both when a drain begins.
//
// Liveness on: "" SERVING (a service whose readiness follows its dependencies calls this once
// its gRPC server is up, then SetReady as they change).
void SetLive(grpc::Server& server);
// Readiness of `service` (a name the server registered); the overall status is left alone.
void SetReady(grpc::Server& server, const std::string& service, bool ready);
// Readiness as a peer sees it: Check(service) when the server registers that name, else the
// overall status (a server that predates the split, or registers no name). Errors as
// CheckHealth's.
absl::StatusOr<bool> CheckReady(grpc::Channel& channel, const std::string& service,
                                absl::Duration timeout);

// A channel to target with the message limits set explicitly; credentials null: those of
// the process-wide TLS setting (mTLS under --tls-*, insecure otherwise).
std::shared_ptr<grpc::Channel> MakeChannel(
    const std::string& target, int max_message_bytes = kDefaultMaxMessageBytes,
    std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);

// grpc.health.v1.Health/Check for `service` ("" = the server). OK(true) = SERVING,
// OK(false) = NOT_SERVING or UNKNOWN; an error when the call itself failed.
absl::StatusOr<bool> CheckHealth(grpc::Channel& channel, const std::string& service,
                                 absl::Duration timeout);
// Polls CheckHealth until SERVING or `timeout` passes (DeadlineExceeded).
absl::Status WaitForServing(grpc::Channel& channel, absl::Duration timeout,
                            const std::string& service = "");

// "127.0.0.1:port".
std::string LoopbackAddress(int port);

}  // namespace expertmesh
