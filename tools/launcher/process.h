// A child process of the launcher: one service binary started with fork + exec, its stdout
// and stderr appended to a log file, stopped the way a service expects to be stopped
// (SIGTERM, wait for a grace period, then SIGKILL). `expertmesh up` and the cluster tests
// both start services through this, so a test exercises the same start/stop path as an
// operator does.
//
// Children are started with PR_SET_PDEATHSIG=SIGKILL: if the launcher dies without stopping
// them (a crashed test), the kernel kills them instead of leaving orphans holding ports.
// The signal follows the *thread* that forked, so start children from a long-lived thread.
#pragma once

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace expertmesh::launcher {

struct ProcessSpec {
  std::string name;               // for logs, e.g. "expert-service[shard 1 replica 0]"
  std::string binary;             // absolute path
  std::vector<std::string> args;  // argv[1..]
  std::string log_path;           // stdout + stderr appended here; empty = inherit
};

class ChildProcess {
 public:
  // Forks and execs spec.binary. Fails when the binary is not executable or the log file
  // cannot be opened (checked before forking).
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Start(const ProcessSpec& spec);
  ~ChildProcess();  // Stop(absl::Seconds(5)) when still running

  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  const ProcessSpec& spec() const { return spec_; }
  pid_t pid() const { return pid_; }

  // True while the process has not exited (reaps it when it has).
  bool Running();
  // The wait status once the process exited (see Running()), as from waitpid.
  std::optional<int> exit_status() const { return exit_status_; }
  // Describes how it exited: "exited with 0", "killed by signal 9", "running".
  std::string ExitDescription() const;

  // Sends a signal (no-op when it has already exited).
  void Signal(int sig);
  // SIGTERM, wait up to `grace`, then SIGKILL and wait. OK when it exited on SIGTERM with
  // status 0 (or was already gone); FailedPrecondition describing the exit otherwise.
  absl::Status Stop(absl::Duration grace);
  // Waits for exit up to `timeout`; true when it exited.
  bool WaitFor(absl::Duration timeout);

 private:
  ChildProcess(ProcessSpec spec, pid_t pid) : spec_(std::move(spec)), pid_(pid) {}
  ProcessSpec spec_;
  pid_t pid_ = -1;
  std::optional<int> exit_status_;
};

// The last `max_bytes` of a log file (for error messages when a service fails to start).
std::string TailOfFile(const std::string& path, size_t max_bytes = 2000);

}  // namespace expertmesh::launcher
