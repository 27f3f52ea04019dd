// mTLS between ExpertMesh services (off by default). One place builds the gRPC credentials:
// servers require and verify client certificates against the CA, clients present their
// certificate and verify the server's. Certificates, key and CA are read through gRPC's
// FileWatcherCertificateProvider, so files replaced in place (a rotated Kubernetes Secret)
// take effect on new connections without a restart.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include "absl/status/status.h"

namespace expertmesh {

struct TlsFiles {
  std::string cert;  // PEM certificate chain of this service (server and client side)
  std::string key;   // PEM private key of cert
  std::string ca;    // PEM CA bundle peers' certificates must chain to
  unsigned int refresh_interval_s = 10;  // how often the files are checked for changes

  // All three set; none set means insecure (the default).
  bool enabled() const { return !cert.empty() || !key.empty() || !ca.empty(); }
};

// InvalidArgument naming the missing flag(s) when only some of cert/key/ca are set;
// FailedPrecondition naming the file when one cannot be read or is empty.
absl::Status ValidateTlsFiles(const TlsFiles& files);

// mTLS credentials when files.enabled(), insecure ones otherwise.
std::shared_ptr<grpc::ServerCredentials> MakeServerCredentials(const TlsFiles& files);
std::shared_ptr<grpc::ChannelCredentials> MakeChannelCredentials(const TlsFiles& files);

// The process-wide setting (ServiceMain sets it from --tls-cert/--tls-key/--tls-ca);
// StartGrpcServer and MakeChannel use it unless given credentials explicitly.
void SetProcessTls(const TlsFiles& files);
TlsFiles ProcessTls();
// Back to insecure, dropping the credentials built below (their file watcher, and with the last
// of them gRPC itself). Call it before main returns (ServiceMain's destructor does): the setting
// is a static made before OpenSSL initialises, so left to static destruction it goes after
// OpenSSL's atexit clean-up; gRPC then shuts down with OpenSSL's thread-local keys deleted, and
// the OpenSSL error state of each gRPC thread leaks (LeakSanitizer: exit 1 after SIGTERM).
void ResetProcessTls();
// The credentials of the process-wide setting, built once (one file watcher for all channels).
std::shared_ptr<grpc::ServerCredentials> ProcessServerCredentials();
std::shared_ptr<grpc::ChannelCredentials> ProcessChannelCredentials();

}  // namespace expertmesh
