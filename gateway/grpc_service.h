// The gateway's public gRPC API (protos/expertmesh/v1/gateway.proto): Generate streams text
// deltas (and token ids, logprobs) then a last message with finish reason and usage;
// ListModels. Validation, admission and errors are those of the HTTP API, mapped to gRPC
// status codes (RESOURCE_EXHAUSTED when the queue is full, INVALID_ARGUMENT, NOT_FOUND for an
// unknown model; a refusal carries `retry-after` trailing metadata in seconds). A cancelled
// call cancels its sequence. The admission queue's fair share keys gRPC callers by peer
// address (the gRPC API checks no API key).
#pragma once

#include <string>
#include <string_view>

#include "expertmesh/v1/gateway.grpc.pb.h"
#include "gateway/generation.h"

namespace expertmesh::gateway {

// GenerateRequest -> GenerationRequest (proto3 zeros mean "not set": model "" is the served
// model, max_tokens 0 runs to the end of the context, top_p 0 is off; a request without
// `sampling` takes the model's generation_config defaults). Validated like the HTTP API's.
absl::StatusOr<GenerationRequest> FromProto(const v1::GenerateRequest& proto, const ModelCard& card,
                                            const RequestLimits& limits);

// grpc::ServerContext::peer() -> the admission queue's client key: "peer:<address>" without
// the port ("ipv4:127.0.0.1:5000" -> "peer:127.0.0.1").
std::string PeerKey(std::string_view peer);

class GatewayGrpcService final : public v1::Gateway::Service {
 public:
  GatewayGrpcService(const RequestRunner* runner, GatewayMetrics* metrics)
      : runner_(runner), metrics_(metrics) {}

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status ListModels(grpc::ServerContext* context, const v1::ListModelsRequest* request,
                          v1::ListModelsResponse* response) override;

 private:
  const RequestRunner* runner_;
  GatewayMetrics* metrics_;
};

}  // namespace expertmesh::gateway
