// The CPU kernels' threads: one small persistent pool per process (no thread is created per
// matmul). Kernels split their work by output rows, and every output is computed by the same
// code in the same order whatever the split, so results do not depend on the thread count.
//
// The default thread count is every CPU the process may use: the CPUs of its affinity mask
// (sched_getaffinity), capped by the cgroup CPU limit (cpu.max, or cpu.cfs_quota_us /
// cpu.cfs_period_us on cgroup v1) rounded up. Services take --threads to lower or raise it.
#pragma once

#include <cstdint>
#include <functional>

namespace expertmesh::cpu {

// The CPUs this process may use (>= 1), as described above.
int AvailableCpus();

// Sets how many threads the kernels use, the caller's included (1 = the caller only). 0 means
// AvailableCpus(). Stops the old pool's threads and starts the new ones; call it while no kernel
// runs (at start-up).
void SetKernelThreads(int threads);
// The current count (AvailableCpus() until SetKernelThreads is called).
int KernelThreads();

// Runs fn(begin, end) over disjoint ranges covering [0, n), in at most KernelThreads() pieces of
// at least `grain` items, on the pool and the calling thread; returns when all are done. When
// the pool is busy with another caller's work (several threads calling kernels at once), or
// n < 2 * grain, it runs fn(0, n) on the caller alone.
void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace expertmesh::cpu
