#include "service-common/process.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <random>

#include "absl/strings/str_cat.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

namespace expertmesh {

absl::Status SetupLogging(const std::string& service, const std::string& level) {
  const spdlog::level::level_enum lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off") {
    return absl::InvalidArgumentError(absl::StrCat("unknown log level '", level, "'"));
  }
  auto logger = spdlog::stderr_color_mt(service);
  logger->set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%n] [%^%l%$] %v");
  logger->set_level(lvl);
  spdlog::set_default_logger(logger);
  return absl::OkStatus();
}

namespace {
sigset_t TerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  return set;
}
}  // namespace

absl::Status BlockTerminationSignals() {
  const sigset_t set = TerminationSignals();
  if (int rc = pthread_sigmask(SIG_BLOCK, &set, nullptr); rc != 0) {
    return absl::InternalError(absl::StrCat("pthread_sigmask: ", std::strerror(rc)));
  }
  return absl::OkStatus();
}

int WaitForTerminationSignal() {
  const sigset_t set = TerminationSignals();
  int sig = 0;
  while (sigwait(&set, &sig) != 0) {
  }
  return sig;
}

namespace {

// Binds a TCP socket on 0.0.0.0:port (port 0: the kernel picks); the bound port, or -1.
int BindProbe(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  socklen_t len = sizeof(addr);
  int bound = -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    bound = ntohs(addr.sin_port);
  }
  close(fd);
  return bound;
}

}  // namespace

absl::StatusOr<int> PickFreePort() {
  // Below the kernel's ephemeral range: ports handed to child processes stay free until the
  // children bind them, whatever the machine binds to port 0 or connects out meanwhile (both
  // take ephemeral ports; an expert shard's data-plane listener and connections do).
  int low = 32768, high = 60999;
  if (std::ifstream range("/proc/sys/net/ipv4/ip_local_port_range"); range) range >> low >> high;
  const int first = 10000;
  const int last = low - 1;
  if (last - first >= 1024) {
    static std::mutex mu;
    static std::mt19937 rng(std::random_device{}() ^ static_cast<unsigned>(getpid()));
    for (int attempt = 0; attempt < 64; ++attempt) {
      int port;
      {
        std::lock_guard<std::mutex> lock(mu);
        port = std::uniform_int_distribution<int>(first, last)(rng);
      }
      if (BindProbe(port) == port) return port;
    }
  }
  // No room below the ephemeral range (or all tried were taken): one the kernel picks.
  const int port = BindProbe(0);
  if (port <= 0)
    return absl::UnavailableError(absl::StrCat("bind 0.0.0.0:0: ", std::strerror(errno)));
  return port;
}

}  // namespace expertmesh
