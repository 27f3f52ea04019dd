// libFuzzer target: the framed TCP data plane's input path on a shard, fed the bytes a client
// sends on one connection: frame headers (DecodeFrameHeader, dataplane/frame.cc), then each
// frame's payload handed to the shard's session (ExpertServiceImpl::NewDataSession, in
// expert-service/expert_service.cc): the hello (a HandshakeRequest checked against the model),
// then ExpertRequests validated and computed by the bundled tiny model's real experts (a shard
// holding the experts with (layer + expert) % 3 != 0).
// Input: byte 0 holds flags (bit 0: the harness greets first with a valid hello, so that the
// fuzzer reaches the requests without having to guess the model's fingerprint); the rest is the
// byte stream, consumed frame by frame as FrameServer::Serve consumes it, up to the first
// refusal (where the server writes an error frame and closes).
// Promises checked (a broken one traps): a decoded header re-encodes to the same bytes and is
// within the limit; refusals carry the codes the protocol documents and survive the error
// payload's encoding; a hello is answered by a HandshakeResponse, a request by an
// ExpertResponse that either carries an error (and no outputs) or exactly the outputs its rows
// (or pairs) take; a request before the hello is FAILED_PRECONDITION.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/format/config.h"
#include "core/format/safetensors.h"
#include "core/format/wire.h"
#include "core/model/local_experts.h"
#include "dataplane/frame.h"
#include "expert-service/expert_service.h"
#include "expertmesh/v1/expert.pb.h"
#include "service-common/handshake.h"
#include "spdlog/spdlog.h"

