// The router's membership state, as plain logic with time passed in (the service wraps it
// with a clock and a lock): shard replicas register for a shard group of the placement,
// heartbeat, deregister or expire; every change of the replica set publishes a new map
// version. Also the load statistics reported by dispatchers, and live placement changes.
//
// Live placement change (a rebalance; router/rebalancer.h decides when): the router never
// publishes a map that sends an expert to a replica that does not hold it yet.
//   1. BeginChange(P'): every shard group's *target* becomes the union of what it holds under
//      the published placement P and what P' gives it, under a new target generation. Replicas
//      registered with `live_placement` get it in their heartbeat answer, map the experts they
//      lack from the checkpoint and report the generation they hold.
//   2. Once every replica in the published map holds that generation (and every group keeps
//      at least one), Commit publishes P' (a new map version): targets become P' alone, marked
//      committed, and a replica releases what it holds beyond them once no step uses them.
//   3. A replica that reports a load error, or no commit within the timeout, aborts the change
//      (targets back to P; nothing published).
// A replica joining at any time is told its group's target and enters the maps once it holds
// it; until then GetStatus lists it as loading. Replicas without live_placement must offer
// exactly their group's experts, as before, and no change starts while one is registered.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "expertmesh/v1/router.pb.h"
#include "placement/placement.h"

namespace expertmesh {

struct MembershipOptions {
  absl::Duration heartbeat_interval = absl::Milliseconds(500);
  absl::Duration expiry = absl::Milliseconds(2000);    // no heartbeat for this long: removed
  absl::Duration change_timeout = absl::Seconds(120);  // a placement change not committed: aborted
};

class Membership {
 public:
  Membership(Placement placement, MembershipOptions options);

  // A replica without live_placement must serve exactly the experts the placement gives its
  // shard group; one with it may offer any experts and is told its target. A replica
  // registering again from the same address replaces its earlier registration.
  absl::StatusOr<v1::RegisterResponse> Register(const v1::RegisterRequest& request, absl::Time now);
  struct HeartbeatResult {
    bool known = false;        // false: unknown replica (expired or never registered)
    bool map_changed = false;  // the replica entered the map, or a change committed / aborted
    std::optional<v1::ExpertTarget> target;  // newer than what it holds
    explicit operator bool() const { return known; }
  };
  HeartbeatResult Heartbeat(const v1::HeartbeatRequest& request, absl::Time now);
  // true when the replica was known.
  bool Deregister(const std::string& replica_id);
  // Removes replicas whose last heartbeat is older than the expiry, and aborts a placement
  // change past its timeout; true if the map changed.
  bool Expire(absl::Time now);

  // Placement changes (see the top). BeginChange fails while one is pending, when the new
  // placement does not fit the model, or while a replica without live_placement is registered.
  absl::Status BeginChange(Placement next, absl::Time now);
  bool ChangePending() const { return pending_.has_value(); }
  const Placement* pending() const { return pending_ ? &*pending_ : nullptr; }
  uint64_t target_generation() const { return target_gen_; }
  // Commits the pending change when every mapped replica holds it; true if it did.
  bool MaybeCommit(absl::Time now);
  void Abort(const std::string& why);
  // What the last change did, in words ("" before any).
  const std::string& last_change() const { return last_change_; }
  absl::Time last_commit() const { return last_commit_; }
  uint64_t commits() const { return commits_; }

  // Every group's capacity for the rebalancer: the sum of its mapped, healthy replicas'
  // capacity_weight (0 where a group has none).
  std::vector<double> GroupCapacity(absl::Time now) const;
  // Every registered replica can change its experts.
  bool AllLive() const;

  void AddLoad(const v1::LoadReport& report);
  std::vector<v1::LayerExpertLoad> Load() const;

  uint64_t version() const { return version_; }
  const Placement& placement() const { return placement_; }
  // The current map: every shard group with the replicas that hold its experts. With
  // `include_loading` (GetStatus) also the replicas still loading them, marked `loading`.
  v1::PlacementMap Map(absl::Time now, bool include_loading = false) const;
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
    std::string data_address;  // framed TCP data plane; empty: none
    int32_t shard_id = 0;
    uint32_t capacity = 0;
    uint32_t outstanding_rows = 0;
    std::string device_kind;
    float capacity_weight = 1.0f;
    bool live = false;            // live_placement
    uint64_t held = 0;            // the target generation it holds
    bool told_committed = false;  // the last target it was sent carried committed
    uint64_t told = 0;            // the last target generation it was sent
    absl::Time last_heartbeat;
  };
  bool Mapped(const Replica& r) const { return !r.live || r.held >= in_map_gen_; }
  v1::ExpertTarget TargetOf(int32_t shard) const;
  std::vector<LayerExpert> TargetExperts(int32_t shard) const;

  Placement placement_;
  MembershipOptions options_;
  uint64_t version_ = 1;
  uint64_t next_replica_ = 0;                // registration order (Replica::seq)
  std::map<std::string, Replica> replicas_;  // by id
  std::map<std::pair<int32_t, int32_t>, uint64_t> load_;
  // Target generations: target_gen_ counts every change of the targets; a replica is mapped
  // once it holds in_map_gen_ (the generation from which targets include the published
  // placement's experts); pending_gen_ is the generation of the pending change's union.
  std::optional<Placement> pending_;
  uint64_t target_gen_ = 1;
  uint64_t in_map_gen_ = 1;
  uint64_t pending_gen_ = 0;
  absl::Time pending_since_;
  std::string last_change_;
  absl::Time last_commit_ = absl::InfinitePast();
  uint64_t commits_ = 0;
};

}  // namespace expertmesh
