#include "router/membership.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace expertmesh {

Membership::Membership(Placement placement, MembershipOptions options)
    : placement_(std::move(placement)), options_(options) {}

absl::StatusOr<v1::RegisterResponse> Membership::Register(const v1::RegisterRequest& request,
                                                          absl::Time now) {
  const int32_t shard = request.shard_id();
  if (shard < 0 || shard >= placement_.num_shards) {
    return absl::InvalidArgumentError(
        absl::StrCat("register: shard_id ", shard, " not in [0, ", placement_.num_shards, ")"));
  }
  if (request.address().empty() || request.address().size() > 256) {
    return absl::InvalidArgumentError("register: address must be host:port");
  }
  std::vector<LayerExpert> offered;
  offered.reserve(request.experts_size());
  for (const v1::LayerExpert& le : request.experts()) offered.push_back({le.layer(), le.expert()});
  std::sort(offered.begin(), offered.end());
  const std::vector<LayerExpert> expected = placement_.ExpertsOf(shard);
  if (offered != expected) {
    return absl::FailedPreconditionError(
        absl::StrCat("register: the replica at ", request.address(), " holds ", offered.size(),
                     " experts that are not shard ", shard, "'s ", expected.size(),
                     " experts in this router's placement"));
  }
  // A restarted replica on the same address replaces its old registration.
  for (auto it = replicas_.begin(); it != replicas_.end();) {
    it = it->second.address == request.address() ? replicas_.erase(it) : std::next(it);
  }
  Replica r;
  r.id = absl::StrCat("shard", shard, "@", request.address());
  r.seq = next_replica_++;
  r.address = request.address();
  r.shard_id = shard;
  r.capacity = request.capacity();
  r.last_heartbeat = now;
  v1::RegisterResponse response;
  response.set_replica_id(r.id);
  response.set_heartbeat_interval_ms(
      static_cast<uint32_t>(absl::ToInt64Milliseconds(options_.heartbeat_interval)));
  response.set_expiry_ms(static_cast<uint32_t>(absl::ToInt64Milliseconds(options_.expiry)));
  replicas_.emplace(r.id, std::move(r));
  ++version_;
  return response;
}

bool Membership::Heartbeat(const v1::HeartbeatRequest& request, absl::Time now) {
  auto it = replicas_.find(request.replica_id());
  if (it == replicas_.end()) return false;
  it->second.last_heartbeat = now;
  it->second.outstanding_rows = request.outstanding_rows();
  return true;
}

bool Membership::Deregister(const std::string& replica_id) {
  if (replicas_.erase(replica_id) == 0) return false;
  ++version_;
  return true;
}

bool Membership::Expire(absl::Time now) {
  bool changed = false;
  for (auto it = replicas_.begin(); it != replicas_.end();) {
    if (now - it->second.last_heartbeat > options_.expiry) {
      it = replicas_.erase(it);
      changed = true;
    } else {
      ++it;
    }
  }
  if (changed) ++version_;
  return changed;
}

void Membership::AddLoad(const v1::LoadReport& report) {
  for (const v1::LayerExpertLoad& l : report.loads()) {
    if (placement_.ShardOf(l.layer(), l.expert()) < 0) continue;  // ignore unknown pairs
    load_[{l.layer(), l.expert()}] += l.tokens();
  }
}

std::vector<v1::LayerExpertLoad> Membership::Load() const {
  std::vector<v1::LayerExpertLoad> out;
  for (const auto& [key, tokens] : load_) {
    v1::LayerExpertLoad l;
    l.set_layer(key.first);
    l.set_expert(key.second);
    l.set_tokens(tokens);
    out.push_back(std::move(l));
  }
  return out;
}

v1::PlacementMap Membership::Map(absl::Time now) const {
  v1::PlacementMap map;
  map.set_version(version_);
  FillShardGroups(placement_, &map);
  std::vector<const Replica*> ordered;  // in registration order: a deterministic map
  for (const auto& [id, r] : replicas_) ordered.push_back(&r);
  std::sort(ordered.begin(), ordered.end(),
            [](const Replica* a, const Replica* b) { return a->seq < b->seq; });
  for (const Replica* rp : ordered) {
    const Replica& r = *rp;
    v1::ShardReplica* p = map.mutable_shards(r.shard_id)->add_replicas();
    p->set_replica_id(r.id);
    p->set_address(r.address);
    p->set_healthy(now - r.last_heartbeat <= options_.expiry);
    p->set_capacity(r.capacity);
    p->set_outstanding_rows(r.outstanding_rows);
    p->set_last_heartbeat_ms_ago(static_cast<uint64_t>(
        std::max<int64_t>(0, absl::ToInt64Milliseconds(now - r.last_heartbeat))));
  }
  return map;
}

}  // namespace expertmesh
