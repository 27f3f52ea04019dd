// expertmesh-bench-rebalance: a skewed expert load on 4 shard groups, before and after the
// router's live rebalance, in one run (issue 16, section 2).
//
// The model: --model DIR, or a random checkpoint written to a temporary directory from --config
// (default tools/bench/rebalance_bench_config.json: 4 layers, 3 MoE with 32 experts of
// intermediate size 1024 at hidden 512, top-4) with
// --gate-skew S (a larger gate correction bias on the first quarter of each MoE layer's experts:
// the even placement puts them all on shard group 0).
// The cluster: the launcher starts router (--no-rebalance, so "before" stays the even placement),
// --shards x --replicas expert services and the attention service on loopback. --streams B
// greedy streams (short prompts, --max-tokens each, back to back) run through the whole run.
//   before: after --settle-s, for --seconds T: generated tokens/s (tokens that arrived in the
//           phase / T), and the load per shard group;
//   then Rebalance(force) through the router's RPC (as `expertmesh rebalance --force`), wait
//           for the new map version, --settle-s again (the load reports trail by up to 5 s and
//           lost experts are released);
//   after:  the same measurements.
// Load per shard group, two ways:
//   - pairs: the router's cumulative (layer, expert) token counts (GetStatus expert_load, the
//     attention service's reports), the difference over the phase; an expert with copies has
//     its tokens split evenly over them; per MoE layer max / mean over the groups, then the mean
//     over the layers (the rebalancer's figure: each layer's step waits for its busiest group);
//   - rows: the shards' own expertmesh_expert_rows_total (rows computed, summed over the
//     group's replicas, all layers together), max / mean over the groups.
// Predicted tokens/s gain where the shards set the pace: before max/mean / after max/mean
// (pairs). Measured: after tokens/s / before tokens/s. Also printed: each process's CPU
// seconds per phase (/proc/PID/stat), which says whether the shards or the whole machine limit
// the rate. Every stream must finish without error, through the rebalance too.
//
// On one machine the shard processes share its cores, so the total CPU, not the busiest group,
// sets the pace. --shard-cpu-quota F gives every shard replica its own cgroup with F cores
// (cpu.cfs_quota_us = F x cpu.cfs_period_us in cgroup v1, cpu.max in v2), as if each group ran
// on its own slow hardware: the busiest group is then the bottleneck, as on separate machines.
// Choose F so that all shards together stay well under the machine (4 x 0.2 = 0.8 core of 2).
// Then also printed: each replica's throttling (cpu.stat nr_throttled of nr_periods,
// throttled time) per phase, and the busiest group's CPU against its budget.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/algorithm/container.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "core/base/status.h"
#include "core/decode/sampling.h"
#include "core/format/config.h"
#include "expertmesh/v1/attention.grpc.pb.h"
#include "expertmesh/v1/router.grpc.pb.h"
#include "service-common/grpc_util.h"
#include "service-common/metrics_http.h"
#include "spdlog/spdlog.h"
#include "tools/launcher/cluster.h"
#include "tools/make-checkpoint/random_checkpoint.h"

namespace expertmesh {
namespace {

struct Flags {
  std::string model, config = "tools/bench/rebalance_bench_config.json";
  double gate_skew = 0.5;
  uint64_t seed = 7;
  int shards = 4, replicas = 1, streams = 16, max_tokens = 64, prompt_len = 8;
  double seconds = 20, settle_s = 7;
  int redundant = -1;          // router --redundant-experts
  int expert_threads = 0;      // expert-service --threads; 0 = its default
  double shard_cpu_quota = 0;  // cores per shard replica (cgroup); 0 = off
  int64_t shard_cpu_period_us = 100000;
};

absl::StatusOr<v1::StatusResponse> RouterStatus(const launcher::Cluster& c) {
  auto stub = v1::RouterService::NewStub(MakeChannel(c.router().grpc_address));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::StatusResponse resp;
  if (grpc::Status s = stub->GetStatus(&ctx, v1::StatusRequest{}, &resp); !s.ok()) {
    return FromGrpcStatus(s);
  }
  return resp;
}

absl::StatusOr<double> Metric(int port, const std::string& name) {
  EM_ASSIGN_OR_RETURN(std::string text, HttpGet("127.0.0.1", port, "/metrics"));
  double sum = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::StartsWith(line, name)) continue;
    const absl::string_view rest = line.substr(name.size());
    if (rest.empty() || (rest[0] != ' ' && rest[0] != '{')) continue;
    double v = 0;
    if (absl::SimpleAtod(rest.substr(rest.rfind(' ') + 1), &v)) sum += v;
  }
  return sum;
}

