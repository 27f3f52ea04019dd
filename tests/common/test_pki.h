// Certificates for the mTLS tests, made at test time with the openssl CLI: a self-signed CA
// and leaf certificates it signs (EC P-256, valid two days, usable by servers and clients).
// Each step returns a status that names the openssl command and its output when it fails.
#pragma once

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tests/common/run_command.h"

namespace expertmesh::testing {

inline constexpr char kTestKeyOpts[] = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

inline absl::Status RunOpenssl(const std::string& command) {
  const Outcome o = RunCommand(command);
  if (o.exit_code == 0) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("test pki: `", command, "` exited ", o.exit_code, ": ", o.output));
}

// <dir>/<name>.crt and <dir>/<name>.key: a self-signed CA with CN = name.
inline absl::Status MakeTestCa(const std::string& dir, const std::string& name = "ca") {
  return RunOpenssl(absl::StrCat(
      "openssl req -x509", kTestKeyOpts, " -days 2 -subj /CN=", name,
      " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=keyCertSign,cRLSign",
      " -keyout ", dir, "/", name, ".key -out ", dir, "/", name, ".crt"));
}

// <out_dir>/tls.crt and <out_dir>/tls.key (out_dir is created) signed by the CA
// <ca_dir>/<ca>.crt and .key, with CN = cn and subjectAltName = san ("IP:127.0.0.1",
// "DNS:a.test,IP:127.0.0.1").
inline absl::Status MakeTestCert(const std::string& ca_dir, const std::string& ca,
                                 const std::string& cn, const std::string& san,
                                 const std::string& out_dir) {
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("test pki: cannot create ", out_dir));
  const std::string ext = out_dir + "/ext.cnf";
  {
    std::ofstream f(ext);
    f << "subjectAltName=" << san << "\n"
      << "extendedKeyUsage=serverAuth,clientAuth\n";
    if (!f) return absl::InternalError(absl::StrCat("test pki: cannot write ", ext));
  }
  if (absl::Status s =
          RunOpenssl(absl::StrCat("openssl req -new", kTestKeyOpts, " -subj /CN=", cn, " -keyout ",
                                  out_dir, "/tls.key -out ", out_dir, "/tls.csr"));
      !s.ok()) {
    return s;
  }
  return RunOpenssl(absl::StrCat(
      "openssl x509 -req -days 2 -in ", out_dir, "/tls.csr -CA ", ca_dir, "/", ca, ".crt -CAkey ",
      ca_dir, "/", ca, ".key -CAcreateserial -extfile ", ext, " -out ", out_dir, "/tls.crt"));
}

// In dir: ca.crt (with ca.key) and tls.crt, tls.key that it signs for san, CN = cn.
inline absl::Status MakeTestPki(const std::string& dir, const std::string& san,
                                const std::string& cn = "server") {
  if (absl::Status s = MakeTestCa(dir); !s.ok()) return s;
  return MakeTestCert(dir, "ca", cn, san, dir);
}

}  // namespace expertmesh::testing
