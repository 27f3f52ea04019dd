// netdelay: a TCP relay that delays each direction by a fixed time (see relay.h for why and
// what it does not model), an echo server, and a ping-pong client to measure a path.
//   netdelay --listen 10.77.1.2:9000 --connect 127.0.0.1:8000 --delay-us 500
//   netdelay --echo 127.0.0.1:8000
//   netdelay --ping 10.77.1.2:9000 --bytes 4096 --count 2000
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"
#include "tools/netdelay/relay.h"

namespace {

volatile sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }

void WaitForSignal() {
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  while (!g_stop) pause();
}

double Percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5));
  return v[i];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "TCP relay adding a fixed one-way delay to each direction (netem stand-in); echo server "
      "and ping-pong client to measure a path"};
  std::string listen, connect, echo, ping;
  int64_t delay_us = 0;
  size_t max_queue_mib = 16, bytes = 4096;
  int max_connections = 64, count = 1000, warmup = 100;
  auto* listen_opt = app.add_option("--listen", listen, "Relay: accept on host:port");
  app.add_option("--connect", connect, "Relay: forward each connection to host:port")
      ->needs(listen_opt);
  app.add_option("--delay-us", delay_us, "Relay: one-way delay per direction (microseconds)")
      ->check(CLI::Range(int64_t{0}, int64_t{10000000}))
      ->capture_default_str();
  app.add_option("--max-queue-mib", max_queue_mib,
                 "Relay: bytes in flight per direction per connection before the reader waits")
      ->check(CLI::Range(size_t{1}, size_t{4096}))
      ->capture_default_str();
  app.add_option("--max-connections", max_connections, "Relay/echo: open connections at most")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  app.add_option("--echo", echo, "Echo server: accept on host:port and write back what comes");
  app.add_option("--ping", ping, "Ping-pong client: round trips to an echo server at host:port");
  app.add_option("--bytes", bytes, "Ping: bytes per round trip each way")
      ->check(CLI::Range(size_t{1}, size_t{1} << 30))
      ->capture_default_str();
  app.add_option("--count", count, "Ping: measured round trips")
      ->check(CLI::Range(1, 100000000))
      ->capture_default_str();
  app.add_option("--warmup", warmup, "Ping: unmeasured round trips first")
      ->check(CLI::Range(0, 100000000))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  const int modes = !listen.empty() + !echo.empty() + !ping.empty();
  if (modes != 1 || (!listen.empty() && connect.empty())) {
    std::fprintf(stderr, "give exactly one of --listen (with --connect), --echo, --ping\n");
    return 2;
  }
  using namespace expertmesh::netdelay;
  if (!ping.empty()) {
    absl::StatusOr<std::vector<double>> rtt = PingPong(ping, bytes, count, warmup);
    if (!rtt.ok()) {
      std::fprintf(stderr, "ping: %s\n", rtt.status().ToString().c_str());
      return 1;
    }
    double sum = 0;
    for (double x : *rtt) sum += x;
    std::printf("rtt_us bytes=%zu count=%d min=%.1f p50=%.1f p90=%.1f p99=%.1f mean=%.1f\n", bytes,
                count, Percentile(*rtt, 0), Percentile(*rtt, 0.5), Percentile(*rtt, 0.9),
                Percentile(*rtt, 0.99), sum / rtt->size());
    return 0;
  }
  if (!echo.empty()) {
    absl::StatusOr<std::unique_ptr<EchoServer>> server = EchoServer::Create(echo, max_connections);
    if (!server.ok()) {
      std::fprintf(stderr, "echo: %s\n", server.status().ToString().c_str());
      return 1;
    }
    std::printf("echo listening on port %u\n", (*server)->port());
    std::fflush(stdout);
    WaitForSignal();
    return 0;
  }
  RelayOptions o;
  o.listen = listen;
  o.connect = connect;
  o.delay = std::chrono::microseconds(delay_us);
  o.max_queue_bytes = max_queue_mib << 20;
  o.max_connections = max_connections;
  absl::StatusOr<std::unique_ptr<Relay>> relay = Relay::Create(o);
  if (!relay.ok()) {
    std::fprintf(stderr, "relay: %s\n", relay.status().ToString().c_str());
    return 1;
  }
  std::printf("relay listening on port %u -> %s, %lld us each way\n", (*relay)->port(),
              connect.c_str(), static_cast<long long>(delay_us));
  std::fflush(stdout);
  WaitForSignal();
  return 0;
}
