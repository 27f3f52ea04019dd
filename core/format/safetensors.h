// safetensors files and sharded Hugging Face checkpoints.
// A file is: u64 little-endian header length N, N bytes of JSON header
// {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then data.
// Files are memory-mapped; a Checkpoint maps only the byte ranges of the tensors asked for,
// so an expert shard maps only its experts (bytes_mapped() makes that measurable).
// Every malformed input is an error naming the file and the tensor, never a crash.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace expertmesh {

enum class DType { kF32, kF16, kBF16, kF8E4M3, kI32, kI64 };

absl::StatusOr<DType> ParseDType(std::string_view name);  // "F32", "F8_E4M3", ...
std::string_view DTypeName(DType dtype);
int64_t DTypeSize(DType dtype);

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data section
  uint64_t end = 0;
  int64_t numel() const;
};

// Parses and validates a header (the JSON bytes only). data_size is the length of the data
// section; offsets must lie within it, must not overlap, and end-begin == numel * dtype size.
// `file` names the file in error messages. This is the fuzz target.
absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(std::string_view json,
                                                               uint64_t data_size,
                                                               std::string_view file);

// A read-only view of one tensor's bytes. Keeps its mapping alive.
struct TensorView {
  const TensorInfo* info = nullptr;
  std::shared_ptr<const void> owner;  // the mapping
  const uint8_t* data = nullptr;
  uint64_t size = 0;
  template <typename T>
  const T* as() const {
    return reinterpret_cast<const T*>(data);
  }
};

// One safetensors file. Open() reads and validates the header only.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();  // closes the file; TensorViews keep their own mappings alive
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(std::string_view name) const;
  // Maps exactly the pages holding this tensor (mmap, read-only). Thread-safe.
  absl::StatusOr<TensorView> Map(const TensorInfo& info) const;
  // Bytes mapped so far by Map() (whole pages), cumulative.
  uint64_t bytes_mapped() const { return bytes_mapped_.load(std::memory_order_relaxed); }

 private:
  SafetensorsFile() = default;
  int fd_ = -1;
  std::string path_;
  uint64_t data_start_ = 0;
  uint64_t file_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> by_name_;
  mutable std::atomic<uint64_t> bytes_mapped_{0};
};

// A checkpoint directory: model.safetensors.index.json (weight_map: tensor -> file) or a
// single model.safetensors.
class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);
  bool Has(std::string_view name) const;
  const TensorInfo* Info(std::string_view name) const;
  absl::StatusOr<TensorView> Get(std::string_view name) const;  // maps on demand
  std::vector<std::string> TensorNames() const;
  uint64_t bytes_mapped() const;  // total over files: what was actually mapped
  uint64_t total_bytes() const;   // the sum of all tensors' sizes
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<size_t, size_t>, std::less<>> index_;  // name -> (file, tensor)
};

// Writer. Tensors are written in the given order; data.size() must equal numel*dtype size.
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
};
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {});
// Writes shards model-0000i-of-0000n.safetensors (split by size, at least min_shards files)
// plus model.safetensors.index.json.
absl::Status WriteShardedCheckpoint(const std::string& dir,
                                    const std::vector<TensorToWrite>& tensors, int min_shards);

}  // namespace expertmesh
