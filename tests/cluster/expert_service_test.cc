// An expert-service server on loopback (port 0, real gRPC, in process): its answers equal
// LocalExperts' exactly, every malformed message gets its own error status while the stream
// and the service stay up, a peer of another model is refused, and a shard maps only its
// share of the checkpoint. The framed TCP data plane (data_listen) answers what Compute answers,
// bit for bit, and refuses hostile clients (no hello, another model, garbage) while the service
// stays up; Drain and Kill end its connections; it is refused under mTLS.
#include "expert-service/expert_service.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <thread>

#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include "core/format/wire.h"
#include "core/numerics/numerics.h"
#include "dataplane/frame.h"
#include "placement/placement.h"
#include "router/router_service.h"
#include "service-common/handshake.h"
#include "service-common/metrics.h"
#include "service-common/process.h"
#include "service-common/tls.h"
#include "tests/cluster/shards_test_util.h"
#include "tests/common/metrics_text.h"
#include "tests/common/poll.h"
#include "tests/common/raw_client.h"
#include "tests/common/test_pki.h"

namespace expertmesh {
namespace {

using testing::Batch;
using testing::RandomBatch;
using testing::ShardTestModel;

constexpr int kLayer = 2;
constexpr uint32_t kMaxRows = 32;
constexpr uint64_t kMaxRequestBytes = 16 * 1024;

// A request's activations and routes as LocalExperts takes them (to compute what it must answer).
struct RequestInput {
  QuantizedActivations x;
  ExpertRoutes routes;
};
absl::StatusOr<RequestInput> InputOf(const v1::ExpertRequest& r) {
  absl::StatusOr<QuantizedActivations> x =
      UnpackActivations(r.activations(), r.scales(), r.n_rows(), r.hidden_size());
  if (!x.ok()) return x.status();
  RequestInput in;
  in.x = *std::move(x);
  in.routes.offsets.assign(r.row_offsets().begin(), r.row_offsets().end());
  in.routes.experts.assign(r.experts().begin(), r.experts().end());
  in.routes.weights.assign(r.weights().begin(), r.weights().end());
  return in;
}

class ExpertServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> dir = ShardTestModel();
    ASSERT_TRUE(dir.ok()) << dir.status();
    model_dir_ = new std::string(*dir);
    config_ = new ModelConfig(*LoadModelConfig(*dir + "/config.json"));
    placement_ = new Placement(*EvenPlacement(*config_, 2));
    ExpertServerOptions o;
    o.model_dir = *dir;
    o.experts = placement_->ExpertsOf(0);
    o.shard_id = 0;
    o.limits.max_rows = kMaxRows;
    o.limits.max_request_bytes = kMaxRequestBytes;
    o.data_listen = "127.0.0.1:0";  // the framed TCP data plane beside gRPC
    metrics_ = new MetricsRegistry();
    o.metrics = metrics_;
    absl::StatusOr<std::unique_ptr<ExpertServer>> s = ExpertServer::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = s->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    delete metrics_;
    delete placement_;
    delete config_;
    delete model_dir_;
  }

  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    channel_ = MakeChannel(server_->address());
    stub_ = v1::ExpertService::NewStub(channel_);
    ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    stream_ = stub_->Compute(&ctx_);
  }
  void TearDown() override {
    stream_->WritesDone();
    EXPECT_TRUE(stream_->Finish().ok());
  }

  // A valid request: n_rows rows, routes restricted to shard 0's experts (0..3).
  v1::ExpertRequest ValidRequest(int64_t n_rows, uint64_t seed) {
    Batch b = RandomBatch(*config_, n_rows, seed);
    v1::ExpertRequest r;
    r.set_batch_id(seed);
    r.set_layer(kLayer);
    r.set_n_rows(static_cast<uint32_t>(n_rows));
    r.set_hidden_size(static_cast<uint32_t>(config_->hidden_size));
    PackAllActivations(b.x, r.mutable_activations(), r.mutable_scales());
    r.add_row_offsets(0);
    for (int64_t row = 0; row < n_rows; ++row) {
      for (int32_t p = b.routes.offsets[row]; p < b.routes.offsets[row + 1]; ++p) {
        if (placement_->ShardOf(kLayer, b.routes.experts[p]) != 0) continue;
        r.add_experts(b.routes.experts[p]);
        r.add_weights(b.routes.weights[p]);
      }
      r.add_row_offsets(r.experts_size());
    }
    return r;
  }

  v1::ExpertResponse Call(v1::ExpertRequest r) {
    r.set_request_id(++next_id_);
    EXPECT_TRUE(stream_->Write(r));
    v1::ExpertResponse resp;
    EXPECT_TRUE(stream_->Read(&resp));
    EXPECT_EQ(resp.request_id(), next_id_);
    EXPECT_EQ(resp.batch_id(), r.batch_id());
    return resp;
  }

  void ExpectError(const v1::ExpertRequest& r, absl::StatusCode code, const std::string& needle) {
    const v1::ExpertResponse resp = Call(r);
    EXPECT_EQ(resp.error_code(), static_cast<int>(code)) << resp.error_message();
    EXPECT_NE(resp.error_message().find(needle), std::string::npos) << resp.error_message();
    EXPECT_TRUE(resp.outputs().empty());
  }

  static std::string* model_dir_;
  static MetricsRegistry* metrics_;
  static ModelConfig* config_;
  static Placement* placement_;
  static ExpertServer* server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ExpertService::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::ExpertRequest, v1::ExpertResponse>> stream_;
  uint64_t next_id_ = 0;
};
std::string* ExpertServiceTest::model_dir_ = nullptr;
MetricsRegistry* ExpertServiceTest::metrics_ = nullptr;
ModelConfig* ExpertServiceTest::config_ = nullptr;
Placement* ExpertServiceTest::placement_ = nullptr;
ExpertServer* ExpertServiceTest::server_ = nullptr;

