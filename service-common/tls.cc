#include "service-common/tls.h"

#include <fstream>
#include <mutex>
#include <vector>

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace expertmesh {
namespace {

std::mutex& ProcessTlsMutex() {
  static std::mutex mu;
  return mu;
}

struct ProcessState {
  TlsFiles files;
  std::shared_ptr<grpc::ServerCredentials> server;
  std::shared_ptr<grpc::ChannelCredentials> channel;
};

ProcessState& ProcessTlsStorage() {
  static ProcessState state;
  return state;
}

std::shared_ptr<grpc::experimental::CertificateProviderInterface> Provider(const TlsFiles& files) {
  return std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      files.key, files.cert, files.ca, files.refresh_interval_s);
}

}  // namespace

absl::Status ValidateTlsFiles(const TlsFiles& files) {
  if (!files.enabled()) return absl::OkStatus();
  std::vector<std::string> missing;
  if (files.cert.empty()) missing.push_back("--tls-cert");
  if (files.key.empty()) missing.push_back("--tls-key");
  if (files.ca.empty()) missing.push_back("--tls-ca");
  if (!missing.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("mTLS needs --tls-cert, --tls-key and --tls-ca together; missing ",
                     absl::StrJoin(missing, ", ")));
  }
  for (const auto& [flag, path] :
       {std::pair<const char*, const std::string&>{"--tls-cert", files.cert},
        {"--tls-key", files.key},
        {"--tls-ca", files.ca}}) {
    std::ifstream in(path, std::ios::binary);
    char c;
    if (!in || !in.get(c)) {
      return absl::FailedPreconditionError(
          absl::StrCat(flag, ": cannot read ", path, " (missing, unreadable or empty)"));
    }
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::ServerCredentials> MakeServerCredentials(const TlsFiles& files) {
  if (!files.enabled()) return grpc::InsecureServerCredentials();
  grpc::experimental::TlsServerCredentialsOptions options(Provider(files));
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  return grpc::experimental::TlsServerCredentials(options);
}

std::shared_ptr<grpc::ChannelCredentials> MakeChannelCredentials(const TlsFiles& files) {
  if (!files.enabled()) return grpc::InsecureChannelCredentials();
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(Provider(files));
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_verify_server_certs(true);
  return grpc::experimental::TlsCredentials(options);
}

void SetProcessTls(const TlsFiles& files) {
  std::lock_guard<std::mutex> lock(ProcessTlsMutex());
  ProcessTlsStorage() = ProcessState{.files = files};
}

void ResetProcessTls() {
  ProcessState released;  // destroyed after the lock is released (it may join gRPC's threads)
  {
    std::lock_guard<std::mutex> lock(ProcessTlsMutex());
    std::swap(released, ProcessTlsStorage());
  }
}

TlsFiles ProcessTls() {
  std::lock_guard<std::mutex> lock(ProcessTlsMutex());
  return ProcessTlsStorage().files;
}

std::shared_ptr<grpc::ServerCredentials> ProcessServerCredentials() {
  std::lock_guard<std::mutex> lock(ProcessTlsMutex());
  ProcessState& state = ProcessTlsStorage();
  if (!state.server) state.server = MakeServerCredentials(state.files);
  return state.server;
}

std::shared_ptr<grpc::ChannelCredentials> ProcessChannelCredentials() {
  std::lock_guard<std::mutex> lock(ProcessTlsMutex());
  ProcessState& state = ProcessTlsStorage();
  if (!state.channel) state.channel = MakeChannelCredentials(state.files);
  return state.channel;
}

}  // namespace expertmesh
