// safetensors reader/writer and sharded checkpoints: files written by Python's safetensors
// library (tests/golden/safetensors, from tools/golden/make_safetensors_golden.py) read back
// byte for byte; C++ writer round trips; Checkpoint::Get maps only the tensor asked for;
// every malformed input is an error naming the file and the tensor.
#include "core/format/safetensors.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/core/golden_json.h"

namespace expertmesh {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testing::ReadGoldenJson;

const std::string kGoldenDir = std::string(EXPERTMESH_SOURCE_DIR) + "/tests/golden/safetensors";

std::string Hex(const uint8_t* data, uint64_t size) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (uint64_t i = 0; i < size; ++i) {
    out += digits[data[i] >> 4];
    out += digits[data[i] & 15];
  }
  return out;
}

// A fresh directory per test.
std::string TestDir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir = fs::path(::testing::TempDir()) / "expertmesh_safetensors_test" /
                       absl::StrCat(info->test_suite_name(), ".", info->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

// Writes a safetensors file from raw parts: 8-byte length, header text, data bytes.
void WriteRaw(const std::string& path, const std::string& header, const std::string& data,
              int64_t length_override = -1) {
  std::ofstream out(path, std::ios::binary);
  const uint64_t len = length_override >= 0 ? length_override : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((len >> (8 * i)) & 0xFF));
  out << header << data;
}

void ExpectGoldenTensor(const TensorView& view, const boost::json::value& want,
                        const std::string& name) {
  ASSERT_NE(view.info, nullptr) << name;
  EXPECT_EQ(DTypeName(view.info->dtype), std::string_view(want.at("dtype").as_string()));
  std::vector<int64_t> shape;
  for (const auto& d : want.at("shape").as_array()) shape.push_back(d.to_number<int64_t>());
  EXPECT_EQ(view.info->shape, shape) << name;
  EXPECT_EQ(Hex(view.data, view.size), std::string_view(want.at("hex").as_string())) << name;
}

TEST(SafetensorsFile, ReadsFileWrittenByPythonExactly) {
  const boost::json::value expected = ReadGoldenJson("tests/golden/safetensors/expected.json");
  auto file = SafetensorsFile::Open(kGoldenDir + "/tiny.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  const auto& want = expected.at("tensors").as_object();
  EXPECT_EQ((*file)->tensors().size(), want.size());
  for (const auto& [key, value] : want) {
    const std::string name(key);
    const TensorInfo* info = (*file)->Find(name);
    ASSERT_NE(info, nullptr) << name;
    auto view = (*file)->Map(*info);
    ASSERT_TRUE(view.ok()) << view.status();
    ExpectGoldenTensor(*view, value, name);
  }
  const TensorInfo* scalar = (*file)->Find("model.layers.0.mlp.gate.e_score_correction_bias");
  ASSERT_NE(scalar, nullptr);
  EXPECT_TRUE(scalar->shape.empty());
  EXPECT_EQ(scalar->numel(), 1);
  auto view = (*file)->Map(*scalar);
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(*view->as<float>(), 1.5f);
  EXPECT_EQ((*file)->Find("no.such.tensor"), nullptr);
}

TEST(Checkpoint, ReadsShardedCheckpointWrittenByPython) {
  const boost::json::value expected = ReadGoldenJson("tests/golden/safetensors/expected.json");
  auto ckpt = Checkpoint::Open(kGoldenDir + "/sharded");
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const auto& want = expected.at("tensors").as_object();
  EXPECT_EQ((*ckpt)->TensorNames().size(), want.size());
  uint64_t total = 0;
  for (const auto& [key, value] : want) {
    const std::string name(key);
    ASSERT_TRUE((*ckpt)->Has(name)) << name;
    auto view = (*ckpt)->Get(name);
    ASSERT_TRUE(view.ok()) << view.status();
    ExpectGoldenTensor(*view, value, name);
    total += view->size;
  }
  EXPECT_EQ((*ckpt)->total_bytes(), total);
  auto missing = (*ckpt)->Get("model.layers.9.mlp.down_proj.weight");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr("model.layers.9.mlp.down_proj.weight"));
}

TEST(Checkpoint, OpensSingleFileCheckpoint) {
  const std::string dir = TestDir();
  fs::copy_file(kGoldenDir + "/tiny.safetensors", dir + "/model.safetensors");
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_TRUE((*ckpt)->Has("token_ids"));
  auto view = (*ckpt)->Get("token_ids");
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->as<int32_t>()[2], 2147483647);
}

std::vector<TensorToWrite> RandomTensors(int n, int64_t elements, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<TensorToWrite> tensors;
  const DType dtypes[] = {DType::kF32, DType::kBF16, DType::kF8E4M3,
                          DType::kI64, DType::kF16,  DType::kI32};
  for (int i = 0; i < n; ++i) {
    TensorToWrite t;
    t.name = absl::StrCat("model.layers.", i, ".weight");
    t.dtype = dtypes[i % 6];
    t.shape = {elements / 4, 4};
    t.data.resize(elements * DTypeSize(t.dtype));
    for (uint8_t& b : t.data) b = static_cast<uint8_t>(rng());
    tensors.push_back(std::move(t));
  }
  return tensors;
}

