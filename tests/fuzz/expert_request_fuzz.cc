// libFuzzer target: the expert shard's request validator (ValidateExpertRequest in
// expert-service/expert_service.cc) on untrusted bytes from a Compute stream.
// Input: one serialized v1::ExpertRequest, parsed with protobuf as ComputeStream parses it, then
// validated against the bundled model's config, for a shard that holds the experts with
// (layer + expert) % 3 != 0.
// Promise checked (a broken one traps): an accepted request is safe for what follows
// validation (Handle/Run index activations, scales, row_offsets, experts and weights with
// n_rows, hidden_size and the row offsets without further checks).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "core/format/config.h"
#include "core/format/wire.h"
#include "expert-service/expert_service.h"
#include "expertmesh/v1/expert.pb.h"

namespace {

void Check(bool condition) {
  if (!condition) __builtin_trap();
}

const expertmesh::ModelConfig& Config() {
  static const expertmesh::ModelConfig* config = [] {
    auto c =
        expertmesh::LoadModelConfig(EXPERTMESH_SOURCE_DIR "/models/expertmesh-tiny/config.json");
    Check(c.ok());
    return new expertmesh::ModelConfig(*std::move(c));
  }();
  return *config;
}

bool Holds(int layer, int expert) { return (layer + expert) % 3 != 0; }

// What the computation relies on, re-derived from the raw fields.
void CheckAccepted(const expertmesh::v1::ExpertRequest& r, const expertmesh::ModelConfig& c,
                   const expertmesh::ExpertRequestLimits& limits) {
  const uint64_t n_rows = r.n_rows();
  const uint64_t hidden = r.hidden_size();
  Check(n_rows > 0 && hidden == static_cast<uint64_t>(c.hidden_size));
  // Handle sizes the answer by the combine mode: rows, or pairs in per-expert mode.
  Check(r.combine() == expertmesh::v1::COMBINE_PARTIAL_SUM ||
        r.combine() == expertmesh::v1::COMBINE_PER_EXPERT);
  const uint64_t answer_rows = r.combine() == expertmesh::v1::COMBINE_PER_EXPERT
                                   ? static_cast<uint64_t>(r.experts_size())
                                   : n_rows;
  Check(expertmesh::OutputBytes(answer_rows, hidden) <= limits.max_response_bytes);
  Check(r.layer() >= 0 && c.IsMoeLayer(r.layer()));
  Check(r.activations().size() == expertmesh::ActivationBytes(n_rows, hidden));
  Check(r.scales().size() == expertmesh::ScaleBytes(n_rows, hidden));
  Check(static_cast<uint64_t>(r.row_offsets_size()) == n_rows + 1);
  Check(r.experts_size() == r.weights_size());
  Check(r.row_offsets(0) == 0);
  for (uint64_t i = 0; i < n_rows; ++i) {
    const uint32_t begin = r.row_offsets(static_cast<int>(i));
    const uint32_t end = r.row_offsets(static_cast<int>(i + 1));
    Check(begin <= end && end <= static_cast<uint32_t>(r.experts_size()));
    Check(end - begin <= static_cast<uint32_t>(c.num_experts_per_tok));
    for (uint32_t p = begin; p < end; ++p) {
      const int32_t e = r.experts(static_cast<int>(p));
      Check(e >= 0 && e < c.n_routed_experts && Holds(r.layer(), e));
      Check(std::isfinite(r.weights(static_cast<int>(p))) && r.weights(static_cast<int>(p)) >= 0);
    }
  }
  Check(r.row_offsets(static_cast<int>(n_rows)) == static_cast<uint32_t>(r.experts_size()));
  for (size_t i = 0; i + 4 <= r.scales().size(); i += 4) {
    float s;
    std::memcpy(&s, r.scales().data() + i, 4);
    Check(std::isfinite(s) && s > 0);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const expertmesh::ModelConfig& config = Config();
  expertmesh::v1::ExpertRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  for (float max_weight : {0.0f, 1.0f}) {  // from the config, and an explicit limit
    expertmesh::ExpertRequestLimits limits;
    limits.max_weight = max_weight;
    const absl::Status status = expertmesh::ValidateExpertRequest(request, config, limits, Holds);
    if (status.ok()) {
      CheckAccepted(request, config, limits);
    } else {
      Check(!status.message().empty());
      Check(status.code() == absl::StatusCode::kInvalidArgument ||
            status.code() == absl::StatusCode::kResourceExhausted ||
            status.code() == absl::StatusCode::kFailedPrecondition);
    }
  }
  // A tight size limit: the size check comes before anything else.
  expertmesh::ExpertRequestLimits tight;
  tight.max_request_bytes = 64;
  const absl::Status s = expertmesh::ValidateExpertRequest(request, config, tight, Holds);
  if (request.ByteSizeLong() > 64) Check(s.code() == absl::StatusCode::kResourceExhausted);
  return 0;
}
