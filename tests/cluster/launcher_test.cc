// The launcher's process handling, on stand-in children (/bin/sh scripts): output goes to the
// log file, Stop() is SIGTERM then SIGKILL after the grace period, exit descriptions, a
// missing binary is an error before anything is forked, and binaries are found in a build
// tree. (The children wait in `sleep`: they stand in for long-running services.)
#include <signal.h>

#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "tests/common/poll.h"
#include "tools/launcher/cluster.h"
#include "tools/launcher/process.h"

namespace expertmesh::launcher {
namespace {

class LauncherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/expertmesh-launcher-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  ProcessSpec Shell(const std::string& name, const std::string& script) {
    return ProcessSpec{name, "/bin/sh", {"-c", script}, dir_ + "/" + name + ".log"};
  }
  std::string dir_;
};

TEST_F(LauncherTest, LogsOutputAndStopsOnSigterm) {
  // Prints, then waits for SIGTERM, on which it says so and exits 0.
  absl::StatusOr<std::unique_ptr<ChildProcess>> p =
      ChildProcess::Start(Shell("polite",
                                "trap 'echo got TERM; exit 0' TERM; echo hello; "
                                "while true; do sleep 0.01; done"));
  ASSERT_TRUE(p.ok()) << p.status();
  // Wait until the trap is installed (the script printed after it) before signalling.
  ASSERT_TRUE(expertmesh::testing::PollUntil(
      [&] {
        return TailOfFile(dir_ + "/polite.log").find("hello") != std::string::npos ||
               !(*p)->Running();
      },
      absl::Seconds(30)));
  ASSERT_TRUE((*p)->Running());
  EXPECT_TRUE((*p)->Stop(absl::Seconds(10)).ok());
  EXPECT_FALSE((*p)->Running());
  EXPECT_EQ((*p)->ExitDescription(), "exited with 0");
  const std::string log = TailOfFile(dir_ + "/polite.log");
  EXPECT_NE(log.find("hello"), std::string::npos) << log;
  EXPECT_NE(log.find("got TERM"), std::string::npos) << log;
}

TEST_F(LauncherTest, EscalatesToSigkillAfterTheGrace) {
  absl::StatusOr<std::unique_ptr<ChildProcess>> p = ChildProcess::Start(
      Shell("stubborn", "trap '' TERM; echo ready; while true; do sleep 0.01; done"));
  ASSERT_TRUE(p.ok());
  // Wait until the trap is installed (the script printed after it) before signalling.
  ASSERT_TRUE(expertmesh::testing::PollUntil(
      [&] {
        return TailOfFile(dir_ + "/stubborn.log").find("ready") != std::string::npos ||
               !(*p)->Running();
      },
      absl::Seconds(30)));
  ASSERT_TRUE((*p)->Running());
  const absl::Status s = (*p)->Stop(absl::Milliseconds(200));
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_FALSE((*p)->Running());
  EXPECT_EQ((*p)->ExitDescription(), "killed by signal 9");
}

TEST_F(LauncherTest, ReportsExitsAndMissingBinaries) {
  absl::StatusOr<std::unique_ptr<ChildProcess>> p = ChildProcess::Start(Shell("fails", "exit 3"));
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE((*p)->WaitFor(absl::Seconds(10)));
  EXPECT_EQ((*p)->ExitDescription(), "exited with 3");
  EXPECT_TRUE((*p)->Stop(absl::Seconds(1)).ok());  // already gone: nothing to stop

  ProcessSpec missing{"missing", dir_ + "/no-such-binary", {}, ""};
  EXPECT_EQ(ChildProcess::Start(missing).status().code(), absl::StatusCode::kNotFound);
  ProcessSpec bad_log{"bad-log", "/bin/sh", {"-c", "true"}, dir_ + "/no/such/dir/x.log"};
  EXPECT_FALSE(ChildProcess::Start(bad_log).ok());
}

TEST_F(LauncherTest, FindsServiceBinariesInABuildTree) {
  std::filesystem::create_directories(dir_ + "/router");
  const std::string bin = dir_ + "/router/router-service";
  std::ofstream(bin) << "#!/bin/sh\n";
  std::filesystem::permissions(bin, std::filesystem::perms::owner_all);
  absl::StatusOr<std::string> found = FindServiceBinary(dir_, "router-service", "router");
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(*found, bin);
  EXPECT_EQ(FindServiceBinary(dir_, "expert-service", "expert-service").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(LauncherTest, ClusterStartFailsCleanlyWithoutAModel) {
  ClusterOptions o;
  o.model_dir = dir_ + "/no-model";
  EXPECT_EQ(Cluster::Start(o).status().code(), absl::StatusCode::kNotFound);
  o.model_dir = dir_;
  o.shards = 0;
  EXPECT_EQ(Cluster::Start(o).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace expertmesh::launcher