namespace {

using expertmesh::dataplane::FrameType;

void Check(bool condition) {
  if (!condition) __builtin_trap();
}

constexpr uint32_t kMaxFrameBytes = 1u << 20;
constexpr const char* kModel = EXPERTMESH_SOURCE_DIR "/models/expertmesh-tiny";

struct Shard {
  expertmesh::ModelConfig config;
  std::unique_ptr<expertmesh::Checkpoint> checkpoint;
  std::unique_ptr<expertmesh::ExpertServiceImpl> service;
  std::string hello;  // a valid hello payload
};

const Shard& TheShard() {
  static const Shard* shard = [] {
    spdlog::set_level(spdlog::level::off);
    auto* s = new Shard;
    auto config = expertmesh::LoadModelConfig(std::string(kModel) + "/config.json");
    Check(config.ok());
    s->config = *std::move(config);
    auto ckpt = expertmesh::Checkpoint::Open(kModel);
    Check(ckpt.ok());
    s->checkpoint = *std::move(ckpt);
    std::vector<expertmesh::LayerExpert> held;
    const int n_layers = s->config.num_hidden_layers + s->config.num_nextn_predict_layers;
    for (int layer = 0; layer < n_layers; ++layer) {
      if (!s->config.IsMoeLayer(layer)) continue;
      for (int e = 0; e < s->config.n_routed_experts; ++e) {
        if ((layer + e) % 3 != 0) held.push_back({layer, e});
      }
    }
    auto experts = expertmesh::LocalExperts::Create(*s->checkpoint, s->config, held);
    Check(experts.ok());
    auto identity = expertmesh::MakeLocalIdentity(kModel, "expert-service", "fuzz");
    Check(identity.ok());
    expertmesh::ExpertRequestLimits limits;
    limits.max_rows = 64;
    s->service = std::make_unique<expertmesh::ExpertServiceImpl>(s->config, *identity, limits,
                                                                 /*metrics=*/nullptr);
    s->service->SetExperts(*std::move(experts), held, /*serialize=*/false);
    auto client = expertmesh::MakeLocalIdentity(kModel, "attention-service", "fuzz-client");
    Check(client.ok());
    expertmesh::v1::HandshakeRequest req;
    *req.mutable_client() = *client;
    s->hello = req.SerializeAsString();
    return s;
  }();
  return *shard;
}

// A refusal as the server sends it: the error frame's payload decodes to the same status.
void CheckRefusal(const absl::Status& s) {
  Check(!s.ok() && !s.message().empty());
  Check(expertmesh::dataplane::DecodeErrorPayload(expertmesh::dataplane::EncodeErrorPayload(s)) ==
        s);
}

void CheckAnswer(const expertmesh::ModelConfig& config, FrameType type, std::string_view payload,
                 FrameType reply_type, const std::string& reply) {
  if (type == FrameType::kHello) {
    Check(reply_type == FrameType::kHelloOk);
    expertmesh::v1::HandshakeResponse resp;
    Check(resp.ParseFromString(reply));
    return;
  }
  Check(type == FrameType::kRequest && reply_type == FrameType::kResponse);
  expertmesh::v1::ExpertRequest req;
  Check(req.ParseFromArray(payload.data(), static_cast<int>(payload.size())));
  expertmesh::v1::ExpertResponse resp;
  Check(resp.ParseFromString(reply));
  Check(resp.request_id() == req.request_id() && resp.batch_id() == req.batch_id());
  if (resp.error_code() != 0) {
    Check(resp.outputs().empty() && !resp.error_message().empty());
    return;
  }
  const uint64_t rows = req.combine() == expertmesh::v1::COMBINE_PER_EXPERT
                            ? static_cast<uint64_t>(req.experts_size())
                            : req.n_rows();
  Check(resp.n_rows() == req.n_rows());
  Check(resp.outputs().size() == expertmesh::OutputBytes(rows, config.hidden_size));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Shard& shard = TheShard();
  if (size == 0) return 0;
  const uint8_t flags = data[0];
  std::string_view bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  // Whatever a kError frame from a broken server would hold, it is never OK.
  Check(!expertmesh::dataplane::DecodeErrorPayload(bytes).ok());

  std::unique_ptr<expertmesh::dataplane::FrameSession> session = shard.service->NewDataSession();
  FrameType reply_type = FrameType::kError;
  std::string reply;
  bool greeted = false;
  if (flags & 1) {
    Check(session->OnFrame(FrameType::kHello, shard.hello, &reply_type, &reply).ok());
    CheckAnswer(shard.config, FrameType::kHello, shard.hello, reply_type, reply);
    greeted = true;
  }
  while (bytes.size() >= expertmesh::dataplane::kFrameHeaderBytes) {
    const std::string_view header = bytes.substr(0, expertmesh::dataplane::kFrameHeaderBytes);
    absl::StatusOr<expertmesh::dataplane::FrameHeader> h =
        expertmesh::dataplane::DecodeFrameHeader(header, kMaxFrameBytes);
    if (!h.ok()) {
      Check(h.status().code() == absl::StatusCode::kInvalidArgument ||
            h.status().code() == absl::StatusCode::kResourceExhausted);
      CheckRefusal(h.status());
      return 0;  // the server answers the error and closes
    }
    char again[expertmesh::dataplane::kFrameHeaderBytes];
    expertmesh::dataplane::EncodeFrameHeader(h->type, h->length, again);
    Check(std::string_view(again, sizeof again) == header && h->length <= kMaxFrameBytes);
    bytes.remove_prefix(expertmesh::dataplane::kFrameHeaderBytes);
    if (bytes.size() < h->length) return 0;  // the server waits for the rest (frame timeout)
    const std::string_view payload = bytes.substr(0, h->length);
    bytes.remove_prefix(h->length);
    reply.clear();
    reply_type = FrameType::kError;
    const absl::Status s = session->OnFrame(h->type, payload, &reply_type, &reply);
    if (!s.ok()) {
      CheckRefusal(s);
      Check(s.code() == absl::StatusCode::kInvalidArgument ||
            s.code() == absl::StatusCode::kFailedPrecondition);
      if (h->type == FrameType::kRequest && !greeted) {
        Check(s.code() == absl::StatusCode::kFailedPrecondition);
      }
      return 0;  // error frame, then closed
    }
    CheckAnswer(shard.config, h->type, payload, reply_type, reply);
    if (h->type == FrameType::kHello) {
      Check(!greeted);  // a second hello is refused
      greeted = true;
    } else {
      Check(greeted);
    }
  }
  return 0;
}
