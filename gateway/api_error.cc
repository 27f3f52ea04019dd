#include "gateway/api_error.h"

#include <algorithm>

#include <boost/json.hpp>

#include "absl/strings/cord.h"
#include "core/base/utf8.h"
#include "gateway/strings.h"

namespace expertmesh::gateway {
namespace {

constexpr std::string_view kParamPayload = "type.expertmesh/gateway.param";
constexpr std::string_view kCodePayload = "type.expertmesh/gateway.code";
constexpr std::string_view kAllowPayload = "type.expertmesh/gateway.allow";
constexpr std::string_view kRetryAfterPayload = "type.expertmesh/gateway.retry_after";

std::optional<std::string> Payload(const absl::Status& status, std::string_view key) {
  auto cord = status.GetPayload(absl::string_view(key.data(), key.size()));
  if (!cord.has_value()) return std::nullopt;
  return std::string(*cord);
}

}  // namespace

absl::Status WithParam(absl::Status status, std::string_view param) {
  if (!status.ok())
    status.SetPayload(absl::string_view(kParamPayload.data(), kParamPayload.size()),
                      absl::Cord(std::string(param)));
  return status;
}

absl::Status WithCode(absl::Status status, std::string_view code) {
  if (!status.ok())
    status.SetPayload(absl::string_view(kCodePayload.data(), kCodePayload.size()),
                      absl::Cord(std::string(code)));
  return status;
}

absl::Status WithRetryAfter(absl::Status status, int seconds) {
  if (!status.ok() && seconds > 0)
    status.SetPayload(absl::string_view(kRetryAfterPayload.data(), kRetryAfterPayload.size()),
                      absl::Cord(std::to_string(seconds)));
  return status;
}

int RetryAfterOf(const absl::Status& status) {
  std::optional<std::string> s = Payload(status, kRetryAfterPayload);
  if (!s.has_value()) return 0;
  int seconds = 0;
  for (char c : *s) {
    if (c < '0' || c > '9' || seconds > 1'000'000) return 0;
    seconds = seconds * 10 + (c - '0');
  }
  return seconds;
}

absl::Status InvalidParam(std::string_view param, std::string_view message) {
  return WithParam(absl::InvalidArgumentError(std::string(message)), param);
}

absl::Status UnknownModel(std::string_view model) {
  return WithCode(
      WithParam(absl::NotFoundError(Cat("The model `", model, "` does not exist.")), "model"),
      "model_not_found");
}

absl::Status MethodNotAllowed(std::string_view allowed, std::string_view message) {
  absl::Status status = absl::UnimplementedError(std::string(message));
  status.SetPayload(absl::string_view(kAllowPayload.data(), kAllowPayload.size()),
                    absl::Cord(std::string(allowed)));
  return status;
}

ApiError ToApiError(const absl::Status& status) {
  ApiError e;
  e.message = std::string(status.message());
  e.param = Payload(status, kParamPayload);
  e.code = Payload(status, kCodePayload);
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
      e.http_status = 400;
      e.type = "invalid_request_error";
      break;
    case absl::StatusCode::kUnauthenticated:
      e.http_status = 401;
      e.type = "invalid_request_error";
      if (!e.code) e.code = "invalid_api_key";
      break;
    case absl::StatusCode::kPermissionDenied:
      e.http_status = 403;
      e.type = "invalid_request_error";
      break;
    case absl::StatusCode::kNotFound:
      e.http_status = 404;
      e.type = "invalid_request_error";
      break;
    case absl::StatusCode::kUnimplemented:
      e.allow = Payload(status, kAllowPayload);
      if (e.allow) {  // MethodNotAllowed: the client's mistake
        e.http_status = 405;
        e.type = "invalid_request_error";
      } else {  // a feature missing on the server side (e.g. upstream): not the client's fault
        e.http_status = 500;
        e.type = "server_error";
      }
      break;
    case absl::StatusCode::kResourceExhausted:
      e.http_status = 429;
      e.type = "rate_limit_error";
      if (!e.code) e.code = "rate_limit_exceeded";
      e.retry_after_s = std::max(1, RetryAfterOf(status));
      break;
    case absl::StatusCode::kCancelled:
      e.http_status = 499;
      e.type = "invalid_request_error";
      break;
    case absl::StatusCode::kUnavailable:
      e.http_status = 503;
      e.type = "server_error";
      if (!e.code) e.code = "service_unavailable";
      e.retry_after_s = std::max(1, RetryAfterOf(status));
      break;
    case absl::StatusCode::kDeadlineExceeded:
      e.http_status = 504;
      e.type = "server_error";
      if (!e.code) e.code = "timeout";
      break;
    default:
      e.http_status = 500;
      e.type = "server_error";
      break;
  }
  if (e.message.empty()) e.message = absl::StatusCodeToString(status.code());
  return e;
}

std::string ApiErrorJson(const ApiError& error) {
  // Messages and params may echo request bytes (a URL path, a field name) that are not UTF-8;
  // Boost.JSON would copy them as they are, and the body would not be JSON.
  boost::json::object inner;
  inner["message"] = Utf8Lossy(error.message);
  inner["type"] = error.type;
  inner["param"] =
      error.param ? boost::json::value(Utf8Lossy(*error.param)) : boost::json::value(nullptr);
  inner["code"] =
      error.code ? boost::json::value(Utf8Lossy(*error.code)) : boost::json::value(nullptr);
  boost::json::object outer;
  outer["error"] = std::move(inner);
  return boost::json::serialize(outer);
}

}  // namespace expertmesh::gateway