TEST_F(ExpertServiceTest, AnswersEqualLocalExpertsBitwise) {
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(*model_dir_);
  ASSERT_TRUE(ckpt.ok());
  absl::StatusOr<std::unique_ptr<LocalExperts>> local =
      LocalExperts::Create(**ckpt, *config_, placement_->ExpertsOf(0));
  ASSERT_TRUE(local.ok()) << local.status();
  for (uint64_t seed : {1, 2, 3}) {
    const v1::ExpertRequest r = ValidRequest(5 + seed, seed);
    const v1::ExpertResponse resp = Call(r);
    ASSERT_EQ(resp.error_code(), 0) << resp.error_message();
    ASSERT_EQ(resp.n_rows(), r.n_rows());
    absl::StatusOr<RequestInput> input = InputOf(r);
    ASSERT_TRUE(input.ok()) << input.status();
    const QuantizedActivations& x = input->x;
    const ExpertRoutes& routes = input->routes;
    std::vector<float> want(r.n_rows() * r.hidden_size());
    ASSERT_TRUE((*local)->Run(kLayer, x, routes, want).ok());
    std::vector<float> got(want.size());
    ASSERT_TRUE(UnpackOutputRows(resp.outputs(), r.n_rows(), r.hidden_size(), got).ok());
    int nonzero = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got[i], Bf16ToFloat(FloatToBf16(want[i]))) << i;
      nonzero += got[i] != 0.0f;
    }
    EXPECT_GT(nonzero, static_cast<int>(want.size() / 2));
  }
}

// COMBINE_PER_EXPERT: one BF16 row per pair, the unweighted output, bit for bit what
// LocalExperts::RunPerExpert gives; a per-expert answer over max_response_bytes is refused.
TEST_F(ExpertServiceTest, PerExpertAnswersEqualLocalExpertsBitwise) {
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(*model_dir_);
  ASSERT_TRUE(ckpt.ok());
  absl::StatusOr<std::unique_ptr<LocalExperts>> local =
      LocalExperts::Create(**ckpt, *config_, placement_->ExpertsOf(0));
  ASSERT_TRUE(local.ok()) << local.status();
  for (uint64_t seed : {4, 5}) {
    v1::ExpertRequest r = ValidRequest(3 + seed, seed);
    r.set_combine(v1::COMBINE_PER_EXPERT);
    const v1::ExpertResponse resp = Call(r);
    ASSERT_EQ(resp.error_code(), 0) << resp.error_message();
    ASSERT_EQ(resp.n_rows(), r.n_rows());
    ASSERT_EQ(resp.outputs().size(), OutputBytes(r.experts_size(), r.hidden_size()));
    absl::StatusOr<RequestInput> input = InputOf(r);
    ASSERT_TRUE(input.ok()) << input.status();
    const QuantizedActivations& x = input->x;
    const ExpertRoutes& routes = input->routes;
    std::vector<uint16_t> want(routes.experts.size() * r.hidden_size());
    ASSERT_TRUE((*local)->RunPerExpert(kLayer, x, routes, want).ok());
    std::vector<uint16_t> got(want.size());
    std::memcpy(got.data(), resp.outputs().data(), resp.outputs().size());
    EXPECT_EQ(got, want);
    // Weighted and combined on this side, they are the shard's own Run.
    std::vector<float> combined(r.n_rows() * r.hidden_size()), run(combined.size());
    ASSERT_TRUE(CombinePerExpert(routes, got, r.hidden_size(), combined).ok());
    ASSERT_TRUE((*local)->Run(kLayer, x, routes, run).ok());
    EXPECT_EQ(combined, run);
  }
  // The response bound: the same request is accepted as partial sums (n_rows rows) but not
  // per expert (n_pairs rows) under a limit between the two.
  v1::ExpertRequest r = ValidRequest(6, 9);
  ASSERT_GT(r.experts_size(), static_cast<int>(r.n_rows()));
  ExpertRequestLimits limits;
  limits.max_response_bytes = OutputBytes(r.n_rows(), r.hidden_size());
  const auto holds = [](int, int) { return true; };
  EXPECT_TRUE(ValidateExpertRequest(r, *config_, limits, holds).ok());
  r.set_combine(v1::COMBINE_PER_EXPERT);
  const absl::Status s = ValidateExpertRequest(r, *config_, limits, holds);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_NE(s.message().find("pairs"), std::string::npos) << s;
}

// A generic (byte) Compute stream carrying `messages` as they are, then half-closed: how it
// ended and the raw responses. Every completion-queue wait is bounded.
struct RawStreamOutcome {
  grpc::Status status;
  std::vector<std::string> responses;
};
RawStreamOutcome RawCompute(const std::shared_ptr<grpc::Channel>& channel,
                            const std::vector<std::string>& messages) {
  RawStreamOutcome out;
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::CompletionQueue cq;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call =
      generic.PrepareCall(&ctx, "/expertmesh.v1.ExpertService/Compute", &cq);
  int next_tag = 0;
  // Starts one operation with a fresh tag and waits for it; returns its `ok`.
  auto step = [&](auto start) {
    void* const tag = reinterpret_cast<void*>(static_cast<intptr_t>(++next_tag));
    start(tag);
    void* got = nullptr;
    bool ok = false;
    const auto r =
        cq.AsyncNext(&got, &ok, std::chrono::system_clock::now() + std::chrono::seconds(30));
    EXPECT_EQ(r, grpc::CompletionQueue::NextStatus::GOT_EVENT);
    EXPECT_EQ(got, tag);
    return r == grpc::CompletionQueue::NextStatus::GOT_EVENT && ok;
  };
  EXPECT_TRUE(step([&](void* tag) { call->StartCall(tag); }));
  for (const std::string& m : messages) {
    grpc::Slice slice(m);
    grpc::ByteBuffer bytes(&slice, 1);
    if (!step([&](void* tag) { call->Write(bytes, tag); })) break;
    grpc::ByteBuffer reply;
    if (!step([&](void* tag) { call->Read(&reply, tag); })) break;
    std::vector<grpc::Slice> slices;
    EXPECT_TRUE(reply.Dump(&slices).ok());
    std::string text;
    for (const grpc::Slice& sl : slices) {
      text.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
    }
    out.responses.push_back(std::move(text));
  }
  step([&](void* tag) { call->WritesDone(tag); });  // fails when the server ended it already
  EXPECT_TRUE(step([&](void* tag) { call->Finish(&out.status, tag); }));
  cq.Shutdown();
  void* ignored_tag;
  bool ignored_ok;
  while (cq.Next(&ignored_tag, &ignored_ok)) {
  }
  return out;
}

