// The gateway's one status -> HTTP mapping (gateway/api_error.h): client mistakes are 4xx,
// failures of the server or the cluster behind it are 5xx; 405 only for a wrong method.
#include "gateway/api_error.h"

#include <boost/json.hpp>

#include "gtest/gtest.h"

namespace expertmesh::gateway {
namespace {

TEST(ToApiErrorTest, MethodNotAllowedIsTheOnly405) {
  const ApiError e = ToApiError(MethodNotAllowed("POST", "Use POST /v1/completions."));
  EXPECT_EQ(e.http_status, 405);
  EXPECT_EQ(e.type, "invalid_request_error");
  ASSERT_TRUE(e.allow.has_value());
  EXPECT_EQ(*e.allow, "POST");
  EXPECT_EQ(e.message, "Use POST /v1/completions.");
}

TEST(ToApiErrorTest, UnimplementedFromUpstreamIsAServerError) {
  // What an attention service started with --no-act-quant used to send back for every step.
  const ApiError e = ToApiError(
      absl::UnimplementedError("this RoutedExperts takes FP8 activations only (layer 1)"));
  EXPECT_EQ(e.http_status, 500);
  EXPECT_EQ(e.type, "server_error");
  EXPECT_FALSE(e.allow.has_value());
  EXPECT_NE(e.message.find("FP8"), std::string::npos);
}

TEST(ToApiErrorTest, EveryCodeMapsToItsHttpStatus) {
  struct Case {
    absl::StatusCode code;
    int http;
    const char* type;
  };
  const Case cases[] = {
      {absl::StatusCode::kInvalidArgument, 400, "invalid_request_error"},
      {absl::StatusCode::kOutOfRange, 400, "invalid_request_error"},
      {absl::StatusCode::kFailedPrecondition, 400, "invalid_request_error"},
      {absl::StatusCode::kUnauthenticated, 401, "invalid_request_error"},
      {absl::StatusCode::kPermissionDenied, 403, "invalid_request_error"},
      {absl::StatusCode::kNotFound, 404, "invalid_request_error"},
      {absl::StatusCode::kResourceExhausted, 429, "rate_limit_error"},
      {absl::StatusCode::kCancelled, 499, "invalid_request_error"},
      {absl::StatusCode::kUnavailable, 503, "server_error"},
      {absl::StatusCode::kDeadlineExceeded, 504, "server_error"},
      {absl::StatusCode::kInternal, 500, "server_error"},
      {absl::StatusCode::kUnknown, 500, "server_error"},
      {absl::StatusCode::kDataLoss, 500, "server_error"},
      {absl::StatusCode::kAborted, 500, "server_error"},
      {absl::StatusCode::kAlreadyExists, 500, "server_error"},
      {absl::StatusCode::kUnimplemented, 500, "server_error"},
  };
  for (const Case& c : cases) {
    const ApiError e = ToApiError(absl::Status(c.code, "why"));
    EXPECT_EQ(e.http_status, c.http) << absl::StatusCodeToString(c.code);
    EXPECT_EQ(e.type, c.type) << absl::StatusCodeToString(c.code);
    EXPECT_NE(e.http_status, 405) << absl::StatusCodeToString(c.code);
    EXPECT_EQ(e.message, "why");
  }
}

TEST(ToApiErrorTest, JsonBodyHasTheOpenAiShape) {
  const ApiError e = ToApiError(InvalidParam("max_tokens", "too many"));
  const boost::json::value v = boost::json::parse(ApiErrorJson(e));
  const boost::json::object& err = v.at("error").as_object();
  EXPECT_EQ(err.at("message").as_string(), "too many");
  EXPECT_EQ(err.at("type").as_string(), "invalid_request_error");
  EXPECT_EQ(err.at("param").as_string(), "max_tokens");
  EXPECT_TRUE(err.at("code").is_null());
}

// Found by tests/fuzz/http_request_fuzz: a request for "/v1/c\xC6ompletions" got a 404 whose
// body echoed the raw path, so it was not UTF-8 and not JSON a client could parse.
TEST(ToApiErrorTest, JsonBodyIsValidUtf8WhenTheMessageEchoesRawBytes) {
  const ApiError e = ToApiError(
      WithParam(absl::NotFoundError("Unknown path /v1/c\xC6ompletions."), std::string("p\xFF")));
  const std::string json = ApiErrorJson(e);
  boost::system::error_code ec;
  const boost::json::value v = boost::json::parse(json, ec);
  ASSERT_FALSE(ec) << json;
  const boost::json::object& err = v.at("error").as_object();
  EXPECT_EQ(err.at("message").as_string(), "Unknown path /v1/c\xEF\xBF\xBDompletions.");
  EXPECT_EQ(err.at("param").as_string(), "p\xEF\xBF\xBD");
}

}  // namespace
}  // namespace expertmesh::gateway
