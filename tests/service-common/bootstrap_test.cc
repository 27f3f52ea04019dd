// The start-up contract every service binary shares (service-common/bootstrap.h): --help
// exits 0, flags that do not parse or are out of range exit 2, a service that cannot start
// (no checkpoint, a missing file) exits 1 with an error naming the cause, never a crash.
// The real binaries run as child processes.
#include "service-common/bootstrap.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "gtest/gtest.h"
#include "tests/common/run_command.h"

namespace expertmesh {
namespace {

using testing::Binary;
using testing::Outcome;
using testing::RunCommand;

const std::string kModel = std::string(EXPERTMESH_SOURCE_DIR) + "/models/expertmesh-tiny";

class EmptyDir {
 public:
  EmptyDir() {
    char tmpl[] = "/tmp/em-bootstrap-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~EmptyDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct Service {
  std::string dir, binary, required;  // required: the other flags it needs to start
};

const Service kServices[] = {
    {"router", "router-service", "--listen 127.0.0.1:0"},
    {"expert-service", "expert-service", "--shard-id 0 --num-shards 1"},
    {"attention-service", "attention-service", "--router 127.0.0.1:1"},
    {"gateway", "gateway", "--attention 127.0.0.1:1 --http-port 0"},
};

TEST(HostOfTest, SplitsHostPortForms) {
  EXPECT_EQ(HostOf("127.0.0.1:7000"), "127.0.0.1");
  EXPECT_EQ(HostOf("0.0.0.0:0"), "0.0.0.0");
  EXPECT_EQ(HostOf("[::]:50051"), "::");
  EXPECT_EQ(HostOf("[::1]:1"), "::1");
  EXPECT_EQ(HostOf("localhost"), "localhost");
  EXPECT_EQ(HostOf("::1"), "::1");
}

TEST(ServiceMainTest, HelpExitsZeroAndNamesTheCommonFlags) {
  for (const Service& s : kServices) {
    const Outcome o = RunCommand(Binary(s.dir, s.binary) + " --help");
    EXPECT_EQ(o.exit_code, kExitOk) << s.binary << "\n" << o.output;
    EXPECT_NE(o.output.find("--listen"), std::string::npos) << s.binary;
    EXPECT_NE(o.output.find("--log-level"), std::string::npos) << s.binary;
  }
}

TEST(ServiceMainTest, BadLogLevelIsAUsageError) {
  for (const Service& s : kServices) {
    const Outcome o = RunCommand(Binary(s.dir, s.binary) + " --model " + kModel + " " + s.required +
                                 " --log-level loud");
    EXPECT_EQ(o.exit_code, kExitUsage) << s.binary << "\n" << o.output;
    EXPECT_NE(o.output.find("--log-level"), std::string::npos) << s.binary << "\n" << o.output;
  }
}

TEST(ServiceMainTest, OutOfRangeMetricsPortIsAUsageError) {
  for (const Service& s : kServices) {
    if (s.binary == "gateway") continue;  // /metrics is on its HTTP port
    const Outcome o = RunCommand(Binary(s.dir, s.binary) + " --model " + kModel + " " + s.required +
                                 " --metrics-port 70000");
    EXPECT_EQ(o.exit_code, kExitUsage) << s.binary << "\n" << o.output;
  }
}

TEST(ServiceMainTest, MissingModelDirectoryIsAUsageError) {
  for (const Service& s : kServices) {
    const Outcome o =
        RunCommand(Binary(s.dir, s.binary) + " --model /nonexistent/em-model " + s.required);
    EXPECT_EQ(o.exit_code, kExitUsage) << s.binary << "\n" << o.output;
  }
}

TEST(ServiceMainTest, ModelDirectoryWithoutFilesFailsToStartWithExitOneNotACrash) {
  const EmptyDir empty;
  for (const Service& s : kServices) {
    const Outcome o =
        RunCommand(Binary(s.dir, s.binary) + " --model " + empty.path() + " " + s.required);
    EXPECT_EQ(o.signal, 0) << s.binary << " crashed:\n" << o.output;
    EXPECT_EQ(o.exit_code, kExitStartFailed) << s.binary << "\n" << o.output;
    EXPECT_NE(o.output.find("cannot start"), std::string::npos) << s.binary << "\n" << o.output;
  }
}

// The routed experts of the main layers are always on the shards, which take FP8 activations
// only: --no-act-quant used to start and report SERVING, then fail every request. It must
// refuse to start instead, naming the flag. `timeout` bounds the run should it start anyway.
TEST(ServiceMainTest, AttentionServiceRefusesNoActQuant) {
  const Outcome o =
      RunCommand("timeout 60 " + Binary("attention-service", "attention-service") + " --model " +
                 kModel + " --router 127.0.0.1:1 --listen 127.0.0.1:0 --no-act-quant");
  EXPECT_EQ(o.signal, 0) << o.output;
  EXPECT_EQ(o.exit_code, kExitStartFailed) << o.output;
  EXPECT_NE(o.output.find("cannot start"), std::string::npos) << o.output;
  EXPECT_NE(o.output.find("--no-act-quant"), std::string::npos) << o.output;
  EXPECT_NE(o.output.find("FP8"), std::string::npos) << o.output;
}

}  // namespace
}  // namespace expertmesh
