// The gateway's one error taxonomy: absl::Status everywhere inside, mapped once to the OpenAI
// error shape {"error": {"message", "type", "param", "code"}} with its HTTP status, and to
// grpc::Status on the gRPC API. The offending request field and the OpenAI error code travel
// with the Status as payloads, so validation code stays plain absl::Status.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace expertmesh::gateway {

// Attaches the request field at fault ("max_tokens", "messages[2].content") to `status`.
absl::Status WithParam(absl::Status status, std::string_view param);
// Attaches an OpenAI error code ("model_not_found", "context_length_exceeded").
absl::Status WithCode(absl::Status status, std::string_view code);

// Attaches the seconds a client should wait before retrying (429, 503): the Retry-After
// header; without it those statuses say 1.
absl::Status WithRetryAfter(absl::Status status, int seconds);
// The seconds attached by WithRetryAfter, 0 when none.
int RetryAfterOf(const absl::Status& status);

// Shorthands for the common request errors.
absl::Status InvalidParam(std::string_view param, std::string_view message);
absl::Status UnknownModel(std::string_view model);
// A request with an HTTP method the path does not take: 405 with `Allow: <allowed>`. The only
// way to get a 405: an UNIMPLEMENTED from anywhere else (an upstream service that lacks a
// feature) is a server error.
absl::Status MethodNotAllowed(std::string_view allowed, std::string_view message);

struct ApiError {
  int http_status = 500;
  std::string message;
  std::string type;                  // "invalid_request_error", "server_error", ...
  std::optional<std::string> param;  // JSON null when absent
  std::optional<std::string> code;   // JSON null when absent
  int retry_after_s = 0;             // > 0: a Retry-After header goes with it (429, 503)
  std::optional<std::string> allow;  // 405: the Allow header
};

// The single place where an absl::Status becomes an HTTP error.
ApiError ToApiError(const absl::Status& status);

// {"error": {...}} as compact JSON.
std::string ApiErrorJson(const ApiError& error);

}  // namespace expertmesh::gateway
