// The router's membership state, as plain logic with time passed in (the service wraps it
// with a clock and a lock): shard replicas register for a shard group of the placement,
// heartbeat, deregister or expire; every change of the replica set publishes a new map
// version. Also the load statistics reported by dispatchers.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "expertmesh/v1/router.pb.h"
#include "placement/placement.h"

namespace expertmesh {

struct MembershipOptions {
  absl::Duration heartbeat_interval = absl::Milliseconds(500);
  absl::Duration expiry = absl::Milliseconds(2000);  // no heartbeat for this long: removed
};

class Membership {
 public:
  Membership(Placement placement, MembershipOptions options);

  // The replica must serve exactly the experts the placement gives its shard group. A
  // replica registering again from the same address replaces its earlier registration.
  absl::StatusOr<v1::RegisterResponse> Register(const v1::RegisterRequest& request, absl::Time now);
  // false: unknown replica (expired or never registered): it should register again.
  bool Heartbeat(const v1::HeartbeatRequest& request, absl::Time now);
  // true when the replica was known.
  bool Deregister(const std::string& replica_id);
  // Removes replicas whose last heartbeat is older than the expiry; true if any was.
  bool Expire(absl::Time now);

  void AddLoad(const v1::LoadReport& report);
  std::vector<v1::LayerExpertLoad> Load() const;

  uint64_t version() const { return version_; }
  const Placement& placement() const { return placement_; }
  // The current map: every shard group with its live replicas.
  v1::PlacementMap Map(absl::Time now) const;
  size_t replica_count() const { return replicas_.size(); }

 private:
  // A replica's id is "shard<S>@<address>": the same for the same replica under every router
  // instance, so after a router restart a dispatcher's open stream to it stays (a new id would
  // close the stream and fail the step in flight on it), and an id can never be taken for
  // another replica's (a heartbeat with an id this router has not registered is unknown and
  // its replica registers again).
  struct Replica {
    std::string id;
    uint64_t seq = 0;  // registration order: the map lists replicas in it
    std::string address;
    int32_t shard_id = 0;
    uint32_t capacity = 0;
    uint32_t outstanding_rows = 0;
    absl::Time last_heartbeat;
  };

  Placement placement_;
  MembershipOptions options_;
  uint64_t version_ = 1;
  uint64_t next_replica_ = 0;                // registration order (Replica::seq)
  std::map<std::string, Replica> replicas_;  // by id
  std::map<std::pair<int32_t, int32_t>, uint64_t> load_;
};

}  // namespace expertmesh
