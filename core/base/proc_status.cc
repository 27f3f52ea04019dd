#include "core/base/proc_status.h"

#include <fstream>
#include <string>

namespace expertmesh::base {

int64_t ProcStatusBytes(std::string_view field, int pid) {
  std::ifstream f(pid == 0 ? std::string("/proc/self/status")
                           : "/proc/" + std::to_string(pid) + "/status");
  const std::string key = std::string(field) + ":";
  std::string k;
  while (f >> k) {
    if (k == key) {
      int64_t kb = -1;
      f >> kb;
      return kb < 0 ? -1 : kb * 1024;
    }
    f.ignore(1 << 16, '\n');
  }
  return -1;
}

bool ResetPeakRss() {
  {
    std::ofstream f("/proc/self/clear_refs");
    f << "5";
    f.flush();
    if (!f.good()) return false;
  }
  return ProcStatusBytes("VmHWM") <= ProcStatusBytes("VmRSS") + (4 << 20);
}

}  // namespace expertmesh::base
