// Peer identity and the handshake rule: two ExpertMesh peers talk only when they serve the
// same model (fingerprint of config.json) with the same protocol version (core/format/wire.h).
// Any other pairing is refused with FAILED_PRECONDITION naming what differs.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "expertmesh/v1/common.pb.h"

namespace expertmesh {

// This process's identity for `service` serving the checkpoint in model_dir: model_name is
// the directory's base name, model_fingerprint = ModelFingerprint(config.json text).
absl::StatusOr<v1::PeerIdentity> MakeLocalIdentity(const std::string& model_dir,
                                                   const std::string& service,
                                                   const std::string& instance_id);

// OK when `remote` may talk to `local`; FAILED_PRECONDITION otherwise (model fingerprint or
// protocol version differs, or a field is missing).
absl::Status CheckPeer(const v1::PeerIdentity& local, const v1::PeerIdentity& remote);

}  // namespace expertmesh