// CPU seconds (user + system) of this program's child processes, by name.
std::map<std::string, double> ChildCpu(launcher::Cluster& c) {
  std::map<pid_t, std::string> names;
  for (int s = 0; s < c.options().shards; ++s) {
    for (int r = 0; r < c.options().replicas; ++r) {
      if (launcher::ChildProcess* p = c.expert_process(s, r)) {
        names[p->pid()] = absl::StrCat("shard", s, "-r", r);
      }
    }
  }
  const long ticks = sysconf(_SC_CLK_TCK);
  std::map<std::string, double> out;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string pid_text = entry.path().filename();
    pid_t pid = 0;
    if (!absl::SimpleAtoi(pid_text, &pid)) continue;
    std::ifstream f(entry.path() / "stat");
    std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const size_t open = stat.find('('), close = stat.rfind(')');
    if (open == std::string::npos || close == std::string::npos) continue;
    const std::string comm = stat.substr(open + 1, close - open - 1);
    std::vector<std::string> fields = absl::StrSplit(stat.substr(close + 2), ' ');
    // After "(comm) ": state ppid ... utime is field 14, stime 15 of the whole line (1-based).
    if (fields.size() < 13) continue;
    pid_t ppid = 0;
    (void)absl::SimpleAtoi(fields[1], &ppid);
    if (ppid != getpid()) continue;
    double ut = 0, st = 0;
    (void)absl::SimpleAtod(fields[11], &ut);
    (void)absl::SimpleAtod(fields[12], &st);
    const std::string name = names.count(pid) ? names[pid] : comm;
    out[name] += (ut + st) / static_cast<double>(ticks);
  }
  double self = 0;
  {
    std::ifstream f("/proc/self/stat");
    std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::vector<std::string> fields = absl::StrSplit(stat.substr(stat.rfind(')') + 2), ' ');
    double ut = 0, st = 0;
    if (fields.size() >= 13 && absl::SimpleAtod(fields[11], &ut) &&
        absl::SimpleAtod(fields[12], &st)) {
      self = (ut + st) / static_cast<double>(ticks);
    }
  }
  out["bench (clients)"] = self;
  return out;
}

// --shard-cpu-quota: one cgroup per shard replica with the same fixed CPU budget, so that each
// shard group runs as on its own (slow) hardware and the busiest group sets the pace, as on
// separate machines. cgroup v1 (the cpu controller at /sys/fs/cgroup/cpu: cpu.cfs_quota_us,
// cpu.cfs_period_us) or v2 (/sys/fs/cgroup with "cpu" in cgroup.controllers: cpu.max). A group
// also gets a high weight (v1 cpu.shares 10240, v2 cpu.weight 1000) so that other jobs on the
// machine do not take its budget: up to its quota it is served first, beyond it never.
// The groups are named expertmesh-bench-rebalance-<bench pid>-shard<g>-r<r> at the hierarchy's
// root; the destructor moves each process back to the cgroup it came from and removes them
// (groups left by a killed bench are removed by the next run).
struct ThrottleStat {
  double periods = 0, throttled = 0, throttled_s = 0;
};

class ShardCpuQuota {
 public:
  // Where the cpu controller can be used; an error saying why not.
  static absl::StatusOr<std::pair<std::string, bool>> Find() {  // (root, is v2)
    namespace fs = std::filesystem;
    std::error_code ec;
    std::string root;
    bool v2 = false;
    if (fs::exists("/sys/fs/cgroup/cgroup.controllers", ec)) {
      std::ifstream in("/sys/fs/cgroup/cgroup.controllers");
      std::string word;
      bool cpu = false;
      while (in >> word) cpu = cpu || word == "cpu";
      if (!cpu) {
        return absl::UnavailableError(
            "cgroup v2 at /sys/fs/cgroup does not offer the cpu controller (cgroup.controllers)");
      }
      root = "/sys/fs/cgroup";
      v2 = true;
    } else if (fs::exists("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", ec)) {
      root = "/sys/fs/cgroup/cpu";
    } else {
      return absl::UnavailableError(
          "no cgroup cpu controller: neither /sys/fs/cgroup/cpu/cpu.cfs_quota_us (v1) nor "
          "/sys/fs/cgroup/cgroup.controllers (v2)");
    }
    if (geteuid() != 0 && access(root.c_str(), W_OK) != 0) {
      return absl::PermissionDeniedError(
          absl::StrCat("creating cgroups under ", root, " needs root (not writable here)"));
    }
    if (access(root.c_str(), W_OK) != 0) {
      return absl::PermissionDeniedError(absl::StrCat(root, " is not writable (read-only mount?)"));
    }
    return std::make_pair(root, v2);
  }

