#include "tests/cluster/elasticity_dns.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cctype>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace expertmesh::testing {

absl::StatusOr<std::unique_ptr<LoopbackDns>> LoopbackDns::Start() {
  std::unique_ptr<LoopbackDns> dns(new LoopbackDns());
  dns->fd_ = socket(AF_INET, SOCK_DGRAM, 0);
  if (dns->fd_ < 0) return absl::InternalError(absl::StrCat("socket: ", strerror(errno)));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(dns->fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return absl::InternalError(absl::StrCat("bind: ", strerror(errno)));
  }
  socklen_t len = sizeof addr;
  getsockname(dns->fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  dns->port_ = ntohs(addr.sin_port);
  timeval tv{.tv_sec = 0, .tv_usec = 100000};  // the loop checks stop_ every 100 ms
  setsockopt(dns->fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  dns->thread_ = std::thread([p = dns.get()] { p->Serve(); });
  return dns;
}

LoopbackDns::~LoopbackDns() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  if (fd_ >= 0) close(fd_);
}

void LoopbackDns::Set(const std::string& name, std::vector<std::string> ipv4) {
  std::string key;
  for (char c : name) key += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  std::lock_guard lock(mu_);
  records_[key] = std::move(ipv4);
}

void LoopbackDns::Serve() {
  unsigned char in[512];
  while (!stop_) {
    sockaddr_in peer{};
    socklen_t peer_len = sizeof peer;
    const ssize_t n =
        recvfrom(fd_, in, sizeof in, 0, reinterpret_cast<sockaddr*>(&peer), &peer_len);
    if (n < 12) continue;  // timeout, or not even a header
    // Header (12 bytes), then one question: labels, QTYPE, QCLASS.
    size_t pos = 12;
    std::string name;
    while (pos < static_cast<size_t>(n) && in[pos] != 0 && in[pos] < 64) {
      const size_t label = in[pos];
      if (pos + 1 + label > static_cast<size_t>(n)) break;
      if (!name.empty()) name += '.';
      for (size_t i = 0; i < label; ++i) {
        name += static_cast<char>(std::tolower(in[pos + 1 + i]));
      }
      pos += 1 + label;
    }
    if (pos + 5 > static_cast<size_t>(n) || in[pos] != 0) continue;
    const size_t question_end = pos + 5;
    const int qtype = (in[pos + 1] << 8) | in[pos + 2];
    std::vector<std::string> ips;
    bool known = false;
    {
      std::lock_guard lock(mu_);
      auto it = records_.find(name);
      if (it != records_.end()) {
        known = true;
        if (qtype == 1) ips = it->second;  // A
      }
    }
    std::vector<unsigned char> out(in, in + question_end);
    out[2] = 0x84 | (in[2] & 0x01);  // QR, authoritative, the query's RD
    out[3] = known ? 0x00 : 0x03;    // NOERROR or NXDOMAIN
    out[4] = 0;
    out[5] = 1;  // one question
    out[6] = static_cast<unsigned char>(ips.size() >> 8);
    out[7] = static_cast<unsigned char>(ips.size());
    for (int i = 8; i < 12; ++i) out[i] = 0;  // no authority, no additional records
    for (const std::string& ip : ips) {
      in_addr a{};
      if (inet_pton(AF_INET, ip.c_str(), &a) != 1) continue;
      const unsigned char rr[] = {0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4};  // name ptr, A, IN,
      out.insert(out.end(), rr, rr + sizeof rr);                              // TTL 0, 4 bytes
      const auto* b = reinterpret_cast<const unsigned char*>(&a.s_addr);
      out.insert(out.end(), b, b + 4);
    }
    sendto(fd_, out.data(), out.size(), 0, reinterpret_cast<sockaddr*>(&peer), peer_len);
    ++queries_;
  }
}

}  // namespace expertmesh::testing
