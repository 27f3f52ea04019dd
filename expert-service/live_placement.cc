#include "expert-service/live_placement.h"

#include <algorithm>
#include <iterator>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace expertmesh {
namespace {

std::set<LayerExpert> ExpertsOf(const v1::ExpertTarget& target) {
  std::set<LayerExpert> out;
  for (const v1::LayerExpert& le : target.experts()) out.insert({le.layer(), le.expert()});
  return out;
}

}  // namespace

LivePlacement::LivePlacement(const Checkpoint& checkpoint, const ModelConfig& config,
                             LocalExperts* experts, ExpertServiceImpl* service, Options options)
    : checkpoint_(checkpoint),
      config_(config),
      experts_(experts),
      service_(service),
      options_(std::move(options)) {
  if (MetricsRegistry* m = options_.metrics) {
    held_gauge_ = &m->GetGauge("expertmesh_expert_held_experts",
                               "(layer, expert) pairs this replica holds and serves");
    bytes_gauge_ = &m->GetGauge("expertmesh_expert_bytes_mapped", "Bytes of expert tensors held");
    loads_ = &m->GetCounter("expertmesh_expert_placement_loads_total",
                            "Experts loaded for live placement targets");
    releases_total_ = &m->GetCounter("expertmesh_expert_placement_releases_total",
                                     "Experts released after a committed placement target");
    load_errors_ = &m->GetCounter("expertmesh_expert_placement_load_errors_total",
                                  "Placement targets whose experts failed to load");
  }
  UpdateGauges();
  thread_ = std::thread([this] { Loop(); });
}

LivePlacement::~LivePlacement() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void LivePlacement::OnTarget(const v1::ExpertTarget& target) {
  // Held already (the usual case at registration, and the committed flag of a change this
  // replica has loaded): report it now, so the router keeps or puts this replica in its maps
  // at the next heartbeat. Under mu_: a release pass publishes its smaller set under mu_ too,
  // and gives way to a pending target, so what is checked here stays held.
  {
    std::lock_guard<std::mutex> lock(mu_);
    const std::shared_ptr<const ExpertServiceImpl::HeldSet> held = service_->held();
    bool held_all = true;
    for (const v1::LayerExpert& le : target.experts()) {
      if (!held->contains({le.layer(), le.expert()})) {
        held_all = false;
        break;
      }
    }
    if (held_all && target.generation() > held_generation_) {
      held_generation_ = target.generation();
    }
    pending_ = target;
  }
  cv_.notify_all();
}

uint64_t LivePlacement::held_generation() const {
  std::lock_guard<std::mutex> lock(mu_);
  return held_generation_;
}

std::string LivePlacement::load_error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return load_error_;
}

uint64_t LivePlacement::applied() const {
  std::lock_guard<std::mutex> lock(mu_);
  return applied_;
}

uint64_t LivePlacement::releases() const {
  std::lock_guard<std::mutex> lock(mu_);
  return release_passes_;
}

void LivePlacement::UpdateGauges() {
  if (held_gauge_) held_gauge_->Set(static_cast<double>(experts_->Held().size()));
  if (bytes_gauge_) bytes_gauge_->Set(static_cast<double>(experts_->bytes_mapped()));
}

void LivePlacement::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  std::optional<absl::Time> next_release;
  while (!stop_) {
    if (pending_) {
      v1::ExpertTarget target = *std::move(pending_);
      pending_.reset();
      lock.unlock();
      Apply(target);
      lock.lock();
      ++applied_;
      continue;  // a newer target may have come meanwhile
    }
    lock.unlock();
    next_release = ReleaseDue(absl::Now());
    lock.lock();
    if (stop_ || pending_) continue;
    if (next_release) {
      cv_.wait_for(lock, absl::ToChronoMilliseconds(
                             std::max(absl::Milliseconds(1), *next_release - absl::Now())));
    } else {
      cv_.wait(lock, [this] { return stop_ || pending_.has_value(); });
    }
  }
}

void LivePlacement::Apply(const v1::ExpertTarget& target) {
  const std::set<LayerExpert> want = ExpertsOf(target);
  const std::vector<LayerExpert> held = experts_->Held();
  std::vector<LayerExpert> gained;
  std::set_difference(want.begin(), want.end(), held.begin(), held.end(),
                      std::back_inserter(gained));
  if (!gained.empty()) {
    spdlog::info("placement target {}: loading {} experts", target.generation(), gained.size());
    const absl::Time start = absl::Now();
    if (absl::Status s = experts_->Add(checkpoint_, config_, gained); !s.ok()) {
      spdlog::error("placement target {}: loading failed: {}", target.generation(), s.ToString());
      if (load_errors_) load_errors_->Inc();
      std::lock_guard<std::mutex> lock(mu_);
      load_error_ = absl::StrCat("target ", target.generation(), ": ", s.ToString());
      return;
    }
    if (loads_) loads_->Inc(static_cast<double>(gained.size()));
    // Requests may name them from now on (the router maps them once it hears the generation).
    service_->PublishHeld(experts_->Held());
    spdlog::info("placement target {}: {} experts loaded in {}", target.generation(), gained.size(),
                 absl::FormatDuration(absl::Now() - start));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    held_generation_ = std::max(held_generation_, target.generation());
    load_error_.clear();
  }
  // Release candidates: only under a committed target, counted from its arrival.
  if (target.committed()) {
    if (!committed_ || want != target_) committed_at_ = absl::Now();
    committed_ = true;
  } else {
    committed_ = false;
  }
  target_ = want;
  UpdateGauges();
}

std::optional<absl::Time> LivePlacement::ReleaseDue(absl::Time now) {
  if (!committed_) return std::nullopt;
  std::vector<LayerExpert> due;
  std::optional<absl::Time> next;
  for (const LayerExpert& le : experts_->Held()) {
    if (target_.contains(le)) continue;
    const absl::Time at =
        std::max(committed_at_, service_->LastUse(le.layer, le.expert)) + options_.release_grace;
    if (at <= now) {
      due.push_back(le);
    } else if (!next || at < *next) {
      next = at;
    }
  }
  if (due.empty()) return next;
  // New requests naming them are refused from here on (FailedPrecondition); those validated
  // against the old set finish first, then the memory goes.
  std::shared_ptr<const ExpertServiceImpl::HeldSet> old = service_->held();
  std::vector<LayerExpert> keep;
  for (const LayerExpert& le : experts_->Held()) {
    if (!std::binary_search(due.begin(), due.end(), le)) keep.push_back(le);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (pending_) return now;  // a newer target first: it may want them
    service_->PublishHeld(keep);
  }
  ExpertServiceImpl::WaitUnused(std::move(old));
  experts_->Release(due);
  if (releases_total_) releases_total_->Inc(static_cast<double>(due.size()));
  spdlog::info("released {} experts unused for {} ({} held)", due.size(),
               absl::FormatDuration(options_.release_grace), keep.size());
  UpdateGauges();
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++release_passes_;
  }
  return next;
}

}  // namespace expertmesh