TEST(WriteSafetensors, RoundTripsWithMetadata) {
  const std::string path = TestDir() + "/out.safetensors";
  const std::vector<TensorToWrite> tensors = RandomTensors(7, 36, 1);
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ((*file)->tensors().size(), tensors.size());
  for (const TensorToWrite& t : tensors) {
    const TensorInfo* info = (*file)->Find(t.name);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->dtype, t.dtype);
    EXPECT_EQ(info->shape, t.shape);
    auto view = (*file)->Map(*info);
    ASSERT_TRUE(view.ok());
    ASSERT_EQ(view->size, t.data.size());
    EXPECT_EQ(std::memcmp(view->data, t.data.data(), t.data.size()), 0) << t.name;
  }
  // The data section starts 8-byte aligned, as the format recommends.
  absl::StatusOr<std::string> bytes = base::ReadFile(path);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  ASSERT_GE(bytes->size(), 8u);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes->data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
}

TEST(WriteSafetensors, RejectsWrongDataSize) {
  std::vector<TensorToWrite> tensors = RandomTensors(1, 8, 2);
  tensors[0].data.pop_back();
  const absl::Status s = WriteSafetensors(TestDir() + "/bad.safetensors", tensors);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(tensors[0].name));
}

TEST(WriteShardedCheckpoint, RoundTripsThroughIndex) {
  const std::string dir = TestDir();
  const std::vector<TensorToWrite> tensors = RandomTensors(10, 64, 3);
  ASSERT_TRUE(WriteShardedCheckpoint(dir, tensors, 3).ok());
  int shard_files = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    shard_files += entry.path().extension() == ".safetensors";
  }
  EXPECT_EQ(shard_files, 3);
  EXPECT_TRUE(fs::exists(dir + "/model-00001-of-00003.safetensors"));
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  for (const TensorToWrite& t : tensors) {
    auto view = (*ckpt)->Get(t.name);
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ(view->info->dtype, t.dtype);
    ASSERT_EQ(view->size, t.data.size());
    EXPECT_EQ(std::memcmp(view->data, t.data.data(), t.data.size()), 0) << t.name;
  }
}

// An expert shard maps only its own experts: Get() maps the pages of one tensor, so mapping a
// subset reports about the subset's bytes (plus at most one page either side per tensor).
TEST(Checkpoint, MapsOnlyTheTensorsAskedFor) {
  const std::string dir = TestDir();
  const int n = 64;
  const int64_t elements = 16 * 1024;  // 16 Ki elements: 16 KiB (F8) to 128 KiB (I64)
  const std::vector<TensorToWrite> tensors = RandomTensors(n, elements, 4);
  ASSERT_TRUE(WriteShardedCheckpoint(dir, tensors, 2).ok());
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->bytes_mapped(), 0u) << "Open reads headers only";
  uint64_t total = 0;
  for (const TensorToWrite& t : tensors) total += t.data.size();
  EXPECT_EQ((*ckpt)->total_bytes(), total);

  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  uint64_t subset = 0;
  std::vector<TensorView> views;
  for (int i : {5, 17, 40}) {
    auto view = (*ckpt)->Get(tensors[i].name);
    ASSERT_TRUE(view.ok());
    EXPECT_EQ(std::memcmp(view->data, tensors[i].data.data(), view->size), 0);
    subset += view->size;
    views.push_back(*std::move(view));
  }
  EXPECT_GE((*ckpt)->bytes_mapped(), subset);
  EXPECT_LE((*ckpt)->bytes_mapped(), subset + 3 * 2 * page);
  EXPECT_LT((*ckpt)->bytes_mapped(), total / 10);
  std::cout << "mapped " << (*ckpt)->bytes_mapped() << " bytes for 3 tensors of " << subset
            << " bytes; checkpoint holds " << total << " bytes\n";
}

// ---- Malformed input: an error naming the file (and the tensor when there is one) ----------

struct BadHeaderCase {
  const char* what;
  std::string header;
  std::string data;
  const char* tensor;  // expected in the message, or nullptr
};

