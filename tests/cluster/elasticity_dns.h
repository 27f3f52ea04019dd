// A DNS server on loopback for the discovery tests: it answers A queries (UDP) for the names it
// is given with the addresses it is given, like a Kubernetes headless Service answers with one
// A record per ready pod, and changes its answers when the test scales the replicas. AAAA
// queries for a known name get an empty answer, unknown names NXDOMAIN. TTL 0. The gateway
// reaches it with --attention dns://127.0.0.1:<port>/<name>:<port>.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

namespace expertmesh::testing {

class LoopbackDns {
 public:
  static absl::StatusOr<std::unique_ptr<LoopbackDns>> Start();
  ~LoopbackDns();

  int port() const { return port_; }
  // The IPv4 addresses `name` resolves to from now on (empty: NOERROR with no records).
  void Set(const std::string& name, std::vector<std::string> ipv4);
  // Queries answered so far.
  int queries() const { return queries_.load(); }

 private:
  LoopbackDns() = default;
  void Serve();

  int fd_ = -1;
  int port_ = 0;
  std::mutex mu_;
  std::map<std::string, std::vector<std::string>> records_;  // lower-case name, no final dot
  std::atomic<bool> stop_{false};
  std::atomic<int> queries_{0};
  std::thread thread_;
};

}  // namespace expertmesh::testing
