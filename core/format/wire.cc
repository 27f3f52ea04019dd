#include "core/format/wire.h"

#include <bit>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/base/file.h"
#include "core/base/status.h"
#include "core/numerics/numerics.h"

namespace expertmesh {

static_assert(std::endian::native == std::endian::little,
              "the wire layout is little-endian; a big-endian host needs byte swaps here");

std::string ModelFingerprint(std::string_view config_json_text) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a 64 offset basis
  for (unsigned char c : config_json_text) {
    h ^= c;
    h *= 0x100000001b3ull;  // FNV prime
  }
  return absl::StrFormat("fnv1a64:%016x", h);
}

absl::StatusOr<std::string> ModelFingerprintOfDir(const std::string& model_dir) {
  EM_ASSIGN_OR_RETURN(const std::string text, base::ReadFile(model_dir + "/config.json"));
  return ModelFingerprint(text);
}

void PackActivationRows(const QuantizedActivations& x, std::span<const int32_t> rows,
                        std::string* activations, std::string* scales) {
  const int64_t dim = x.dim;
  const int64_t groups = x.groups();
  activations->resize(rows.size() * dim);
  scales->resize(rows.size() * groups * sizeof(float));
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t r = rows[i];
    std::memcpy(activations->data() + i * dim, x.fp8.data() + r * dim, dim);
    std::memcpy(scales->data() + i * groups * sizeof(float), x.scales.data() + r * groups,
                groups * sizeof(float));
  }
}

void PackAllActivations(const QuantizedActivations& x, std::string* activations,
                        std::string* scales) {
  activations->assign(reinterpret_cast<const char*>(x.fp8.data()), x.fp8.size());
  scales->assign(reinterpret_cast<const char*>(x.scales.data()), x.scales.size() * sizeof(float));
}

absl::StatusOr<QuantizedActivations> UnpackActivations(std::string_view activations,
                                                       std::string_view scales, int64_t n_rows,
                                                       int64_t hidden_size) {
  if (n_rows < 0 || hidden_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("n_rows ", n_rows, " and hidden_size ", hidden_size, " must be positive"));
  }
  const uint64_t want_act = ActivationBytes(n_rows, hidden_size);
  const uint64_t want_scales = ScaleBytes(n_rows, hidden_size);
  if (activations.size() != want_act) {
    return absl::InvalidArgumentError(absl::StrCat("activations hold ", activations.size(),
                                                   " bytes; n_rows x hidden_size = ", want_act));
  }
  if (scales.size() != want_scales) {
    return absl::InvalidArgumentError(
        absl::StrCat("scales hold ", scales.size(),
                     " bytes; n_rows x ceil(hidden_size/128) x 4 = ", want_scales));
  }
  QuantizedActivations x;
  x.n_rows = n_rows;
  x.dim = hidden_size;
  x.fp8.assign(reinterpret_cast<const uint8_t*>(activations.data()),
               reinterpret_cast<const uint8_t*>(activations.data()) + activations.size());
  x.scales.resize(want_scales / sizeof(float));
  std::memcpy(x.scales.data(), scales.data(), want_scales);
  return x;
}

void PackOutputRows(std::span<const float> rows, std::string* outputs) {
  outputs->resize(rows.size() * 2);
  for (size_t i = 0; i < rows.size(); ++i) {
    const uint16_t b = FloatToBf16(rows[i]);
    std::memcpy(outputs->data() + 2 * i, &b, 2);
  }
}

absl::Status UnpackOutputRows(std::string_view outputs, int64_t n_rows, int64_t hidden_size,
                              std::span<float> rows) {
  const uint64_t want = OutputBytes(n_rows, hidden_size);
  if (outputs.size() != want || rows.size() != static_cast<size_t>(n_rows * hidden_size)) {
    return absl::InvalidArgumentError(
        absl::StrCat("outputs hold ", outputs.size(), " bytes; n_rows x hidden_size x 2 = ", want));
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    uint16_t b;
    std::memcpy(&b, outputs.data() + 2 * i, 2);
    rows[i] = Bf16ToFloat(b);
  }
  return absl::OkStatus();
}

absl::Status AccumulateOutputRows(std::string_view outputs, std::span<const int32_t> row_index,
                                  int64_t hidden_size, std::span<float> out) {
  const uint64_t want = OutputBytes(row_index.size(), hidden_size);
  if (outputs.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("outputs hold ", outputs.size(),
                                                   " bytes; expected ", want, " for ",
                                                   row_index.size(), " rows"));
  }
  const int64_t out_rows = static_cast<int64_t>(out.size()) / hidden_size;
  for (size_t i = 0; i < row_index.size(); ++i) {
    const int64_t r = row_index[i];
    if (r < 0 || r >= out_rows) {
      return absl::InvalidArgumentError(absl::StrCat("row index ", r, " out of range"));
    }
    float* dst = out.data() + r * hidden_size;
    const char* src = outputs.data() + 2 * i * hidden_size;
    for (int64_t c = 0; c < hidden_size; ++c) {
      uint16_t b;
      std::memcpy(&b, src + 2 * c, 2);
      dst[c] += Bf16ToFloat(b);
    }
  }
  return absl::OkStatus();
}

absl::Status ScatterPairOutputs(std::string_view outputs, std::span<const int32_t> pair_index,
                                int64_t hidden_size, std::span<uint16_t> pair_out) {
  const uint64_t want = OutputBytes(pair_index.size(), hidden_size);
  if (outputs.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("outputs hold ", outputs.size(),
                                                   " bytes; expected ", want, " for ",
                                                   pair_index.size(), " pairs"));
  }
  const int64_t n_pairs = static_cast<int64_t>(pair_out.size()) / hidden_size;
  for (size_t i = 0; i < pair_index.size(); ++i) {
    const int64_t p = pair_index[i];
    if (p < 0 || p >= n_pairs) {
      return absl::InvalidArgumentError(absl::StrCat("pair index ", p, " out of range"));
    }
    std::memcpy(pair_out.data() + p * hidden_size, outputs.data() + 2 * i * hidden_size,
                2 * hidden_size);
  }
  return absl::OkStatus();
}

}  // namespace expertmesh
