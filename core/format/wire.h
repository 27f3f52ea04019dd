// The tensor wire layout of the expert data plane, defined once (protobuf-free: the
// services copy these bytes into/out of ExpertRequest / ExpertResponse `bytes` fields).
//
//   activations: FP8 E4M3 codes, [n_rows, hidden_size] row-major, 1 byte each
//   scales:      float32 little-endian, [n_rows, ceil(hidden_size / 128)] row-major
//   outputs:     BF16 little-endian, row-major; by the request's combine mode:
//                  COMBINE_PARTIAL_SUM [n_rows, hidden_size]: per row the sum of
//                    weight * expert(x) over the request's pairs of that row;
//                  COMBINE_PER_EXPERT  [n_pairs, hidden_size]: per pair the UNWEIGHTED
//                    expert(x) (as RoutedExperts::RunPerExpert computes it), in request
//                    pair order; the receiver adds weight * y per row in ascending expert order
//                    with AddWeightedBf16 (core/model/experts.h)
//
// Also: the protocol version both ends of every stream must agree on, and the model
// fingerprint (a hash of config.json's text) that keeps peers of different models apart.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/numerics/quant.h"

namespace expertmesh {

// Bump on any change of the wire layout or of message semantics.
// 2: ExpertRequest.combine (COMBINE_PER_EXPERT answers [n_pairs, hidden_size]). A version-1
// shard would ignore the field and answer partial sums, which an exact-mode dispatcher counts
// as bad answers and cuts the stream; the handshake refuses the mix with a clear error instead.
inline constexpr uint32_t kProtocolVersion = 2;

// Hex FNV-1a 64 of the config.json text, e.g. "fnv1a64:8c3f...". Same text, same value, on
// every machine; this is an identity check, not a security measure.
std::string ModelFingerprint(std::string_view config_json_text);
// Reads dir/config.json and fingerprints it; the error names the file.
absl::StatusOr<std::string> ModelFingerprintOfDir(const std::string& model_dir);

// Byte sizes of the three fields for n_rows x hidden_size (no overflow for values that fit
// the proto's uint32 fields).
inline uint64_t ActivationBytes(uint64_t n_rows, uint64_t hidden_size) {
  return n_rows * hidden_size;
}
inline uint64_t ScaleBytes(uint64_t n_rows, uint64_t hidden_size) {
  return n_rows *
         static_cast<uint64_t>(NumBlocks(static_cast<int64_t>(hidden_size), kActQuantGroup)) * 4;
}
// Also the per-expert answer's size with n_rows = n_pairs.
inline uint64_t OutputBytes(uint64_t n_rows, uint64_t hidden_size) {
  return n_rows * hidden_size * 2;
}

// Packs the rows `rows` (indices into x, in the order given) of x into the activation and
// scale layouts. rows empty = none; use PackAllActivations for every row.
void PackActivationRows(const QuantizedActivations& x, std::span<const int32_t> rows,
                        std::string* activations, std::string* scales);
void PackAllActivations(const QuantizedActivations& x, std::string* activations,
                        std::string* scales);
// The inverse. Sizes must match n_rows x hidden_size exactly (InvalidArgument otherwise);
// values are not checked here (the expert service validates them).
absl::StatusOr<QuantizedActivations> UnpackActivations(std::string_view activations,
                                                       std::string_view scales, int64_t n_rows,
                                                       int64_t hidden_size);

// rows: [n_rows, hidden_size] float -> BF16 bytes (round to nearest even).
void PackOutputRows(std::span<const float> rows, std::string* outputs);
// outputs: BF16 bytes of [n_rows, hidden_size] -> float rows (exact); size checked.
absl::Status UnpackOutputRows(std::string_view outputs, int64_t n_rows, int64_t hidden_size,
                              std::span<float> rows);
// The partial-sum combine step: out[row_index[i]] += outputs row i, for i in order.
// out: [*, hidden_size].
absl::Status AccumulateOutputRows(std::string_view outputs, std::span<const int32_t> row_index,
                                  int64_t hidden_size, std::span<float> out);
// The per-expert scatter: BF16 rows of `outputs` (i = 0..pair_index.size()-1) copied, bit for
// bit, to pair_out rows pair_index[i]. pair_out: [n_pairs, hidden_size]; size and range checked.
absl::Status ScatterPairOutputs(std::string_view outputs, std::span<const int32_t> pair_index,
                                int64_t hidden_size, std::span<uint16_t> pair_out);

}  // namespace expertmesh
