// Process-level plumbing: spdlog set-up, SIGTERM/SIGINT handling, free ports.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace expertmesh {

// Default logger: "[time] [service] [level] message" on stderr; level is one of
// trace, debug, info, warn, error, critical, off.
absl::Status SetupLogging(const std::string& service, const std::string& level = "info");

// Termination signals. Call BlockTerminationSignals() first thing in main, before any
// thread starts (threads inherit the mask), then WaitForTerminationSignal() where the
// service should begin its orderly shutdown: it returns the signal number (SIGTERM/SIGINT).
// No signal handler runs; the signal is taken synchronously with sigwait.
absl::Status BlockTerminationSignals();
int WaitForTerminationSignal();

// A TCP port that was free when asked (bound on 0.0.0.0, then released), chosen at random
// below the kernel's ephemeral port range (ip_local_port_range) so that what binds port 0 or
// connects out before the port's user binds it cannot take it. Prefer binding port 0 directly
// where the API allows it; this is for handing ports to child processes.
absl::StatusOr<int> PickFreePort();

}  // namespace expertmesh