TEST(SafetensorsFile, MalformedHeadersAreErrorsNamingFileAndTensor) {
  const std::string dir = TestDir();
  const std::string four_floats(16, '\0');
  const std::vector<BadHeaderCase> cases = {
      {"bad JSON", R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]})", four_floats,
       nullptr},
      {"not an object", R"([1, 2, 3])", four_floats, nullptr},
      {"offsets past the end", R"({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}})",
       four_floats, "w"},
      {"overlap",
       R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
       R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
       four_floats, "b"},
      {"shape x dtype != bytes",
       R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}})", four_floats, "w"},
      {"unknown dtype", R"({"w": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}})",
       four_floats, "w"},
      {"negative dim", R"({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}})",
       four_floats, "w"},
      {"fractional dim", R"({"w": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}})",
       four_floats, "w"},
      {"shape overflow",
       R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 16]}})",
       four_floats, "w"},
      {"offsets backwards", R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}})",
       four_floats, "w"},
      {"three offsets", R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}})",
       four_floats, "w"},
      {"missing shape", R"({"w": {"dtype": "F32", "data_offsets": [0, 16]}})", four_floats, "w"},
      {"dtype not a string", R"({"w": {"dtype": 7, "shape": [4], "data_offsets": [0, 16]}})",
       four_floats, "w"},
      {"entry not an object", R"({"w": [1, 2]})", four_floats, "w"},
      {"metadata value not a string", R"({"__metadata__": {"a": 1}})", "", nullptr},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string path = absl::StrCat(dir, "/case", i, ".safetensors");
    WriteRaw(path, cases[i].header, cases[i].data);
    auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok()) << cases[i].what;
    const std::string message(file.status().message());
    EXPECT_THAT(message, HasSubstr(path)) << cases[i].what;
    if (cases[i].tensor != nullptr) {
      EXPECT_THAT(message, HasSubstr(absl::StrCat("'", cases[i].tensor, "'"))) << cases[i].what;
    }
  }
}

TEST(SafetensorsFile, TruncatedAndOversizedLengthsAreErrors) {
  const std::string dir = TestDir();
  {
    const std::string path = dir + "/short.safetensors";
    std::ofstream(path, std::ios::binary) << "abc";
    auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok());
    EXPECT_THAT(std::string(file.status().message()), HasSubstr(path));
  }
  {
    const std::string path = dir + "/length.safetensors";
    WriteRaw(path, "{}", "", /*length_override=*/1000);
    auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok());
    EXPECT_THAT(std::string(file.status().message()), HasSubstr("past the end"));
  }
  {
    const std::string path = dir + "/huge.safetensors";
    WriteRaw(path, "{}", "", /*length_override=*/int64_t{1} << 62);
    EXPECT_FALSE(SafetensorsFile::Open(path).ok());
  }
  {
    // A valid file cut short inside its data section.
    const std::string full = kGoldenDir + "/tiny.safetensors";
    const std::string path = dir + "/cut.safetensors";
    absl::StatusOr<std::string> bytes = base::ReadFile(full);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    ASSERT_GT(bytes->size(), 10u);
    std::ofstream(path, std::ios::binary) << bytes->substr(0, bytes->size() - 10);
    auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok());
    EXPECT_THAT(std::string(file.status().message()), HasSubstr(path));
  }
  EXPECT_EQ(SafetensorsFile::Open(dir + "/absent.safetensors").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(Checkpoint, BrokenIndexesAreErrorsNamingFileAndTensor) {
  const std::string dir = TestDir();
  const std::vector<TensorToWrite> tensors = RandomTensors(4, 8, 5);
  ASSERT_TRUE(WriteShardedCheckpoint(dir, tensors, 2).ok());
  const std::string index = dir + "/model.safetensors.index.json";
  auto write_index = [&](const std::string& text) { std::ofstream(index) << text; };

  // A tensor the index names is not in the shard it points to.
  write_index(R"({"weight_map": {"model.layers.0.weight": "model-00002-of-00002.safetensors"}})");
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_FALSE(ckpt.ok());
  EXPECT_THAT(std::string(ckpt.status().message()), HasSubstr("'model.layers.0.weight'"));
  EXPECT_THAT(std::string(ckpt.status().message()), HasSubstr("model-00002-of-00002.safetensors"));

  // The index points to a missing file.
  write_index(R"({"weight_map": {"model.layers.0.weight": "model-00009-of-00009.safetensors"}})");
  ckpt = Checkpoint::Open(dir);
  ASSERT_FALSE(ckpt.ok());
  EXPECT_THAT(std::string(ckpt.status().message()), HasSubstr("model-00009-of-00009.safetensors"));
  EXPECT_THAT(std::string(ckpt.status().message()), HasSubstr("'model.layers.0.weight'"));

  // A shard outside the directory.
  write_index(R"({"weight_map": {"model.layers.0.weight": "../model.safetensors"}})");
  EXPECT_FALSE(Checkpoint::Open(dir).ok());

  // Not JSON, no weight_map.
  write_index("{");
  EXPECT_THAT(std::string(Checkpoint::Open(dir).status().message()), HasSubstr(index));
  write_index(R"({"metadata": {}})");
  EXPECT_THAT(std::string(Checkpoint::Open(dir).status().message()), HasSubstr("weight_map"));

  // A directory with no checkpoint at all.
  EXPECT_EQ(Checkpoint::Open(dir + "/nothing").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace expertmesh