  // Creates the groups and moves each (name, pid) into its own.
  static absl::StatusOr<std::unique_ptr<ShardCpuQuota>> Create(
      double fraction, int64_t period_us, const std::vector<std::pair<std::string, pid_t>>& procs) {
    EM_ASSIGN_OR_RETURN(auto where, Find());
    std::unique_ptr<ShardCpuQuota> q(new ShardCpuQuota);
    q->root_ = where.first;
    q->v2_ = where.second;
    q->RemoveStale();
    if (q->v2_) {
      std::ifstream in(q->root_ + "/cgroup.subtree_control");
      std::string word;
      bool cpu = false;
      while (in >> word) cpu = cpu || word == "cpu";
      if (!cpu) EM_RETURN_IF_ERROR(Write(q->root_ + "/cgroup.subtree_control", "+cpu"));
    }
    const int64_t quota_us = std::max<int64_t>(1000, std::llround(fraction * period_us));
    for (const auto& [name, pid] : procs) {
      Group g;
      g.name = name;
      g.pid = pid;
      g.dir = absl::StrCat(q->root_, "/expertmesh-bench-rebalance-", getpid(), "-", name);
      EM_ASSIGN_OR_RETURN(g.original, q->CgroupOf(pid));
      if (mkdir(g.dir.c_str(), 0755) != 0) {
        return absl::InternalError(absl::StrCat("mkdir ", g.dir, ": ", std::strerror(errno)));
      }
      q->groups_.push_back(g);  // from here on the destructor removes it
      if (q->v2_) {
        EM_RETURN_IF_ERROR(Write(g.dir + "/cpu.max", absl::StrCat(quota_us, " ", period_us)));
        EM_RETURN_IF_ERROR(Write(g.dir + "/cpu.weight", "1000"));
      } else {
        EM_RETURN_IF_ERROR(Write(g.dir + "/cpu.cfs_period_us", std::to_string(period_us)));
        EM_RETURN_IF_ERROR(Write(g.dir + "/cpu.cfs_quota_us", std::to_string(quota_us)));
        EM_RETURN_IF_ERROR(Write(g.dir + "/cpu.shares", "10240"));
      }
      // cgroup.procs moves the whole process, every thread, and the threads it starts later.
      EM_RETURN_IF_ERROR(Write(g.dir + "/cgroup.procs", std::to_string(pid)));
      EM_ASSIGN_OR_RETURN(std::string now, q->CgroupOf(pid));
      if (q->root_ + now != g.dir) {
        return absl::InternalError(
            absl::StrCat("pid ", pid, " is in ", now, " after moving it to ", g.dir));
      }
    }
    q->quota_us_ = quota_us;
    q->period_us_ = period_us;
    return q;
  }

  ~ShardCpuQuota() {
    for (const Group& g : groups_) {
      if (kill(g.pid, 0) == 0) {
        // Still running: back to where it was (an error here leaves the rmdir below failing).
        (void)Write(root_ + g.original + "/cgroup.procs", std::to_string(g.pid));
      }
      bool removed = false;
      for (int i = 0; i < 100 && !removed; ++i) {
        removed = rmdir(g.dir.c_str()) == 0 || errno == ENOENT;
        if (!removed) absl::SleepFor(absl::Milliseconds(20));
      }
      if (!removed) spdlog::warn("could not remove cgroup {}: {}", g.dir, std::strerror(errno));
    }
  }

  // Cumulative throttling per group (name -> stat).
  std::map<std::string, ThrottleStat> Read() const {
    std::map<std::string, ThrottleStat> out;
    for (const Group& g : groups_) {
      std::ifstream in(g.dir + "/cpu.stat");
      std::string key;
      double value = 0;
      ThrottleStat& s = out[g.name];
      while (in >> key >> value) {
        if (key == "nr_periods") s.periods = value;
        if (key == "nr_throttled") s.throttled = value;
        if (key == "throttled_time") s.throttled_s = value / 1e9;  // v1: ns
        if (key == "throttled_usec") s.throttled_s = value / 1e6;  // v2: µs
      }
    }
    return out;
  }

  double cores() const { return static_cast<double>(quota_us_) / static_cast<double>(period_us_); }

  std::string Describe() const {
    return absl::StrFormat(
        "cgroup %s, cpu quota %lld us per %lld us period (%.3f core) per shard replica",
        v2_ ? "v2" : "v1", static_cast<long long>(quota_us_), static_cast<long long>(period_us_),
        static_cast<double>(quota_us_) / static_cast<double>(period_us_));
  }

 private:
  struct Group {
    std::string name, dir, original;
    pid_t pid = -1;
  };
  ShardCpuQuota() = default;

  static absl::Status Write(const std::string& path, const std::string& value) {
    std::ofstream out(path);
    out << value;
    out.flush();
    if (!out)
      return absl::InternalError(absl::StrCat("writing \"", value, "\" to ", path, " failed"));
    return absl::OkStatus();
  }

  // The cgroup (path under root_) of a process for the cpu controller.
  absl::StatusOr<std::string> CgroupOf(pid_t pid) const {
    std::ifstream in(absl::StrCat("/proc/", pid, "/cgroup"));
    std::string line;
    while (std::getline(in, line)) {
      std::vector<std::string> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
      if (parts.size() != 3) continue;
      if (v2_ ? parts[0] == "0" && parts[1].empty()
              : absl::c_linear_search(std::vector<std::string>(absl::StrSplit(parts[1], ',')),
                                      "cpu")) {
        return parts[2] == "/" ? std::string() : parts[2];
      }
    }
    return absl::NotFoundError(
        absl::StrCat("no cpu cgroup for pid ", pid, " in /proc/", pid, "/cgroup"));
  }

