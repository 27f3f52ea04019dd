// OpenAI request bodies -> GenerationRequest: JSON syntax, field types, unknown fields (OpenAI
// rejects them), the model name, value ranges. Pure functions of the body and the model card,
// so every error case is unit-tested without a network. Errors carry the offending field
// (api_error.h) and map to the OpenAI error shape in one place.
#pragma once

#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/base/utf8.h"  // IsValidUtf8
#include "gateway/request.h"

namespace expertmesh::gateway {

// POST /v1/completions.
absl::StatusOr<GenerationRequest> ParseCompletionRequest(std::string_view body,
                                                         const ModelCard& card,
                                                         const RequestLimits& limits);

// POST /v1/chat/completions.
absl::StatusOr<GenerationRequest> ParseChatCompletionRequest(std::string_view body,
                                                             const ModelCard& card,
                                                             const RequestLimits& limits);

// Range checks shared by the HTTP and gRPC APIs (sampling values, stop lists, max_tokens).
absl::Status ValidateGenerationRequest(const GenerationRequest& request, const ModelCard& card,
                                       const RequestLimits& limits);

}  // namespace expertmesh::gateway
