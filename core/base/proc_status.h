// The memory figures of a process as Linux reports them in /proc/<pid>/status (VmRSS: resident
// now, VmHWM: peak resident), for the memory tests and benchmarks.
#pragma once

#include <cstdint>
#include <string_view>

namespace expertmesh::base {

// The field (e.g. "VmRSS", "VmHWM") of /proc/<pid>/status in bytes; pid 0 = this process.
// -1 when the process or the field does not exist.
int64_t ProcStatusBytes(std::string_view field, int pid = 0);

// Resets this process's VmHWM to its current RSS (writes 5 to /proc/self/clear_refs); false
// where the kernel refuses it (or the peak did not follow).
bool ResetPeakRss();

}  // namespace expertmesh::base
