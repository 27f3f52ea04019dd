#include "router/membership.h"

#include <algorithm>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace expertmesh {
namespace {

// a ⊇ b, both sorted.
bool Includes(const std::vector<LayerExpert>& a, const std::vector<LayerExpert>& b) {
  return std::includes(a.begin(), a.end(), b.begin(), b.end());
}

}  // namespace

Membership::Membership(Placement placement, MembershipOptions options)
    : placement_(std::move(placement)), options_(options) {}

std::vector<LayerExpert> Membership::TargetExperts(int32_t shard) const {
  std::vector<LayerExpert> now = placement_.ExpertsOf(shard);
  if (!pending_) return now;
  const std::vector<LayerExpert> next = pending_->ExpertsOf(shard);
  std::vector<LayerExpert> both;
  std::set_union(now.begin(), now.end(), next.begin(), next.end(), std::back_inserter(both));
  return both;
}

v1::ExpertTarget Membership::TargetOf(int32_t shard) const {
  v1::ExpertTarget t;
  t.set_generation(target_gen_);
  t.set_committed(!pending_);
  for (const LayerExpert& le : TargetExperts(shard)) {
    v1::LayerExpert* p = t.add_experts();
    p->set_layer(le.layer);
    p->set_expert(le.expert);
  }
  return t;
}

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
  if (request.data_address().size() > 256 ||
      (!request.data_address().empty() && request.data_address().find(':') == std::string::npos)) {
    return absl::InvalidArgumentError("register: data_address must be empty or host:port");
  }
  if (request.device_kind().size() > 256) {
    return absl::InvalidArgumentError("register: device_kind longer than 256 bytes");
  }
  const float weight = request.capacity_weight();
  if (!(weight >= 0.0f && weight <= 1e6f)) {  // NaN fails too
    return absl::InvalidArgumentError("register: capacity_weight must be in [0, 1e6]");
  }
  std::vector<LayerExpert> offered;
  offered.reserve(request.experts_size());
  for (const v1::LayerExpert& le : request.experts()) offered.push_back({le.layer(), le.expert()});
  std::sort(offered.begin(), offered.end());
  const std::vector<LayerExpert> expected = placement_.ExpertsOf(shard);
  uint64_t held = target_gen_;
  if (!request.live_placement()) {
    if (offered != expected) {
      return absl::FailedPreconditionError(
          absl::StrCat("register: the replica at ", request.address(), " holds ", offered.size(),
                       " experts that are not shard ", shard, "'s ", expected.size(),
                       " experts in this router's placement"));
    }
    if (pending_) {
      return absl::UnavailableError(
          "register: a placement change is in progress and this replica cannot change its "
          "experts (no live_placement); try again after it");
    }
  } else if (Includes(offered, TargetExperts(shard))) {
    held = target_gen_;
  } else if (Includes(offered, expected)) {
    held = in_map_gen_;  // serves the published placement; loads the rest of the target
  } else {
    held = 0;  // loading: not in the maps until it holds its group's experts
  }
  // A restarted replica on the same address replaces its old registration.
  for (auto it = replicas_.begin(); it != replicas_.end();) {
    it = it->second.address == request.address() ? replicas_.erase(it) : std::next(it);
  }
  Replica r;
  r.id = absl::StrCat("shard", shard, "@", request.address());
  r.seq = next_replica_++;
  r.address = request.address();
  r.data_address = request.data_address();
  r.shard_id = shard;
  r.capacity = request.capacity();
  r.device_kind = request.device_kind();
  r.capacity_weight = weight > 0.0f ? weight : 1.0f;
  r.live = request.live_placement();
  r.held = held;
  r.last_heartbeat = now;
  v1::RegisterResponse response;
  response.set_replica_id(r.id);
  response.set_heartbeat_interval_ms(
      static_cast<uint32_t>(absl::ToInt64Milliseconds(options_.heartbeat_interval)));
  response.set_expiry_ms(static_cast<uint32_t>(absl::ToInt64Milliseconds(options_.expiry)));
  if (r.live) {
    *response.mutable_target() = TargetOf(shard);
    r.told = target_gen_;
    r.told_committed = !pending_;
  }
  replicas_.emplace(r.id, std::move(r));
  ++version_;
  return response;
}

Membership::HeartbeatResult Membership::Heartbeat(const v1::HeartbeatRequest& request,
                                                  absl::Time now) {
  HeartbeatResult result;
  auto it = replicas_.find(request.replica_id());
  if (it == replicas_.end()) return result;
  result.known = true;
  Replica& r = it->second;
  r.last_heartbeat = now;
  r.outstanding_rows = request.outstanding_rows();
  if (!r.live) return result;
  if (!request.load_error().empty() && pending_) {
    Abort(absl::StrCat(r.id, " could not load its experts: ", request.load_error().substr(0, 512)));
    result.map_changed = true;
  }
  const bool was_mapped = Mapped(r);
  r.held = std::min(request.held_generation(), target_gen_);
  if (Mapped(r) != was_mapped) {
    ++version_;
    result.map_changed = true;
  }
  if (MaybeCommit(now)) result.map_changed = true;
  if (r.held < target_gen_ || r.told < target_gen_ || r.told_committed != !pending_) {
    result.target = TargetOf(r.shard_id);
    r.told = target_gen_;
    r.told_committed = !pending_;
  }
  return result;
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
  if (pending_ && now - pending_since_ > options_.change_timeout) {
    Abort(absl::StrCat("not every replica held the new placement within ",
                       absl::FormatDuration(options_.change_timeout)));
  }
  if (MaybeCommit(now)) changed = true;
  return changed;
}