TEST_F(ExpertServiceTest, BytesThatAreNotAnExpertRequestEndTheStreamWithInvalidArgument) {
  v1::ExpertRequest valid = ValidRequest(3, 21);
  valid.set_request_id(7);
  const std::string good = valid.SerializeAsString();
  const std::vector<std::string> garbage = {
      std::string("\x00\x01\x02 not a protobuf", 18),  // field number 0
      std::string("\x0a\x7f") + "truncated",           // a length past the end
      std::string(16, '\xff'),                         // a varint that never ends
  };
  for (const std::string& bad : garbage) {
    // The first message on the raw stream is answered; the garbage ends the stream.
    const RawStreamOutcome o = RawCompute(channel_, {good, bad, good});
    EXPECT_EQ(o.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << o.status.error_message();
    EXPECT_NE(o.status.error_message().find("does not parse"), std::string::npos)
        << o.status.error_message();
    ASSERT_EQ(o.responses.size(), 1u);
    v1::ExpertResponse resp;
    ASSERT_TRUE(resp.ParseFromString(o.responses[0]));
    EXPECT_EQ(resp.request_id(), 7u);
    EXPECT_EQ(resp.error_code(), 0) << resp.error_message();
  }
  // Only valid bytes: the stream ends OK, and the service (this test's own stream) stays up.
  const RawStreamOutcome fine = RawCompute(channel_, {good, good});
  EXPECT_TRUE(fine.status.ok()) << fine.status.error_message();
  EXPECT_EQ(fine.responses.size(), 2u);
  EXPECT_EQ(Call(ValidRequest(2, 22)).error_code(), 0);
}

TEST_F(ExpertServiceTest, EveryBadMessageGetsItsStatusAndTheStreamStaysUp) {
  using C = absl::StatusCode;
  const v1::ExpertRequest ok = ValidRequest(6, 11);
  auto with = [&](auto mutate) {
    v1::ExpertRequest r = ok;
    mutate(r);
    return r;
  };
  auto set_scale = [](v1::ExpertRequest& r, int i, float v) {
    std::memcpy(r.mutable_scales()->data() + 4 * i, &v, 4);
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();

  ExpectError(with([](auto& r) { r.set_combine(static_cast<v1::CombineMode>(7)); }),
              C::kInvalidArgument, "combine mode 7 is unknown");
  ExpectError(with([](auto& r) { r.set_layer(0); }), C::kInvalidArgument, "not a MoE layer");
  ExpectError(with([](auto& r) { r.set_layer(99); }), C::kInvalidArgument, "not a MoE layer");
  ExpectError(with([](auto& r) { r.set_layer(-1); }), C::kInvalidArgument, "not a MoE layer");
  ExpectError(with([](auto& r) { r.set_experts(0, 6); }), C::kFailedPrecondition,
              "does not hold layer 2 expert 6");
  ExpectError(with([](auto& r) { r.set_experts(0, 8); }), C::kInvalidArgument, "out of range");
  ExpectError(with([](auto& r) { r.set_experts(0, -1); }), C::kInvalidArgument, "out of range");
  ExpectError(with([](auto& r) { r.mutable_activations()->pop_back(); }), C::kInvalidArgument,
              "activations hold");
  ExpectError(with([](auto& r) { r.mutable_scales()->append(4, '\0'); }), C::kInvalidArgument,
              "scales hold");
  ExpectError(with([](auto& r) { r.set_hidden_size(256); }), C::kInvalidArgument, "hidden_size");
  ExpectError(with([](auto& r) { r.set_n_rows(0); }), C::kInvalidArgument, "n_rows");
  ExpectError(with([](auto& r) { r.set_n_rows(7); }), C::kInvalidArgument, "activations hold");
  ExpectError(with([](auto& r) { r.mutable_row_offsets()->RemoveLast(); }), C::kInvalidArgument,
              "row_offsets has");
  ExpectError(with([](auto& r) { r.set_row_offsets(0, 1); }), C::kInvalidArgument, "start at 0");
  ExpectError(with([](auto& r) { r.set_row_offsets(6, r.experts_size() - 1); }),
              C::kInvalidArgument, "end at the number");
  {
    v1::ExpertRequest dec = ok;  // row i ends before it begins
    int i = 1;
    while (i < 5 && dec.row_offsets(i) == 0) ++i;
    ASSERT_LT(i, 5);
    dec.set_row_offsets(i + 1, dec.row_offsets(i) - 1);
    ExpectError(dec, C::kInvalidArgument, "decrease");
  }
  {
    // A middle offset past the experts (found by expert_request_fuzz: the pairs of row 0 were
    // read beyond the end of experts before row 1's decrease was seen).
    v1::ExpertRequest past = ok;
    past.set_row_offsets(1, static_cast<uint32_t>(past.experts_size()) + 1);
    ExpectError(past, C::kInvalidArgument, "is past the");
  }
  ExpectError(with([](auto& r) { r.mutable_weights()->RemoveLast(); }), C::kInvalidArgument,
              "weights has");
  ExpectError(with([&](auto& r) { r.set_weights(0, nan); }), C::kInvalidArgument, "weight");
  ExpectError(with([&](auto& r) { r.set_weights(0, inf); }), C::kInvalidArgument, "weight");
  ExpectError(with([](auto& r) { r.set_weights(0, -0.5f); }), C::kInvalidArgument, "weight");
  ExpectError(with([](auto& r) { r.set_weights(0, 1e6f); }), C::kInvalidArgument, "weight");
  ExpectError(with([&](auto& r) { set_scale(r, 1, nan); }), C::kInvalidArgument, "scale 1");
  ExpectError(with([&](auto& r) { set_scale(r, 2, inf); }), C::kInvalidArgument, "scale 2");
  ExpectError(with([&](auto& r) { set_scale(r, 0, -1.0f); }), C::kInvalidArgument, "scale 0");
  ExpectError(with([&](auto& r) { set_scale(r, 0, 0.0f); }), C::kInvalidArgument, "scale 0");
  ExpectError(with([](auto& r) { (*r.mutable_activations())[17] = '\x7f'; }), C::kInvalidArgument,
              "activation 17 is NaN");
  ExpectError(with([](auto& r) { (*r.mutable_activations())[18] = '\xff'; }), C::kInvalidArgument,
              "activation 18 is NaN");
  // Experts out of order / repeated / too many within one row.
  v1::ExpertRequest order = ok;
  int row = -1;  // a row with at least two pairs
  for (int i = 0; i < 6 && row < 0; ++i) {
    if (order.row_offsets(i + 1) - order.row_offsets(i) >= 2) row = i;
  }
  ASSERT_GE(row, 0);
  const int p = static_cast<int>(order.row_offsets(row));
  order.set_experts(p, order.experts(p + 1));
  ExpectError(order, C::kInvalidArgument, "strictly ascending");
  {
    // 5 pairs in one row (num_experts_per_tok is 4): row 0 takes every pair of the batch.
    v1::ExpertRequest many = ValidRequest(1, 12);
    many.clear_experts();
    many.clear_weights();
    for (int e = 0; e < 4; ++e) {
      many.add_experts(e);
      many.add_weights(0.5f);
    }
    many.add_experts(4);
    many.add_weights(0.5f);
    many.set_row_offsets(1, 5);
    ExpectError(many, C::kInvalidArgument, "num_experts_per_tok");
  }
  // Oversized: more rows than allowed, and more bytes than allowed.
  ExpectError(ValidRequest(kMaxRows + 8, 13), C::kResourceExhausted, "n_rows");
  ExpectError(ValidRequest(60, 14), C::kResourceExhausted, "bytes exceeds");

  // Same stream, still answering; the service still SERVING.
  const v1::ExpertResponse good = Call(ok);
  EXPECT_EQ(good.error_code(), 0) << good.error_message();
  EXPECT_EQ(good.outputs().size(), OutputBytes(6, config_->hidden_size));
  absl::StatusOr<bool> serving = CheckHealth(*channel_, "", absl::Seconds(5));
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_TRUE(*serving);
}

// Options for shard `shard` of the test model under EvenPlacement(2): the model directory, the
// shard's experts and id; nothing listens on a data port.
absl::StatusOr<ExpertServerOptions> ShardOptions(int shard) {
  absl::StatusOr<std::string> dir = ShardTestModel();
  if (!dir.ok()) return dir.status();
  absl::StatusOr<ModelConfig> config = LoadModelConfig(*dir + "/config.json");
  if (!config.ok()) return config.status();
  absl::StatusOr<Placement> placement = EvenPlacement(*config, 2);
  if (!placement.ok()) return placement.status();
  ExpertServerOptions o;
  o.model_dir = *dir;
  o.experts = placement->ExpertsOf(shard);
  o.shard_id = shard;
  return o;
}

// Liveness ("") comes with the mapped experts; readiness (the ExpertService name) only once
// the router has the replica, so Kubernetes neither restarts a shard whose router is late nor
// counts it ready before the dispatchers can find it.
TEST(ExpertReadinessTest, ReadyOnlyOnceRegisteredWithTheRouter) {
  absl::StatusOr<std::string> dir = ShardTestModel();
  ASSERT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<ModelConfig> config = LoadModelConfig(*dir + "/config.json");
  ASSERT_TRUE(config.ok());
  absl::StatusOr<Placement> placement = EvenPlacement(*config, 2);
  ASSERT_TRUE(placement.ok());
  absl::StatusOr<int> router_port = PickFreePort();  // nothing listens there yet
  ASSERT_TRUE(router_port.ok());
  const std::string router_address = absl::StrCat("127.0.0.1:", *router_port);

  ExpertServerOptions o;
  o.model_dir = *dir;
  o.experts = placement->ExpertsOf(1);
  o.shard_id = 1;
  o.router_address = router_address;
  o.rpc_timeout = absl::Milliseconds(300);
  absl::StatusOr<std::unique_ptr<ExpertServer>> shard = ExpertServer::Start(o);
  ASSERT_TRUE(shard.ok()) << shard.status();
  auto channel = MakeChannel((*shard)->address());
  const std::string name = v1::ExpertService::service_full_name();
  absl::StatusOr<bool> live = CheckHealth(*channel, "", absl::Seconds(5));
  ASSERT_TRUE(live.ok()) << live.status();
  EXPECT_TRUE(*live);
  absl::StatusOr<bool> ready = CheckHealth(*channel, name, absl::Seconds(5));
  ASSERT_TRUE(ready.ok()) << ready.status();
  EXPECT_FALSE(*ready) << "ready before any router has it";

  absl::StatusOr<v1::PeerIdentity> identity = MakeLocalIdentity(*dir, "test", "readiness-test");
  ASSERT_TRUE(identity.ok());
  RouterServerOptions ro;
  ro.identity = *identity;
  ro.server.listen = router_address;
  absl::StatusOr<std::unique_ptr<RouterServer>> router = RouterServer::Start(*placement, ro);
  ASSERT_TRUE(router.ok()) << router.status();
  EXPECT_TRUE(testing::PollUntil(
      [&] {
        absl::StatusOr<bool> r = CheckHealth(*channel, name, absl::Seconds(1));
        return r.ok() && *r;
      },
      absl::Seconds(10), absl::Milliseconds(50)))
      << "not ready after the router came up";

  (*shard)->Drain();  // readiness and liveness end with the drain
  router->reset();
}

TEST_F(ExpertServiceTest, HandshakeRefusesAnotherModelOrProtocol) {
  absl::StatusOr<v1::PeerIdentity> me = MakeLocalIdentity(*model_dir_, "test", "t");
  ASSERT_TRUE(me.ok());
  auto handshake = [&](const v1::PeerIdentity& id) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::HandshakeRequest req;
    *req.mutable_client() = id;
    v1::HandshakeResponse resp;
    return stub_->Handshake(&ctx, req, &resp);
  };
  EXPECT_TRUE(handshake(*me).ok());
  v1::PeerIdentity other = *me;
  other.set_model_fingerprint(ModelFingerprint("another config"));
  const grpc::Status s = handshake(other);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("model"), std::string::npos);
  v1::PeerIdentity old = *me;
  old.set_protocol_version(kProtocolVersion + 1);
  EXPECT_EQ(handshake(old).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

TEST_F(ExpertServiceTest, MapsExactlyItsShareOfTheCheckpoint) {
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(*model_dir_);
  ASSERT_TRUE(ckpt.ok());
  auto share = [&](int shard) {
    uint64_t bytes = 0;
    for (const LayerExpert& le : placement_->ExpertsOf(shard)) {
      for (const std::string proj : {"gate_proj", "up_proj", "down_proj"}) {
        for (const std::string suffix : {".weight", ".weight_scale_inv"}) {
          const TensorInfo* t = (*ckpt)->Info(absl::StrCat(
              "model.layers.", le.layer, ".mlp.experts.", le.expert, ".", proj, suffix));
          EXPECT_NE(t, nullptr);
          if (t) bytes += t->end - t->begin;
        }
      }
    }
    return bytes;
  };
  const uint64_t mine = share(0);
  EXPECT_GT(mine, 0u);
  EXPECT_EQ(server_->bytes_mapped(), mine);
  // Half the routed experts: half of all expert bytes, well under the checkpoint's total.
  EXPECT_EQ(mine, share(1));
  EXPECT_LT(mine, (*ckpt)->total_bytes() / 2);
}

TEST_F(ExpertServiceTest, DeviceSpecIsCheckedBeforeLoading) {
  ExpertServerOptions o;
  o.model_dir = *model_dir_;
  o.experts = placement_->ExpertsOf(1);
  o.shard_id = 1;
  o.device = "gpu7";
  absl::StatusOr<std::unique_ptr<ExpertServer>> s = ExpertServer::Start(o);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << s.status();
  EXPECT_NE(std::string(s.status().message()).find("gpu7"), std::string::npos) << s.status();
#if !EXPERTMESH_HAVE_CUDA
  // A binary without the CUDA backend says so instead of falling back to the CPU.
  o.device = "cuda:0";
  s = ExpertServer::Start(o);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(std::string(s.status().message()).find("without CUDA"), std::string::npos)
      << s.status();
#endif
}

TEST(AdvertisedAddressTest, ListenHostWithTheBoundPort) {
  EXPECT_EQ(AdvertisedAddress("", "127.0.0.1:0", 4321), "127.0.0.1:4321");
  EXPECT_EQ(AdvertisedAddress("", "10.1.2.3:5000", 5000), "10.1.2.3:5000");
  EXPECT_EQ(AdvertisedAddress("", "0.0.0.0:0", 77), "127.0.0.1:77");
  EXPECT_EQ(AdvertisedAddress("", "[::]:0", 77), "127.0.0.1:77");
  EXPECT_EQ(AdvertisedAddress("shard-1.experts:9000", "0.0.0.0:9000", 9000),
            "shard-1.experts:9000");
}

// ---------------------------------------------------------------------------------------------
// The framed TCP data plane (ExpertServerOptions::data_listen; dataplane/frame.h).

using dataplane::FrameConnection;
using dataplane::FrameType;

absl::Time In(absl::Duration d) { return absl::Now() + d; }

std::unique_ptr<FrameConnection> DataConnect(const std::string& address) {
  absl::StatusOr<std::unique_ptr<FrameConnection>> c =
      FrameConnection::Connect(address, In(absl::Seconds(10)), 64u << 20);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

absl::Status DataHello(FrameConnection& c, const v1::PeerIdentity& me) {
  v1::HandshakeRequest req;
  *req.mutable_client() = me;
  return dataplane::Exchange(c, FrameType::kHello, req.SerializeAsString(), FrameType::kHelloOk,
                             In(absl::Seconds(10)));
}

// One request on the data plane: its answer (a failed exchange fails the test).
v1::ExpertResponse DataCall(FrameConnection& c, const v1::ExpertRequest& r) {
  v1::ExpertResponse resp;
  const absl::Status s = dataplane::Exchange(c, FrameType::kRequest, r.SerializeAsString(),
                                             FrameType::kResponse, In(absl::Seconds(30)));
  EXPECT_TRUE(s.ok()) << s;
  if (s.ok()) {
    EXPECT_TRUE(resp.ParseFromArray(c.payload().data(), c.payload().size()));
  }
  return resp;
}

// The error frame that answers `payload` sent as `type`, then the connection closes.
absl::Status RefusedThenClosed(FrameConnection& c, FrameType type, const std::string& payload) {
  const absl::Status s =
      dataplane::Exchange(c, type, payload, FrameType::kResponse, In(absl::Seconds(10)));
  const absl::Status after = c.ReadFrame(In(absl::Seconds(10)));
  EXPECT_EQ(after.code(), absl::StatusCode::kUnavailable)
      << "not closed after " << s << ": " << after;
  return s;
}

class ExpertDataPlaneTest : public ExpertServiceTest {
 protected:
  void SetUp() override {
    ExpertServiceTest::SetUp();
    absl::StatusOr<v1::PeerIdentity> me = MakeLocalIdentity(*model_dir_, "test", "data-plane");
    ASSERT_TRUE(me.ok()) << me.status();
    me_ = *me;
    ASSERT_GT(server_->data_port(), 0);
    ASSERT_EQ(server_->data_address(), absl::StrCat("127.0.0.1:", server_->data_port()));
  }
  // A fresh client is greeted and served: the service is up.
  void ExpectServesANewClient() {
    std::unique_ptr<FrameConnection> c = DataConnect(server_->data_address());
    ASSERT_NE(c, nullptr);
    ASSERT_TRUE(DataHello(*c, me_).ok());
    v1::ExpertRequest r = ValidRequest(2, 77);
    r.set_request_id(5);
    const v1::ExpertResponse resp = DataCall(*c, r);
    EXPECT_EQ(resp.error_code(), 0) << resp.error_message();
    EXPECT_EQ(resp.request_id(), 5u);
    EXPECT_EQ(resp.outputs().size(), OutputBytes(2, config_->hidden_size));
  }
  v1::PeerIdentity me_;
};

TEST_F(ExpertDataPlaneTest, AnswersEqualComputeAndLocalExpertsBitwise) {
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(*model_dir_);
  ASSERT_TRUE(ckpt.ok());
  absl::StatusOr<std::unique_ptr<LocalExperts>> local =
      LocalExperts::Create(**ckpt, *config_, placement_->ExpertsOf(0));
  ASSERT_TRUE(local.ok()) << local.status();
  std::unique_ptr<FrameConnection> c = DataConnect(server_->data_address());
  ASSERT_NE(c, nullptr);
  const absl::Status hello = DataHello(*c, me_);
  ASSERT_TRUE(hello.ok()) << hello;
  v1::HandshakeResponse server_id;
  ASSERT_TRUE(server_id.ParseFromArray(c->payload().data(), c->payload().size()));
  EXPECT_EQ(server_id.server().model_fingerprint(), me_.model_fingerprint());
  for (uint64_t seed : {31, 32, 33, 34}) {
    v1::ExpertRequest r = ValidRequest(3 + seed % 5, seed);
    if (seed % 2 == 0) r.set_combine(v1::COMBINE_PER_EXPERT);
    r.set_request_id(1000 + seed);
    const v1::ExpertResponse data = DataCall(*c, r);
    const v1::ExpertResponse grpc = Call(r);  // (the same request id: Call sets its own)
    ASSERT_EQ(data.error_code(), 0) << data.error_message();
    ASSERT_EQ(grpc.error_code(), 0) << grpc.error_message();
    EXPECT_EQ(data.request_id(), 1000 + seed);
    EXPECT_EQ(data.batch_id(), r.batch_id());
    EXPECT_EQ(data.layer(), r.layer());
    EXPECT_EQ(data.n_rows(), r.n_rows());
    ASSERT_FALSE(data.outputs().empty());
    EXPECT_TRUE(data.outputs() == grpc.outputs()) << "seed " << seed;
    // And what LocalExperts computes.
    absl::StatusOr<RequestInput> input = InputOf(r);
    ASSERT_TRUE(input.ok()) << input.status();
    const QuantizedActivations& x = input->x;
    const ExpertRoutes& routes = input->routes;
    if (r.combine() == v1::COMBINE_PER_EXPERT) {
      std::vector<uint16_t> want(routes.experts.size() * r.hidden_size());
      ASSERT_TRUE((*local)->RunPerExpert(kLayer, x, routes, want).ok());
      ASSERT_EQ(data.outputs().size(), want.size() * 2);
      EXPECT_EQ(std::memcmp(data.outputs().data(), want.data(), data.outputs().size()), 0);
    } else {
      std::vector<float> want(r.n_rows() * r.hidden_size()), got(want.size());
      ASSERT_TRUE((*local)->Run(kLayer, x, routes, want).ok());
      ASSERT_TRUE(UnpackOutputRows(data.outputs(), r.n_rows(), r.hidden_size(), got).ok());
      for (size_t i = 0; i < want.size(); ++i) {
        ASSERT_EQ(got[i], Bf16ToFloat(FloatToBf16(want[i]))) << i;
      }
    }
  }
}

TEST_F(ExpertDataPlaneTest, InBandErrorsKeepTheConnection) {
  std::unique_ptr<FrameConnection> c = DataConnect(server_->data_address());
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(DataHello(*c, me_).ok());
  const v1::ExpertRequest ok = ValidRequest(4, 41);
  v1::ExpertRequest not_held = ok;
  not_held.set_experts(0, 6);  // shard 1's
  not_held.set_request_id(9);
  v1::ExpertResponse resp = DataCall(*c, not_held);
  EXPECT_EQ(resp.error_code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_NE(resp.error_message().find("does not hold layer 2 expert 6"), std::string::npos)
      << resp.error_message();
  EXPECT_EQ(resp.request_id(), 9u);
  EXPECT_TRUE(resp.outputs().empty());
  v1::ExpertRequest bad_layer = ok;
  bad_layer.set_layer(0);
  resp = DataCall(*c, bad_layer);
  EXPECT_EQ(resp.error_code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  resp = DataCall(*c, ValidRequest(kMaxRows + 8, 42));
  EXPECT_EQ(resp.error_code(), static_cast<int>(absl::StatusCode::kResourceExhausted));
  // The same connection answers the next good request.
  resp = DataCall(*c, ok);
  EXPECT_EQ(resp.error_code(), 0) << resp.error_message();
  EXPECT_EQ(resp.outputs().size(), OutputBytes(4, config_->hidden_size));
  EXPECT_TRUE(c->QuietAndOpen());
}

TEST_F(ExpertDataPlaneTest, HostileClientsAreRefusedAndTheServiceStaysUp) {
  const std::string address = server_->data_address();
  const std::string good = ValidRequest(2, 51).SerializeAsString();
  using C = absl::StatusCode;
  {  // a request before the hello
    std::unique_ptr<FrameConnection> c = DataConnect(address);
    ASSERT_NE(c, nullptr);
    const absl::Status s = RefusedThenClosed(*c, FrameType::kRequest, good);
    EXPECT_EQ(s.code(), C::kFailedPrecondition) << s;
    EXPECT_NE(s.message().find("before the hello"), std::string::npos) << s;
  }
  ExpectServesANewClient();
  {  // a hello from another model, and one of another protocol version
    v1::PeerIdentity other = me_;
    other.set_model_fingerprint(ModelFingerprint("another config"));
    v1::PeerIdentity newer = me_;
    newer.set_protocol_version(kProtocolVersion + 1);
    for (const v1::PeerIdentity& id : {other, newer}) {
      std::unique_ptr<FrameConnection> c = DataConnect(address);
      ASSERT_NE(c, nullptr);
      v1::HandshakeRequest req;
      *req.mutable_client() = id;
      const absl::Status s = RefusedThenClosed(*c, FrameType::kHello, req.SerializeAsString());
      EXPECT_EQ(s.code(), C::kFailedPrecondition) << s;
    }
  }
  ExpectServesANewClient();
  {  // a hello that is not a HandshakeRequest
    std::unique_ptr<FrameConnection> c = DataConnect(address);
    ASSERT_NE(c, nullptr);
    const absl::Status s = RefusedThenClosed(*c, FrameType::kHello, std::string(16, '\xff'));
    EXPECT_EQ(s.code(), C::kInvalidArgument) << s;
  }
  {  // a second hello
    std::unique_ptr<FrameConnection> c = DataConnect(address);
    ASSERT_NE(c, nullptr);
    ASSERT_TRUE(DataHello(*c, me_).ok());
    v1::HandshakeRequest req;
    *req.mutable_client() = me_;
    const absl::Status s = RefusedThenClosed(*c, FrameType::kHello, req.SerializeAsString());
    EXPECT_EQ(s.code(), C::kInvalidArgument) << s;
    EXPECT_NE(s.message().find("second hello"), std::string::npos) << s;
  }
  ExpectServesANewClient();
  // Request frames that do not parse as an ExpertRequest, after a good one.
  for (const std::string& garbage :
       {std::string("\x00\x01\x02 not a protobuf", 18), std::string("\x0a\x7f") + "truncated",
        std::string(16, '\xff')}) {
    std::unique_ptr<FrameConnection> c = DataConnect(address);
    ASSERT_NE(c, nullptr);
    ASSERT_TRUE(DataHello(*c, me_).ok());
    v1::ExpertRequest r = ValidRequest(2, 52);
    EXPECT_EQ(DataCall(*c, r).error_code(), 0);
    const absl::Status s = RefusedThenClosed(*c, FrameType::kRequest, garbage);
    EXPECT_EQ(s.code(), C::kInvalidArgument) << s;
    EXPECT_NE(s.message().find("frame 2 of this connection does not parse"), std::string::npos)
        << s;
  }
  ExpectServesANewClient();
  // Frames only a server sends.
  for (FrameType type : {FrameType::kHelloOk, FrameType::kResponse, FrameType::kError}) {
    std::unique_ptr<FrameConnection> c = DataConnect(address);
    ASSERT_NE(c, nullptr);
    ASSERT_TRUE(DataHello(*c, me_).ok());
    const absl::Status s = RefusedThenClosed(*c, type, "");
    EXPECT_EQ(s.code(), C::kInvalidArgument) << s;
  }
  // Bytes that are not frames at all (an HTTP/2 client, as a gRPC channel pointed at the wrong
  // port would send), and a frame above the limit.
  for (const std::string& bytes : {std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), [] {
                                     char h[dataplane::kFrameHeaderBytes];
                                     dataplane::EncodeFrameHeader(FrameType::kRequest, 0x7fffffffu,
                                                                  h);
                                     return std::string(h, sizeof h);
                                   }()}) {
    testing::RawClient raw(server_->data_port());
    ASSERT_TRUE(raw.connected());
    ASSERT_TRUE(raw.Send(bytes));
    EXPECT_TRUE(raw.ReadUntilClosed(std::chrono::seconds(10)));
    ASSERT_GE(raw.received().size(), dataplane::kFrameHeaderBytes + 4);
    EXPECT_EQ(raw.received()[4], static_cast<char>(FrameType::kError));
  }
  ExpectServesANewClient();
  // Health: still serving on gRPC too.
  absl::StatusOr<bool> serving = CheckHealth(*channel_, "", absl::Seconds(5));
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_TRUE(*serving);
}

TEST_F(ExpertDataPlaneTest, ConnectionsAreInTheMetrics) {
  const auto value = [](const std::string& series) {
    return testing::MetricValue(metrics_->RenderText(), series);
  };
  ASSERT_TRUE(testing::PollUntil([&] { return value("expertmesh_expert_data_connections") == 0; },
                                 absl::Seconds(10)))
      << value("expertmesh_expert_data_connections");
  EXPECT_EQ(value("expertmesh_expert_data_connections_refused_total"), 0);
  {
    std::unique_ptr<FrameConnection> a = DataConnect(server_->data_address());
    std::unique_ptr<FrameConnection> b = DataConnect(server_->data_address());
    ASSERT_TRUE(a && b);
    ASSERT_TRUE(DataHello(*a, me_).ok());
    ASSERT_TRUE(DataHello(*b, me_).ok());
    EXPECT_EQ(value("expertmesh_expert_data_connections"), 2);
  }
  EXPECT_TRUE(testing::PollUntil([&] { return value("expertmesh_expert_data_connections") == 0; },
                                 absl::Seconds(10)));
}

// A shard of its own (not the suite's) for the tests that stop it.
struct OwnShard {
  MetricsRegistry metrics;
  std::unique_ptr<ExpertServer> server;
  v1::PeerIdentity me;
};
void StartOwnShard(OwnShard& shard, uint32_t max_data_connections) {
  absl::StatusOr<ExpertServerOptions> options = ShardOptions(0);
  ASSERT_TRUE(options.ok()) << options.status();
  ExpertServerOptions o = *options;
  o.data_listen = "127.0.0.1:0";
  o.limits.max_data_connections = max_data_connections;
  o.metrics = &shard.metrics;
  absl::StatusOr<std::unique_ptr<ExpertServer>> s = ExpertServer::Start(o);
  ASSERT_TRUE(s.ok()) << s.status();
  shard.server = std::move(*s);
  absl::StatusOr<v1::PeerIdentity> me = MakeLocalIdentity(o.model_dir, "test", "data-plane-own");
  ASSERT_TRUE(me.ok());
  shard.me = *me;
}

v1::ExpertRequest SmallRequest(const ModelConfig& config) {
  // One row on expert 0 (shard 0 holds layer 2's experts 0-3 under EvenPlacement(2)).
  v1::ExpertRequest r;
  r.set_layer(kLayer);
  r.set_n_rows(1);
  r.set_hidden_size(static_cast<uint32_t>(config.hidden_size));
  testing::Batch b = RandomBatch(config, 1, 61);
  PackAllActivations(b.x, r.mutable_activations(), r.mutable_scales());
  r.add_row_offsets(0);
  r.add_experts(0);
  r.add_weights(0.5f);
  r.add_row_offsets(1);
  return r;
}

TEST(ExpertDataPlaneStopTest, DrainAnswersUnavailableThenClosesAndRefuses) {
  OwnShard shard;
  StartOwnShard(shard, /*max_data_connections=*/2);
  ASSERT_NE(shard.server, nullptr);
  const ModelConfig& config = shard.server->config();
  const std::string address = shard.server->data_address();
  std::unique_ptr<FrameConnection> a = DataConnect(address), b = DataConnect(address);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(DataHello(*a, shard.me).ok());
  ASSERT_TRUE(DataHello(*b, shard.me).ok());
  EXPECT_EQ(DataCall(*a, SmallRequest(config)).error_code(), 0);
  // The bound: a third connection is refused with RESOURCE_EXHAUSTED, and counted.
  {
    std::unique_ptr<FrameConnection> c = DataConnect(address);
    ASSERT_NE(c, nullptr);
    const absl::Status s = DataHello(*c, shard.me);
    EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
    EXPECT_EQ(testing::MetricValue(shard.metrics.RenderText(),
                                   "expertmesh_expert_data_connections_refused_total"),
              1);
  }
  // Draining: requests are answered UNAVAILABLE in-band (the dispatcher fails over).
  shard.server->service().StartDraining();
  const v1::ExpertResponse resp = DataCall(*a, SmallRequest(config));
  EXPECT_EQ(resp.error_code(), static_cast<int>(absl::StatusCode::kUnavailable));
  EXPECT_NE(resp.error_message().find("draining"), std::string::npos) << resp.error_message();
  // Drain returns promptly with two idle connections open, and they are closed.
  const absl::Time start = absl::Now();
  shard.server->Drain();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  for (FrameConnection* c : {a.get(), b.get()}) {
    EXPECT_EQ(c->ReadFrame(In(absl::Seconds(5))).code(), absl::StatusCode::kUnavailable);
  }
  // A new client is refused at once (not left in the backlog of a listener nobody serves).
  const absl::Time t = absl::Now();
  absl::StatusOr<std::unique_ptr<FrameConnection>> late =
      FrameConnection::Connect(address, In(absl::Seconds(5)), 1 << 20);
  if (late.ok()) {
    EXPECT_FALSE(DataHello(**late, shard.me).ok());
  } else {
    EXPECT_EQ(late.status().code(), absl::StatusCode::kUnavailable) << late.status();
  }
  EXPECT_LT(absl::Now() - t, absl::Seconds(2));
}

TEST(ExpertDataPlaneStopTest, KillCutsOpenConnections) {
  OwnShard shard;
  StartOwnShard(shard, 8);
  ASSERT_NE(shard.server, nullptr);
  std::unique_ptr<FrameConnection> c = DataConnect(shard.server->data_address());
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(DataHello(*c, shard.me).ok());
  EXPECT_EQ(DataCall(*c, SmallRequest(shard.server->config())).error_code(), 0);
  testing::RawClient half(shard.server->data_port());  // stuck inside a frame
  ASSERT_TRUE(half.Send("EMD1"));
  const absl::Time start = absl::Now();
  shard.server->Kill();
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  EXPECT_EQ(c->ReadFrame(In(absl::Seconds(5))).code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(c->QuietAndOpen());
  EXPECT_TRUE(half.ReadUntilClosed(std::chrono::seconds(5)));
}

TEST(ExpertDataPlaneStopTest, ABadListenAddressIsRefusedBeforeStarting) {
  absl::StatusOr<ExpertServerOptions> options = ShardOptions(0);
  ASSERT_TRUE(options.ok()) << options.status();
  ExpertServerOptions o = *options;
  for (const std::string bad : {"127.0.0.1", "127.0.0.1:70000", "::1:0", ":0"}) {
    o.data_listen = bad;
    absl::StatusOr<std::unique_ptr<ExpertServer>> s = ExpertServer::Start(o);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << bad << ": " << s.status();
    EXPECT_NE(s.status().message().find(bad), std::string::npos) << s.status();
  }
  // A port taken by another listener: Unavailable, not a half-started shard.
  OwnShard first;
  StartOwnShard(first, 4);
  ASSERT_NE(first.server, nullptr);
  o.data_listen = first.server->data_address();
  absl::StatusOr<std::unique_ptr<ExpertServer>> s = ExpertServer::Start(o);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kUnavailable) << s.status();
  EXPECT_NE(s.status().message().find("cannot listen"), std::string::npos) << s.status();
}

// The data-plane address the router is given: the listen host with the bound port, the
// advertised gRPC host for a wildcard, [v6] in brackets, or --data-advertise as given.
TEST(ExpertDataPlaneStopTest, DataAddressFollowsTheListenAddress) {
  absl::StatusOr<ExpertServerOptions> options = ShardOptions(0);
  ASSERT_TRUE(options.ok()) << options.status();
  ExpertServerOptions o = *options;
  absl::StatusOr<v1::PeerIdentity> me = MakeLocalIdentity(o.model_dir, "test", "address");
  ASSERT_TRUE(me.ok());
  auto start = [&](const std::string& listen, const std::string& advertise) {
    o.data_listen = listen;
    o.data_advertise_address = advertise;
    absl::StatusOr<std::unique_ptr<ExpertServer>> s = ExpertServer::Start(o);
    EXPECT_TRUE(s.ok()) << listen << ": " << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  };
  {
    std::unique_ptr<ExpertServer> s = start("0.0.0.0:0", "");
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->data_address(), absl::StrCat("127.0.0.1:", s->data_port()));
    std::unique_ptr<FrameConnection> c = DataConnect(s->data_address());
    ASSERT_NE(c, nullptr);
    EXPECT_TRUE(DataHello(*c, *me).ok());
  }
  {
    std::unique_ptr<ExpertServer> s = start("127.0.0.1:0", "shard-0.experts:7070");
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->data_address(), "shard-0.experts:7070");
    EXPECT_GT(s->data_port(), 0);
  }
  {
    o.data_listen.clear();  // off
    absl::StatusOr<std::unique_ptr<ExpertServer>> s = ExpertServer::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ((*s)->data_port(), 0);
    EXPECT_EQ((*s)->data_address(), "");
  }
  // IPv6 loopback, where this host has it.
  const int v6 = ::socket(AF_INET6, SOCK_STREAM, 0);
  sockaddr_in6 a6{};
  a6.sin6_family = AF_INET6;
  a6.sin6_addr = in6addr_loopback;
  const bool have_v6 = v6 >= 0 && ::bind(v6, reinterpret_cast<sockaddr*>(&a6), sizeof a6) == 0;
  if (v6 >= 0) ::close(v6);
  if (!have_v6) GTEST_SKIP() << "no IPv6 loopback here";
  std::unique_ptr<ExpertServer> s = start("[::1]:0", "");
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->data_address(), absl::StrCat("[::1]:", s->data_port()));
  std::unique_ptr<FrameConnection> c = DataConnect(s->data_address());
  ASSERT_NE(c, nullptr);
  EXPECT_TRUE(DataHello(*c, *me).ok());
}

TEST(ExpertDataPlaneTlsTest, DataListenIsRefusedUnderMtls) {
  absl::StatusOr<ExpertServerOptions> options = ShardOptions(0);
  ASSERT_TRUE(options.ok()) << options.status();
  const std::string dir =
      (std::filesystem::temp_directory_path() / absl::StrCat("em-data-tls-", ::getpid())).string();
  std::filesystem::create_directories(dir);
  const absl::Status pki = testing::MakeTestPki(dir, "IP:127.0.0.1", "shard");
  ASSERT_TRUE(pki.ok()) << pki;
  ExpertServerOptions o = *options;
  o.data_listen = "127.0.0.1:0";
  SetProcessTls(TlsFiles{.cert = dir + "/tls.crt", .key = dir + "/tls.key", .ca = dir + "/ca.crt"});
  absl::StatusOr<std::unique_ptr<ExpertServer>> s = ExpertServer::Start(o);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition) << s.status();
  EXPECT_NE(s.status().message().find("mTLS"), std::string::npos) << s.status();
  // Without the data plane the same shard starts under mTLS (its gRPC is TLS).
  o.data_listen.clear();
  s = ExpertServer::Start(o);
  EXPECT_TRUE(s.ok()) << s.status();
  if (s.ok()) {
    EXPECT_EQ((*s)->data_port(), 0);
  }
  s = absl::UnknownError("released");  // stopped before the TLS setting goes
  SetProcessTls(TlsFiles{});
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace expertmesh
