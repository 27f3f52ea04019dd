#include "tools/launcher/process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "spdlog/spdlog.h"

namespace expertmesh::launcher {

absl::StatusOr<std::unique_ptr<ChildProcess>> ChildProcess::Start(const ProcessSpec& spec) {
  if (access(spec.binary.c_str(), X_OK) != 0) {
    return absl::NotFoundError(
        absl::StrCat(spec.name, ": binary ", spec.binary, " is not executable: ", strerror(errno)));
  }
  int log_fd = -1;
  if (!spec.log_path.empty()) {
    log_fd = open(spec.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) {
      return absl::PermissionDeniedError(
          absl::StrCat(spec.name, ": cannot open log ", spec.log_path, ": ", strerror(errno)));
    }
  }
  // argv is built before fork: the child may only make async-signal-safe calls.
  std::vector<std::string> storage;
  storage.push_back(spec.binary);
  storage.insert(storage.end(), spec.args.begin(), spec.args.end());
  std::vector<char*> argv;
  for (std::string& s : storage) argv.push_back(s.data());
  argv.push_back(nullptr);
  const pid_t parent = getpid();

  const pid_t pid = fork();
  if (pid < 0) {
    if (log_fd >= 0) close(log_fd);
    return absl::ResourceExhaustedError(absl::StrCat(spec.name, ": fork: ", strerror(errno)));
  }
  if (pid == 0) {  // child
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);  // the parent died before prctl took effect
    if (log_fd >= 0) {
      dup2(log_fd, STDOUT_FILENO);
      dup2(log_fd, STDERR_FILENO);
    }
    const int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, STDIN_FILENO);
    // Signals blocked or ignored by the launcher's threads must not leak into the service.
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
    execv(argv[0], argv.data());
    _exit(127);
  }
  if (log_fd >= 0) close(log_fd);
  spdlog::info("started {} (pid {}): {} {}", spec.name, pid, spec.binary,
               absl::StrJoin(spec.args, " "));
  return std::unique_ptr<ChildProcess>(new ChildProcess(spec, pid));
}

ChildProcess::~ChildProcess() {
  if (Running()) {
    const absl::Status s = Stop(absl::Seconds(5));
    if (!s.ok()) spdlog::warn("{}", s.ToString());
  }
}

bool ChildProcess::Running() {
  if (exit_status_.has_value()) return false;
  int status = 0;
  const pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    exit_status_ = status;
    return false;
  }
  if (r < 0 && errno == ECHILD) {  // reaped elsewhere; treat as gone
    exit_status_ = 0;
    return false;
  }
  return true;
}

std::string ChildProcess::ExitDescription() const {
  if (!exit_status_.has_value()) return "running";
  const int s = *exit_status_;
  if (WIFEXITED(s)) return absl::StrCat("exited with ", WEXITSTATUS(s));
  if (WIFSIGNALED(s)) return absl::StrCat("killed by signal ", WTERMSIG(s));
  return absl::StrCat("wait status ", s);
}

void ChildProcess::Signal(int sig) {
  if (Running()) kill(pid_, sig);
}

bool ChildProcess::WaitFor(absl::Duration timeout) {
  // The library polls (a service's exit is not on any test's timing path); 5 ms granularity.
  const absl::Time end = absl::Now() + timeout;
  while (Running()) {
    if (absl::Now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

absl::Status ChildProcess::Stop(absl::Duration grace) {
  if (!Running()) return absl::OkStatus();
  kill(pid_, SIGTERM);
  if (!WaitFor(grace)) {
    spdlog::warn("{} (pid {}) did not exit within {} of SIGTERM; sending SIGKILL", spec_.name, pid_,
                 absl::FormatDuration(grace));
    kill(pid_, SIGKILL);
    WaitFor(absl::InfiniteDuration());
    return absl::DeadlineExceededError(
        absl::StrCat(spec_.name, " ignored SIGTERM for ", absl::FormatDuration(grace)));
  }
  const int s = *exit_status_;
  if (WIFEXITED(s) && WEXITSTATUS(s) == 0) return absl::OkStatus();
  if (WIFSIGNALED(s) && WTERMSIG(s) == SIGTERM) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat(spec_.name, " ", ExitDescription(), " after SIGTERM"));
}

std::string TailOfFile(const std::string& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  const std::streamoff start = size > static_cast<std::streamoff>(max_bytes)
                                   ? size - static_cast<std::streamoff>(max_bytes)
                                   : 0;
  in.seekg(start);
  std::string out(static_cast<size_t>(size - start), '\0');
  in.read(out.data(), static_cast<std::streamsize>(out.size()));
  return out;
}

}  // namespace expertmesh::launcher