  // Groups of an earlier bench that is no longer running (empty ones only: rmdir).
  void RemoveStale() const {
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(root_, ec)) {
      const std::string name = e.path().filename();
      constexpr absl::string_view kPrefix = "expertmesh-bench-rebalance-";
      if (!e.is_directory() || !absl::StartsWith(name, kPrefix)) continue;
      pid_t pid = 0;
      const std::string rest = name.substr(kPrefix.size());
      if (!absl::SimpleAtoi(rest.substr(0, rest.find('-')), &pid) || kill(pid, 0) == 0) continue;
      if (rmdir(e.path().c_str()) == 0)
        spdlog::info("removed a stale cgroup {}", e.path().string());
    }
  }

  std::string root_;
  bool v2_ = false;
  int64_t quota_us_ = 0, period_us_ = 0;
  std::vector<Group> groups_;
};

// What one phase boundary sees.
struct Snapshot {
  absl::Time at;
  std::map<std::pair<int, int>, uint64_t> tokens;  // (layer, expert) -> routed tokens so far
  v1::PlacementMap map;
  std::vector<double> rows;                      // per shard group, summed over its replicas
  std::map<std::string, double> cpu_s;           // per process
  int64_t generated = 0;                         // tokens the streams received so far
  std::map<std::string, ThrottleStat> throttle;  // per shard replica (--shard-cpu-quota)
};

absl::StatusOr<Snapshot> Snap(launcher::Cluster& c, const std::atomic<int64_t>& generated,
                              const ShardCpuQuota* quota) {
  Snapshot s;
  s.at = absl::Now();
  s.generated = generated.load();
  EM_ASSIGN_OR_RETURN(v1::StatusResponse st, RouterStatus(c));
  for (const v1::LayerExpertLoad& l : st.expert_load()) {
    s.tokens[{l.layer(), l.expert()}] = l.tokens();
  }
  s.map = st.placement();
  s.rows.assign(static_cast<size_t>(c.options().shards), 0.0);
  for (int g = 0; g < c.options().shards; ++g) {
    for (int r = 0; r < c.options().replicas; ++r) {
      EM_ASSIGN_OR_RETURN(double rows,
                          Metric(c.expert(g, r).metrics_port, "expertmesh_expert_rows_total"));
      s.rows[static_cast<size_t>(g)] += rows;
    }
  }
  s.cpu_s = ChildCpu(c);
  if (quota != nullptr) s.throttle = quota->Read();
  return s;
}

struct PhaseResult {
  double seconds = 0;
  double tokens_per_s = 0;
  double pairs_imbalance = 1;                    // mean over MoE layers of max/mean over groups
  double pairs_overall = 1;                      // max/mean over groups, all layers together
  std::vector<double> group_pairs;               // per group, all layers
  std::map<int, std::vector<double>> per_layer;  // layer -> per group pairs
  double rows_imbalance = 1;                     // max/mean of the shards' rows
  std::vector<double> group_rows;
  std::map<std::string, double> cpu_s;
  std::map<std::string, ThrottleStat> throttle;  // over the phase
};

double MaxOverMean(const std::vector<double>& v) {
  double sum = 0, mx = 0;
  for (double x : v) {
    sum += x;
    mx = std::max(mx, x);
  }
  return sum > 0 ? mx / (sum / static_cast<double>(v.size())) : 1.0;
}

PhaseResult Compare(const Snapshot& a, const Snapshot& b, int shards) {
  PhaseResult p;
  p.seconds = absl::ToDoubleSeconds(b.at - a.at);
  p.tokens_per_s = static_cast<double>(b.generated - a.generated) / p.seconds;
  std::map<std::pair<int, int>, std::vector<int>> holders;
  for (const v1::ShardGroup& g : b.map.shards()) {
    for (const v1::LayerExpert& le : g.experts()) {
      holders[{le.layer(), le.expert()}].push_back(g.shard_id());
    }
  }
  std::map<int, std::vector<double>>& per_layer = p.per_layer;
  p.group_pairs.assign(static_cast<size_t>(shards), 0.0);
  for (const auto& [le, total] : b.tokens) {
    auto it = a.tokens.find(le);
    const double d = static_cast<double>(total - (it == a.tokens.end() ? 0 : it->second));
    const std::vector<int>& h = holders[le];
    if (d <= 0 || h.empty()) continue;
    std::vector<double>& layer = per_layer[le.first];
    layer.resize(static_cast<size_t>(shards), 0.0);
    for (int g : h) {
      layer[static_cast<size_t>(g)] += d / static_cast<double>(h.size());
      p.group_pairs[static_cast<size_t>(g)] += d / static_cast<double>(h.size());
    }
  }
  double sum = 0;
  for (const auto& [layer, groups] : per_layer) sum += MaxOverMean(groups);
  p.pairs_imbalance = per_layer.empty() ? 1.0 : sum / static_cast<double>(per_layer.size());
  p.pairs_overall = MaxOverMean(p.group_pairs);
  for (size_t g = 0; g < a.rows.size(); ++g) p.group_rows.push_back(b.rows[g] - a.rows[g]);
  p.rows_imbalance = MaxOverMean(p.group_rows);
  for (const auto& [name, s] : b.cpu_s) {
    auto it = a.cpu_s.find(name);
    p.cpu_s[name] = s - (it == a.cpu_s.end() ? 0.0 : it->second);
  }
  for (const auto& [name, t] : b.throttle) {
    auto it = a.throttle.find(name);
    const ThrottleStat z = it == a.throttle.end() ? ThrottleStat{} : it->second;
    p.throttle[name] = {t.periods - z.periods, t.throttled - z.throttled,
                        t.throttled_s - z.throttled_s};
  }
  return p;
}

