#include "service-common/handshake.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "core/format/wire.h"

namespace expertmesh {

absl::StatusOr<v1::PeerIdentity> MakeLocalIdentity(const std::string& model_dir,
                                                   const std::string& service,
                                                   const std::string& instance_id) {
  absl::StatusOr<std::string> fingerprint = ModelFingerprintOfDir(model_dir);
  if (!fingerprint.ok()) return fingerprint.status();
  v1::PeerIdentity id;
  std::filesystem::path dir(model_dir);
  if (!dir.has_filename()) dir = dir.parent_path();  // "models/tiny/" -> "tiny"
  id.set_model_name(dir.filename().string());
  id.set_model_fingerprint(*fingerprint);
  id.set_protocol_version(kProtocolVersion);
  id.set_service(service);
  id.set_instance_id(instance_id);
  return id;
}

absl::Status CheckPeer(const v1::PeerIdentity& local, const v1::PeerIdentity& remote) {
  if (remote.model_fingerprint().empty()) {
    return absl::FailedPreconditionError("handshake: the peer sent no model fingerprint");
  }
  if (remote.protocol_version() != local.protocol_version()) {
    return absl::FailedPreconditionError(
        absl::StrCat("handshake: protocol version ", remote.protocol_version(), " of ",
                     remote.service(), " differs from ", local.protocol_version(), " here"));
  }
  if (remote.model_fingerprint() != local.model_fingerprint()) {
    return absl::FailedPreconditionError(
        absl::StrCat("handshake: peer serves model '", remote.model_name(), "' (",
                     remote.model_fingerprint(), "), this ", local.service(), " serves '",
                     local.model_name(), "' (", local.model_fingerprint(), ")"));
  }
  return absl::OkStatus();
}

}  // namespace expertmesh
