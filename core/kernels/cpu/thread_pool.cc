#include "core/kernels/cpu/thread_pool.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace expertmesh::cpu {
namespace {

// quota / period from "max 100000" or "200000 100000" (v2) or two v1 files; 0 = no limit.
int CgroupCpuLimit() {
  auto ceil_div = [](int64_t q, int64_t p) {
    return static_cast<int>(std::max<int64_t>(1, (q + p - 1) / p));
  };
  std::string rel;  // this process's cgroup v2 path, "0::/a/b"
  {
    std::ifstream f("/proc/self/cgroup");
    std::string line;
    while (std::getline(f, line)) {
      if (line.rfind("0::", 0) == 0) rel = line.substr(3);
    }
  }
  for (const std::string& path :
       {"/sys/fs/cgroup" + rel + "/cpu.max", std::string("/sys/fs/cgroup/cpu.max")}) {
    std::ifstream f(path);
    std::string quota;
    int64_t period = 0;
    if (f >> quota >> period) {
      if (quota == "max" || period <= 0) return 0;
      try {
        const int64_t q = std::stoll(quota);
        return q > 0 ? ceil_div(q, period) : 0;
      } catch (...) {
        return 0;
      }
    }
  }
  std::ifstream fq("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
      fp("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
  int64_t q = 0, p = 0;
  if (fq >> q && fp >> p && q > 0 && p > 0) return ceil_div(q, p);
  return 0;
}

class Pool {
 public:
  explicit Pool(int threads) : threads_(std::max(1, threads)) {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int threads() const { return threads_; }

  void Run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    grain = std::max<int64_t>(1, grain);
    const int64_t pieces = std::min<int64_t>(threads_, n / grain);
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (pieces < 2 || !busy.owns_lock()) {
      if (n > 0) fn(0, n);
      return;
    }
    Job job{&fn, n, pieces};
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &job;
      ++generation_;
    }
    cv_.notify_all();
    const int64_t mine = job.RunPieces();
    std::unique_lock<std::mutex> lock(mu_);
    job.done += mine;
    // Every piece ran and no worker still holds the job (it lives on this stack).
    done_cv_.wait(lock, [&] { return job.done == job.pieces && active_ == 0; });
    job_ = nullptr;
  }

 private:
  struct Job {
    const std::function<void(int64_t, int64_t)>* fn;
    int64_t n, pieces;
    std::atomic<int64_t> next{0};
    int64_t done = 0;  // guarded by mu_
    // Takes pieces until none is left; returns how many it ran.
    int64_t RunPieces() {
      int64_t ran = 0;
      for (;;) {
        const int64_t p = next.fetch_add(1, std::memory_order_relaxed);
        if (p >= pieces) return ran;
        (*fn)(n * p / pieces, n * (p + 1) / pieces);
        ++ran;
      }
    }
  };

  void Work() {
    uint64_t seen = 0;
    for (;;) {
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || (job_ != nullptr && generation_ != seen); });
        if (stop_) return;
        seen = generation_;
        job = job_;
        ++active_;
      }
      const int64_t ran = job->RunPieces();
      {
        std::lock_guard<std::mutex> lock(mu_);
        job->done += ran;
        --active_;
      }
      done_cv_.notify_all();
    }
  }

  const int threads_;
  std::vector<std::thread> workers_;
  std::mutex busy_;  // one caller's work at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  Job* job_ = nullptr;  // the running job, guarded by mu_
  int active_ = 0;      // workers holding job_
};

std::mutex g_mu;
std::shared_ptr<Pool> g_pool;  // guarded by g_mu; made on first use

std::shared_ptr<Pool> GetPool() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_pool) g_pool = std::make_shared<Pool>(AvailableCpus());
  return g_pool;
}

}  // namespace

int AvailableCpus() {
  int n = static_cast<int>(std::thread::hardware_concurrency());
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
  const int limit = CgroupCpuLimit();
  if (limit > 0) n = std::min(n, limit);
  return std::max(1, n);
}

void SetKernelThreads(int threads) {
  const int n = threads <= 0 ? AvailableCpus() : threads;
  std::shared_ptr<Pool> old;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_pool && g_pool->threads() == n) return;
    old = std::move(g_pool);
    g_pool = std::make_shared<Pool>(n);
  }
  // `old` joins its threads here, once no caller holds it.
}

int KernelThreads() { return GetPool()->threads(); }

void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  GetPool()->Run(n, grain, fn);
}

}  // namespace expertmesh::cpu