std::string Join(const std::vector<double>& v) {
  std::string out;
  for (double x : v) absl::StrAppend(&out, out.empty() ? "" : " ", static_cast<int64_t>(x));
  return out;
}

void PrintPhase(const char* name, const PhaseResult& p) {
  std::printf(
      "%-7s %8.1f s %10.1f tok/s   pairs max/mean: %.3f per layer (%.3f all layers; "
      "per group %s)   rows max/mean: %.3f (per group %s)\n",
      name, p.seconds, p.tokens_per_s, p.pairs_imbalance, p.pairs_overall,
      Join(p.group_pairs).c_str(), p.rows_imbalance, Join(p.group_rows).c_str());
  std::string cpu;
  double total = 0;
  for (const auto& [proc, s] : p.cpu_s) {
    absl::StrAppend(&cpu, "  ", proc, " ", absl::StrFormat("%.1f", s));
    total += s;
  }
  std::printf("        CPU seconds:%s  (total %.1f of %.1f core-seconds on %ld cores)\n",
              cpu.c_str(), total, p.seconds * static_cast<double>(sysconf(_SC_NPROCESSORS_ONLN)),
              sysconf(_SC_NPROCESSORS_ONLN));
  if (!p.throttle.empty()) {
    std::string t;
    for (const auto& [proc, s] : p.throttle) {
      absl::StrAppend(&t, absl::StrFormat("  %s %.0f/%.0f periods, %.1f s", proc, s.throttled,
                                          s.periods, s.throttled_s));
    }
    std::printf("        throttled (cgroup cpu.stat):%s\n", t.c_str());
  }
}