absl::Status Membership::BeginChange(Placement next, absl::Time now) {
  if (pending_) return absl::FailedPreconditionError("a placement change is already in progress");
  if (next.num_shards != placement_.num_shards || next.n_layers != placement_.n_layers ||
      next.n_routed_experts != placement_.n_routed_experts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the new placement has ", next.num_shards, " shards x ", next.n_layers, " layers x ",
        next.n_routed_experts, " experts; the router's has ", placement_.num_shards, " x ",
        placement_.n_layers, " x ", placement_.n_routed_experts));
  }
  for (int32_t l = 0; l < next.n_layers; ++l) {
    for (int32_t e = 0; e < next.n_routed_experts; ++e) {
      if (next.ShardsOf(l, e).empty() != placement_.ShardsOf(l, e).empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("the new placement does not cover expert ", e, " of layer ", l));
      }
    }
  }
  if (!AllLive()) {
    return absl::FailedPreconditionError(
        "a registered replica cannot change its experts (it did not register with "
        "live_placement, e.g. a CUDA shard)");
  }
  if (next == placement_) return absl::AlreadyExistsError("the placement would not change");
  pending_ = std::move(next);
  pending_gen_ = ++target_gen_;
  pending_since_ = now;
  last_change_ = absl::StrCat("loading target generation ", pending_gen_);
  return absl::OkStatus();
}

bool Membership::MaybeCommit(absl::Time now) {
  if (!pending_) return false;
  std::vector<bool> covered(static_cast<size_t>(placement_.num_shards), false);
  for (const auto& [id, r] : replicas_) {
    if (!Mapped(r) || now - r.last_heartbeat > options_.expiry) continue;
    if (r.held < pending_gen_) return false;  // a mapped replica still loading
    covered[static_cast<size_t>(r.shard_id)] = true;
  }
  if (std::find(covered.begin(), covered.end(), false) != covered.end()) return false;
  placement_ = *std::move(pending_);
  pending_.reset();
  in_map_gen_ = pending_gen_;
  ++target_gen_;
  ++version_;
  ++commits_;
  last_commit_ = now;
  last_change_ =
      absl::StrCat("published target generation ", pending_gen_, " as map version ", version_);
  return true;
}

void Membership::Abort(const std::string& why) {
  if (!pending_) return;
  pending_.reset();
  ++target_gen_;
  last_change_ = absl::StrCat("aborted: ", why);
}

std::vector<double> Membership::GroupCapacity(absl::Time now) const {
  std::vector<double> capacity(static_cast<size_t>(placement_.num_shards), 0.0);
  for (const auto& [id, r] : replicas_) {
    if (!Mapped(r) || now - r.last_heartbeat > options_.expiry) continue;
    capacity[static_cast<size_t>(r.shard_id)] += r.capacity_weight;
  }
  return capacity;
}

bool Membership::AllLive() const {
  return std::all_of(replicas_.begin(), replicas_.end(),
                     [](const auto& kv) { return kv.second.live; });
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

v1::PlacementMap Membership::Map(absl::Time now, bool include_loading) const {
  v1::PlacementMap map;
  map.set_version(version_);
  FillShardGroups(placement_, &map);
  std::vector<const Replica*> ordered;  // in registration order: a deterministic map
  for (const auto& [id, r] : replicas_) {
    if (include_loading || Mapped(r)) ordered.push_back(&r);
  }
  std::sort(ordered.begin(), ordered.end(),
            [](const Replica* a, const Replica* b) { return a->seq < b->seq; });
  for (const Replica* rp : ordered) {
    const Replica& r = *rp;
    v1::ShardReplica* p = map.mutable_shards(r.shard_id)->add_replicas();
    p->set_replica_id(r.id);
    p->set_address(r.address);
    p->set_data_address(r.data_address);
    p->set_healthy(now - r.last_heartbeat <= options_.expiry);
    p->set_capacity(r.capacity);
    p->set_outstanding_rows(r.outstanding_rows);
    p->set_last_heartbeat_ms_ago(static_cast<uint64_t>(
        std::max<int64_t>(0, absl::ToInt64Milliseconds(now - r.last_heartbeat))));
    p->set_device_kind(r.device_kind);
    p->set_capacity_weight(r.capacity_weight);
    p->set_loading(!Mapped(r));
  }
  return map;
}

}  // namespace expertmesh
