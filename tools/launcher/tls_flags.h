// --tls-cert / --tls-key / --tls-ca for the programs that start or reach a cluster from outside
// a service (`expertmesh up` and `status`, the cluster benchmarks): one definition of the flags,
// and one way to make them this process's TLS (every channel it opens, and what the launcher
// hands the services it starts).
#pragma once

#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "service-common/tls.h"

namespace expertmesh {

// Adds the three flags to `app`, into `files`; `whose` ends the certificate's help text
// (e.g. "presented to the router").
inline void AddTlsOptions(CLI::App* app, TlsFiles& files, const std::string& whose) {
  app->add_option(
         "--tls-cert", files.cert,
         "PEM certificate (chain) " + whose + ": enables mTLS (with --tls-key and --tls-ca)")
      ->check(CLI::ExistingFile);
  app->add_option("--tls-key", files.key, "PEM private key of --tls-cert")
      ->check(CLI::ExistingFile);
  app->add_option("--tls-ca", files.ca, "PEM CA bundle the services' certificates chain to")
      ->check(CLI::ExistingFile);
}

// Checks the flags (all three or none) and makes them the process's TLS. Returns the exit
// code for a bad combination (2, after saying why on stderr), else 0.
inline int ApplyTlsOptions(const TlsFiles& files) {
  if (absl::Status s = ValidateTlsFiles(files); !s.ok()) {
    std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
    return 2;
  }
  SetProcessTls(files);
  return 0;
}

}  // namespace expertmesh