int Run(Flags f) {
  if (f.shard_cpu_quota > 0) {
    // Checked before anything starts: without the cgroups the figures would mean something else.
    if (absl::StatusOr<std::pair<std::string, bool>> where = ShardCpuQuota::Find(); !where.ok()) {
      std::printf("skipped: --shard-cpu-quota needs a writable cgroup cpu controller: %s\n",
                  std::string(where.status().message()).c_str());
      return 77;
    }
    if (f.expert_threads == 0) f.expert_threads = 1;  // one kernel thread inside the budget
  }
  std::string model_dir = f.model;
  std::string temp_dir;
  if (model_dir.empty()) {
    std::ifstream in(f.config);
    if (!in) {
      spdlog::error("cannot read --config {}", f.config);
      return 1;
    }
    std::stringstream text;
    text << in.rdbuf();
    absl::StatusOr<ModelConfig> config = ParseModelConfig(text.str());
    if (!config.ok()) {
      spdlog::error("--config {}: {}", f.config, config.status().ToString());
      return 1;
    }
    char tmpl[] = "/tmp/expertmesh-bench-rebalance-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) {
      spdlog::error("mkdtemp failed");
      return 1;
    }
    temp_dir = model_dir = tmpl;
    if (absl::Status s =
            WriteRandomCheckpoint(*config, text.str(), model_dir, f.seed, 2, f.gate_skew);
        !s.ok()) {
      spdlog::error("writing the checkpoint: {}", s.ToString());
      std::filesystem::remove_all(temp_dir);
      return 1;
    }
  }
  struct Cleanup {
    std::string dir;
    ~Cleanup() {
      if (!dir.empty()) std::filesystem::remove_all(dir);
    }
  } cleanup{temp_dir};
  absl::StatusOr<ModelConfig> config = LoadModelConfig(model_dir + "/config.json");
  if (!config.ok()) {
    spdlog::error("{}", config.status().ToString());
    return 1;
  }
  std::printf(
      "model %s: %lld layers (%lld dense), %lld routed experts, top-%lld%s\n", model_dir.c_str(),
      static_cast<long long>(config->num_hidden_layers),
      static_cast<long long>(config->first_k_dense_replace),
      static_cast<long long>(config->n_routed_experts),
      static_cast<long long>(config->num_experts_per_tok),
      temp_dir.empty() ? "" : absl::StrFormat(", random, gate skew %.2f", f.gate_skew).c_str());

  launcher::ClusterOptions o;
  o.model_dir = model_dir;
  o.shards = f.shards;
  o.replicas = f.replicas;
  o.max_batch = std::max(f.streams, 1);
  o.max_waiting = std::max(64, 2 * f.streams);
  o.kv_blocks = 4096;
  o.step_deadline_ms = 30000;
  o.extra_router_args = {"--no-rebalance", "--rebalance-min-tokens", "100"};
  if (f.redundant >= 0) {
    o.extra_router_args.push_back("--redundant-experts");
    o.extra_router_args.push_back(std::to_string(f.redundant));
  }
  o.extra_expert_args = {"--release-grace-s", "2"};
  if (f.expert_threads > 0) {
    o.extra_expert_args.push_back("--threads");
    o.extra_expert_args.push_back(std::to_string(f.expert_threads));
  }
  absl::StatusOr<std::unique_ptr<launcher::Cluster>> started = launcher::Cluster::Start(o);
  if (!started.ok()) {
    spdlog::error("{}", started.status().ToString());
    return 1;
  }
  launcher::Cluster& cluster = **started;
  std::unique_ptr<ShardCpuQuota> quota;  // removed before the cluster stops (declared after it)
  if (f.shard_cpu_quota > 0) {
    std::vector<std::pair<std::string, pid_t>> procs;
    for (int g = 0; g < f.shards; ++g) {
      for (int r = 0; r < f.replicas; ++r) {
        launcher::ChildProcess* p = cluster.expert_process(g, r);
        if (p == nullptr) {
          spdlog::error("no process for shard {} replica {}", g, r);
          return 1;
        }
        procs.emplace_back(absl::StrCat("shard", g, "-r", r), p->pid());
      }
    }
    absl::StatusOr<std::unique_ptr<ShardCpuQuota>> q =
        ShardCpuQuota::Create(f.shard_cpu_quota, f.shard_cpu_period_us, procs);
    if (!q.ok()) {
      spdlog::error("--shard-cpu-quota: {}", q.status().ToString());
      return 1;
    }
    quota = std::move(*q);
    std::printf(
        "each shard replica on its own CPU budget: %s, %d kernel thread(s); the "
        "attention service and the clients unthrottled\n",
        quota->Describe().c_str(), f.expert_threads);
  }
  std::printf(
      "cluster: router (--no-rebalance) + %d shard group(s) x %d replica(s) + attention "
      "service; %d greedy streams of %d tokens, prompts of %d tokens\n",
      f.shards, f.replicas, f.streams, f.max_tokens, f.prompt_len);
  std::fflush(stdout);

  // The streams, back to back until the end.
  std::atomic<bool> stop{false};
  std::atomic<int64_t> generated{0}, requests{0}, failures{0};
  std::vector<std::thread> streams;
  for (int i = 0; i < f.streams; ++i) {
    streams.emplace_back([&, i] {
      auto stub = v1::AttentionService::NewStub(MakeChannel(cluster.attention().grpc_address));
      Rng rng(1000 + static_cast<uint64_t>(i));
      for (int n = 0; !stop.load(); ++n) {
        v1::SubmitRequest r;
        r.set_request_id(absl::StrCat("bench-", i, "-", n));
        for (int j = 0; j < f.prompt_len; ++j) {
          r.add_prompt_token_ids(
              2 + static_cast<int32_t>(rng.Next() % static_cast<uint64_t>(config->vocab_size - 2)));
        }
        r.set_max_tokens(static_cast<uint32_t>(f.max_tokens));
        r.set_ignore_eos(true);
        r.mutable_sampling()->set_temperature(0.0f);
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(5));
        auto reader = stub->Submit(&ctx, r);
        v1::TokenEvent e;
        while (reader->Read(&e)) generated += e.token_ids_size();
        const grpc::Status s = reader->Finish();
        ++requests;
        if (!s.ok() && !stop.load()) {
          ++failures;
          spdlog::error("stream {}: {}", i, s.error_message());
        }
      }
    });
  }
  struct Joiner {
    std::atomic<bool>& stop;
    std::vector<std::thread>& threads;
    ~Joiner() {
      stop = true;
      for (std::thread& t : threads) t.join();
    }
  } joiner{stop, streams};

  auto phase = [&](const char* name) -> absl::StatusOr<PhaseResult> {
    absl::SleepFor(absl::Seconds(f.settle_s));
    EM_ASSIGN_OR_RETURN(Snapshot a, Snap(cluster, generated, quota.get()));
    absl::SleepFor(absl::Seconds(f.seconds));
    EM_ASSIGN_OR_RETURN(Snapshot b, Snap(cluster, generated, quota.get()));
    if (a.map.version() != b.map.version()) {
      return absl::InternalError(absl::StrCat("the map changed during the ", name, " phase"));
    }
    PhaseResult p = Compare(a, b, f.shards);
    PrintPhase(name, p);
    std::fflush(stdout);
    return p;
  };

  absl::StatusOr<PhaseResult> before = phase("before");
  if (!before.ok()) {
    spdlog::error("{}", before.status().ToString());
    return 1;
  }
  absl::StatusOr<v1::StatusResponse> st0 = RouterStatus(cluster);
  if (!st0.ok()) {
    spdlog::error("{}", st0.status().ToString());
    return 1;
  }
  v1::RebalanceResponse answer;
  {
    auto stub = v1::RouterService::NewStub(MakeChannel(cluster.router().grpc_address));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::RebalanceRequest req;
    req.set_force(true);
    if (grpc::Status s = stub->Rebalance(&ctx, req, &answer); !s.ok() || !answer.started()) {
      spdlog::error("Rebalance: {}", s.ok() ? answer.reason() : s.error_message());
      return 1;
    }
  }
  const absl::Time asked = absl::Now();
  std::printf(
      "rebalance (force): %s; the router predicts max/mean %.3f -> %.3f over its 60 s "
      "window\n",
      answer.reason().c_str(), answer.imbalance_before(), answer.imbalance_after());
  absl::StatusOr<v1::StatusResponse> st;
  while (true) {
    st = RouterStatus(cluster);
    if (!st.ok()) {
      spdlog::error("{}", st.status().ToString());
      return 1;
    }
    if (st->placement().version() > st0->placement().version() && !st->rebalance().pending() &&
        st->rebalance().rebalances() >= 1) {
      break;
    }
    if (absl::Now() - asked > absl::Seconds(120)) {
      spdlog::error("no new map after 120 s: {}", st->rebalance().last_result());
      return 1;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  std::printf("new map v%llu published %.0f ms after the call; %u redundant copies\n",
              static_cast<unsigned long long>(st->placement().version()),
              absl::ToDoubleMilliseconds(absl::Now() - asked), st->rebalance().redundant_copies());
  std::fflush(stdout);

  absl::StatusOr<PhaseResult> after = phase("after");
  if (!after.ok()) {
    spdlog::error("{}", after.status().ToString());
    return 1;
  }
  stop = true;
  for (std::thread& t : streams) t.join();
  streams.clear();

  const double predicted = before->pairs_imbalance / after->pairs_imbalance;
  const double measured = after->tokens_per_s / before->tokens_per_s;
  // Where the shard groups share C < groups cores, a step's expert phase takes about
  // max(busiest group, all groups / C) per layer, not the busiest group alone.
  const double cores = static_cast<double>(std::min<long>(sysconf(_SC_NPROCESSORS_ONLN), f.shards));
  auto shared_time = [&](const PhaseResult& p) {
    double sum = 0;
    for (const auto& [layer, groups] : p.per_layer) {
      double total = 0, mx = 0;
      for (double x : groups) {
        total += x;
        mx = std::max(mx, x);
      }
      if (total > 0) sum += std::max(mx, total / cores) / total;  // per routed pair
    }
    return sum;
  };
  const double predicted_here = shared_time(*before) / shared_time(*after);
  // The same from what the shards really spent: the busiest shard replica's CPU seconds per
  // generated token (a shard's cost also grows with its rows, not only with its pairs).
  auto busiest_cpu_per_token = [](const PhaseResult& p) {
    double mx = 0;
    for (const auto& [proc, s] : p.cpu_s) {
      if (absl::StartsWith(proc, "shard")) mx = std::max(mx, s);
    }
    return mx / std::max(1.0, p.tokens_per_s * p.seconds);
  };
  const double predicted_cpu = busiest_cpu_per_token(*before) / busiest_cpu_per_token(*after);
  // The busiest group's rows per generated token (rows grow when a token's experts spread over
  // more groups, which the pairs do not see).
  auto busiest_rows_per_token = [](const PhaseResult& p) {
    double mx = 0;
    for (double r : p.group_rows) mx = std::max(mx, r);
    return mx / std::max(1.0, p.tokens_per_s * p.seconds);
  };
  const double predicted_rows = busiest_rows_per_token(*before) / busiest_rows_per_token(*after);
  std::printf(
      "max/mean per shard group (pairs, per layer): %.3f -> %.3f (goal <= 1.15: %s); rows: "
      "%.3f -> %.3f\n",
      before->pairs_imbalance, after->pairs_imbalance,
      after->pairs_imbalance <= 1.15 ? "met" : "missed", before->rows_imbalance,
      after->rows_imbalance);
  if (quota == nullptr) {
    std::printf(
        "tokens/s: %.1f -> %.1f: measured x%.3f; predicted where the busiest shard group sets "
        "the pace: x%.3f (pairs, a core per group), x%.3f (pairs, groups sharing %.0f cores), "
        "x%.3f (the busiest shard's CPU seconds per token), x%.3f (the busiest group's rows per "
        "token); the attention service's own time is in none of them\n",
        before->tokens_per_s, after->tokens_per_s, measured, predicted, predicted_here, cores,
        predicted_cpu, predicted_rows);
  } else {
    // Every replica has the same budget, so the busiest group's work per token sets the pace.
    // (Its CPU seconds per token are the budget over the rate once it is saturated, so they
    // predict nothing here.)
    std::printf(
        "tokens/s: %.1f -> %.1f: measured x%.3f; predicted where the busiest shard group sets "
        "the pace: x%.3f (pairs per group, max/mean before / after), x%.3f (the busiest group's "
        "rows per token); the attention service's own time is in neither\n",
        before->tokens_per_s, after->tokens_per_s, measured, predicted, predicted_rows);
    const double budget = quota->cores();
    auto busiest = [](const std::vector<double>& v) {
      return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin());
    };
    auto line = [&](const char* label, const PhaseResult& p, int g) {
      double cpu = 0, periods = 0, throttled = 0, throttled_s = 0;
      for (int r = 0; r < f.replicas; ++r) {
        const std::string name = absl::StrCat("shard", g, "-r", r);
        cpu += p.cpu_s.count(name) ? p.cpu_s.at(name) : 0.0;
        if (auto it = p.throttle.find(name); it != p.throttle.end()) {
          periods += it->second.periods;
          throttled += it->second.throttled;
          throttled_s += it->second.throttled_s;
        }
      }
      std::printf(
          "  %s: shard group %d: CPU %.2f of %.2f core-s budget (%.0f %%), throttled in %.0f of "
          "%.0f periods (%.0f %%), %.1f s throttled\n",
          label, g, cpu, budget * p.seconds * f.replicas,
          100.0 * cpu / (budget * p.seconds * f.replicas), throttled, periods,
          periods > 0 ? 100.0 * throttled / periods : 0.0, throttled_s);
    };
    const int hot = busiest(before->group_pairs);
    std::printf("the busiest shard group before (most pairs), and the busiest after:\n");
    line("before", *before, hot);
    line("after ", *after, hot);
    line("after ", *after, busiest(after->group_pairs));
  }
  std::printf("requests: %lld finished, %lld failed\n", static_cast<long long>(requests.load()),
              static_cast<long long>(failures.load()));
  const bool stopped = cluster.Stop().ok();
  quota.reset();  // the processes have exited: only the groups are left to remove
  return failures.load() == 0 && stopped ? 0 : 1;
}

}  // namespace
}  // namespace expertmesh

int main(int argc, char** argv) {
  CLI::App app{
      "A skewed expert load on a cluster of shard groups: load max/mean per group and decode "
      "tokens/s before and after the router's live rebalance, in one run"};
  expertmesh::Flags f;
  app.add_option("--model", f.model, "Checkpoint directory (default: a random one from --config)")
      ->check(CLI::ExistingDirectory);
  app.add_option("--config", f.config, "config.json of the random checkpoint")
      ->capture_default_str();
  app.add_option("--gate-skew", f.gate_skew,
                 "Gate bias added to the first quarter of each layer's experts (random model)")
      ->check(CLI::Range(0.0, 10.0))
      ->capture_default_str();
  app.add_option("--seed", f.seed, "Seed of the random checkpoint")->capture_default_str();
  app.add_option("--shards", f.shards, "Shard groups")
      ->check(CLI::Range(2, 64))
      ->capture_default_str();
  app.add_option("--replicas", f.replicas, "Replicas per shard group")
      ->check(CLI::Range(1, 8))
      ->capture_default_str();
  app.add_option("--streams", f.streams, "Concurrent greedy streams")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--max-tokens", f.max_tokens, "Tokens per request")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--prompt-len", f.prompt_len, "Prompt tokens per request")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--seconds", f.seconds, "Length of each measured phase")
      ->check(CLI::Range(1.0, 3600.0))
      ->capture_default_str();
  app.add_option("--settle-s", f.settle_s,
                 "Wait before each phase (load reports trail by up to 5 s)")
      ->check(CLI::Range(0.0, 600.0))
      ->capture_default_str();
  app.add_option("--redundant-experts", f.redundant,
                 "The router's --redundant-experts (-1: its default, every free slot)")
      ->check(CLI::Range(-1, 1 << 20))
      ->capture_default_str();
  app.add_option("--expert-threads", f.expert_threads,
                 "Kernel threads per shard replica (expert-service --threads; 0: its default)")
      ->check(CLI::Range(0, 256))
      ->capture_default_str();
  app.add_option("--shard-cpu-quota", f.shard_cpu_quota,
                 "CPU budget per shard replica in cores (e.g. 0.2), one cgroup each (v1 "
                 "cpu.cfs_quota_us or v2 cpu.max; needs root): each shard group as on its own slow "
                 "hardware, so the busiest group sets the pace. The attention service stays "
                 "unthrottled. Implies --expert-threads 1 unless given. 0 = off. Exits with 77 "
                 "(skipped) when the cgroup cpu controller is not writable")
      ->check(CLI::Range(0.0, 64.0))
      ->capture_default_str();
  app.add_option("--shard-cpu-period-us", f.shard_cpu_period_us,
                 "cgroup CPU period for --shard-cpu-quota (quota = fraction x period)")
      ->check(CLI::Range(int64_t{1000}, int64_t{1000000}))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  return expertmesh::Run(f);
}
