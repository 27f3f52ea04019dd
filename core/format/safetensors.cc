// safetensors reading (header validation, page-aligned mmap of single tensors), sharded
// checkpoints through model.safetensors.index.json, and writing.
//
// NOTES: everything read from a file is untrusted. Sizes are checked with overflow in mind
// before anything is allocated or mapped, and every error names the file and, where there is
// one, the tensor.
#include "core/format/safetensors.h"

#include "core/base/json.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <optional>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "boost/json.hpp"
#include "core/base/status.h"

namespace expertmesh {
namespace {

namespace json = boost::json;

// Headers larger than this are refused before any allocation (the reference implementation
// refuses above 100 MB; real DeepSeek-V3 shard headers are well under 1 MB).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

// Abseil here keeps its own string_view type; StrCat needs it.
absl::string_view A(std::string_view s) { return {s.data(), s.size()}; }

std::string Quoted(std::string_view s) { return absl::StrCat("'", A(s), "'"); }

absl::Status TensorError(std::string_view file, std::string_view tensor, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat(A(file), ": tensor ", Quoted(tensor), ": ", A(what)));
}

using json_field::AsUnsigned;  // a non-negative JSON integer, or nullopt

// a * b, or nullopt on overflow.
std::optional<uint64_t> CheckedMul(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

absl::StatusOr<TensorInfo> ParseTensorEntry(std::string_view name, const json::value& entry,
                                            uint64_t data_size, std::string_view file) {
  const json::object* obj = entry.if_object();
  if (obj == nullptr) return TensorError(file, name, "entry is not a JSON object");
  TensorInfo info;
  info.name = std::string(name);

  const json::value* dtype = obj->if_contains("dtype");
  if (dtype == nullptr || !dtype->is_string()) {
    return TensorError(file, name, "missing or non-string \"dtype\"");
  }
  const std::string_view dtype_name(dtype->get_string().data(), dtype->get_string().size());
  absl::StatusOr<DType> parsed = ParseDType(dtype_name);
  if (!parsed.ok()) return TensorError(file, name, std::string(parsed.status().message()));
  info.dtype = *parsed;

  const json::value* shape = obj->if_contains("shape");
  if (shape == nullptr || !shape->is_array()) {
    return TensorError(file, name, "missing or non-array \"shape\"");
  }
  uint64_t numel = 1;
  for (const json::value& dim : shape->get_array()) {
    std::optional<uint64_t> d = AsUnsigned(dim);
    if (!d || *d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return TensorError(file, name, "shape entries must be non-negative integers");
    }
    std::optional<uint64_t> n = CheckedMul(numel, *d);
    if (!n) return TensorError(file, name, "shape overflows 64 bits");
    numel = *n;
    info.shape.push_back(static_cast<int64_t>(*d));
  }

  const json::value* offsets = obj->if_contains("data_offsets");
  if (offsets == nullptr || !offsets->is_array() || offsets->get_array().size() != 2) {
    return TensorError(file, name, "\"data_offsets\" must be an array of two integers");
  }
  std::optional<uint64_t> begin = AsUnsigned(offsets->get_array()[0]);
  std::optional<uint64_t> end = AsUnsigned(offsets->get_array()[1]);
  if (!begin || !end) {
    return TensorError(file, name, "\"data_offsets\" must be non-negative integers");
  }
  if (*begin > *end) {
    return TensorError(file, name,
                       absl::StrFormat("data_offsets [%d, %d] run backwards", *begin, *end));
  }
  if (*end > data_size) {
    return TensorError(file, name,
                       absl::StrFormat("data_offsets [%d, %d] exceed the data section (%d bytes)",
                                       *begin, *end, data_size));
  }
  std::optional<uint64_t> bytes = CheckedMul(numel, DTypeSize(info.dtype));
  if (!bytes || *bytes != *end - *begin) {
    return TensorError(
        file, name,
        absl::StrFormat("shape [%s] x %s needs %s bytes but data_offsets [%d, %d] hold %d",
                        absl::StrJoin(info.shape, ", "), A(DTypeName(info.dtype)),
                        bytes ? absl::StrCat(*bytes) : std::string("more than 2^64"), *begin, *end,
                        *end - *begin));
  }
  info.begin = *begin;
  info.end = *end;
  return info;
}

absl::Status ValidateMetadata(const json::value& metadata, std::string_view file) {
  const json::object* obj = metadata.if_object();
  if (obj == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(A(file), ": __metadata__ is not a JSON object"));
  }
  for (const auto& [key, value] : *obj) {
    if (!value.is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(
          A(file), ": __metadata__ value of ", Quoted(std::string_view(key)), " is not a string"));
    }
  }
  return absl::OkStatus();
}

std::string ErrnoText() { return std::strerror(errno); }

// Reads exactly `size` bytes at `offset`, or fails.
absl::Status ReadAt(int fd, void* buf, uint64_t size, uint64_t offset, std::string_view path) {
  uint8_t* p = static_cast<uint8_t*>(buf);
  while (size > 0) {
    const ssize_t n = ::pread(fd, p, size, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return absl::DataLossError(
          absl::StrCat(A(path), ": read failed at byte ", offset, ": ",
                       n == 0 ? std::string("unexpected end of file") : ErrnoText()));
    }
    p += n;
    size -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return absl::OkStatus();
}

uint64_t PageSize() {
  static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return page;
}

}  // namespace

absl::StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "F32") return DType::kF32;
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  if (name == "F8_E4M3") return DType::kF8E4M3;
  if (name == "I32") return DType::kI32;
  if (name == "I64") return DType::kI64;
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", Quoted(name)));
}

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kF8E4M3:
      return "F8_E4M3";
    case DType::kI32:
      return "I32";
    case DType::kI64:
      return "I64";
  }
  return "?";
}

int64_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kF8E4M3:
      return 1;
    case DType::kI64:
      return 8;
  }
  return 0;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(std::string_view json_text,
                                                               uint64_t data_size,
                                                               std::string_view file) {
  std::error_code ec;
  json::value root = json::parse(json::string_view(json_text.data(), json_text.size()), ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat(A(file), ": header is not valid JSON: ", ec.message()));
  }
  const json::object* obj = root.if_object();
  if (obj == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(A(file), ": header is not a JSON object"));
  }
  std::vector<TensorInfo> tensors;
  tensors.reserve(obj->size());
  // A key repeated in the JSON text keeps its last value (Boost.JSON, like Python's json).
  for (const auto& [key, value] : *obj) {
    const std::string_view name(key.data(), key.size());
    if (name == "__metadata__") {
      EM_RETURN_IF_ERROR(ValidateMetadata(value, file));
      continue;
    }
    EM_ASSIGN_OR_RETURN(TensorInfo info, ParseTensorEntry(name, value, data_size, file));
    tensors.push_back(std::move(info));
  }
  // Overlap check on the byte ranges, in offset order (empty tensors overlap nothing).
  std::vector<const TensorInfo*> by_offset;
  for (const TensorInfo& t : tensors) {
    if (t.end > t.begin) by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo& prev = *by_offset[i - 1];
    const TensorInfo& cur = *by_offset[i];
    if (cur.begin < prev.end) {
      return TensorError(file, cur.name,
                         absl::StrFormat("data_offsets [%d, %d] overlap tensor '%s' [%d, %d]",
                                         cur.begin, cur.end, prev.name, prev.begin, prev.end));
    }
  }
  return tensors;
}

// ---- SafetensorsFile ---------------------------------------------------------------------------

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (file->fd_ < 0) {
    const int err = errno;
    const std::string message = absl::StrCat(A(path), ": ", std::strerror(err));
    if (err == ENOENT || err == ENOTDIR) return absl::NotFoundError(message);
    if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(message);
    return absl::UnavailableError(message);
  }
  struct stat st;
  if (::fstat(file->fd_, &st) != 0) {
    return absl::InternalError(absl::StrCat(A(path), ": fstat: ", ErrnoText()));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(A(path), ": not a regular file"));
  }
  file->file_size_ = static_cast<uint64_t>(st.st_size);
  if (file->file_size_ < 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": truncated: ", file->file_size_, " bytes, shorter than the 8-byte header length"));
  }
  uint8_t len_bytes[8];
  EM_RETURN_IF_ERROR(ReadAt(file->fd_, len_bytes, 8, 0, path));
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];  // little-endian
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        A(path), ": header length ", header_len, " exceeds the ", kMaxHeaderBytes, "-byte limit"));
  }
  if (header_len > file->file_size_ - 8) {
    return absl::InvalidArgumentError(absl::StrCat(A(path), ": header length ", header_len,
                                                   " runs past the end of the file (",
                                                   file->file_size_, " bytes)"));
  }
  std::string header(header_len, '\0');
  EM_RETURN_IF_ERROR(ReadAt(file->fd_, header.data(), header_len, 8, path));
  file->data_start_ = 8 + header_len;
  EM_ASSIGN_OR_RETURN(file->tensors_,
                      ParseSafetensorsHeader(header, file->file_size_ - file->data_start_, path));
  for (size_t i = 0; i < file->tensors_.size(); ++i) file->by_name_[file->tensors_[i].name] = i;
  return file;
}

const TensorInfo* SafetensorsFile::Find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<TensorView> SafetensorsFile::Map(const TensorInfo& info) const {
  if (info.begin > info.end || info.end > file_size_ - data_start_) {
    return TensorError(path_, info.name, "byte range lies outside this file");
  }
  TensorView view;
  view.info = &info;
  view.size = info.end - info.begin;
  if (view.size == 0) return view;  // nothing to map
  const uint64_t offset = data_start_ + info.begin;
  const uint64_t aligned = offset & ~(PageSize() - 1);
  const uint64_t length = offset + view.size - aligned;
  void* base = ::mmap(nullptr, length, PROT_READ, MAP_PRIVATE, fd_, static_cast<off_t>(aligned));
  if (base == MAP_FAILED) {
    return absl::ResourceExhaustedError(absl::StrCat(path_, ": tensor ", Quoted(info.name),
                                                     ": mmap of ", length,
                                                     " bytes failed: ", ErrnoText()));
  }
  bytes_mapped_.fetch_add(length, std::memory_order_relaxed);
  view.owner = std::shared_ptr<const void>(
      base, [length](const void* p) { ::munmap(const_cast<void*>(p), length); });
  view.data = static_cast<const uint8_t*>(base) + (offset - aligned);
  return view;
}

// ---- Checkpoint --------------------------------------------------------------------------------

namespace {

constexpr char kIndexFile[] = "model.safetensors.index.json";
constexpr char kSingleFile[] = "model.safetensors";

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(A(path), ": ", ErrnoText()));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(A(path), ": not a readable regular file"));
  }
  std::string text(static_cast<size_t>(st.st_size), '\0');
  absl::Status s = ReadAt(fd, text.data(), text.size(), 0, path);
  ::close(fd);
  if (!s.ok()) return s;
  return text;
}

// Shard file names in an index must stay inside the checkpoint directory.
bool IsPlainFileName(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->dir_ = dir;
  const std::string index_path = (std::filesystem::path(dir) / kIndexFile).string();
  std::error_code fs_ec;
  if (!std::filesystem::exists(index_path, fs_ec)) {
    const std::string single = (std::filesystem::path(dir) / kSingleFile).string();
    if (!std::filesystem::exists(single, fs_ec)) {
      return absl::NotFoundError(
          absl::StrCat(dir, ": neither ", kIndexFile, " nor ", kSingleFile, " exists"));
    }
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(single);
    if (!file.ok()) return file.status();
    for (size_t t = 0; t < (*file)->tensors().size(); ++t) {
      ckpt->index_[(*file)->tensors()[t].name] = {0, t};
    }
    ckpt->files_.push_back(*std::move(file));
    return ckpt;
  }

  EM_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(index_path));
  std::error_code ec;
  json::value root = json::parse(json::string_view(text.data(), text.size()), ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": not valid JSON: ", ec.message()));
  }
  const json::value* weight_map =
      root.is_object() ? root.get_object().if_contains("weight_map") : nullptr;
  if (weight_map == nullptr || !weight_map->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": missing \"weight_map\" object"));
  }
  std::map<std::string, size_t, std::less<>> file_ids;  // shard name -> files_ index
  for (const auto& [key, value] : weight_map->get_object()) {
    const std::string_view tensor(key.data(), key.size());
    if (!value.is_string() || !IsPlainFileName(value.get_string())) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": tensor ", Quoted(tensor),
                                                     ": file name must be a plain file name"));
    }
    const std::string_view shard(value.get_string().data(), value.get_string().size());
    auto it = file_ids.find(shard);
    if (it == file_ids.end()) {
      const std::string shard_path = (std::filesystem::path(dir) / std::string(shard)).string();
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(shard_path);
      if (!file.ok()) {
        return absl::Status(
            file.status().code(),
            absl::StrCat(index_path, ": tensor ", Quoted(tensor), " is in ", Quoted(shard),
                         ", which cannot be opened: ", file.status().message()));
      }
      it = file_ids.emplace(std::string(shard), ckpt->files_.size()).first;
      ckpt->files_.push_back(*std::move(file));
    }
    const SafetensorsFile& file = *ckpt->files_[it->second];
    const TensorInfo* info = file.Find(tensor);
    if (info == nullptr) {
      return absl::NotFoundError(
          absl::StrCat(index_path, ": tensor ", Quoted(tensor), " is not in ", file.path()));
    }
    ckpt->index_[std::string(tensor)] = {it->second,
                                         static_cast<size_t>(info - file.tensors().data())};
  }
  return ckpt;
}

bool Checkpoint::Has(std::string_view name) const { return index_.find(name) != index_.end(); }

const TensorInfo* Checkpoint::Info(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) return nullptr;
  return &files_[it->second.first]->tensors()[it->second.second];
}

absl::StatusOr<TensorView> Checkpoint::Get(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(
        absl::StrCat(dir_, ": tensor ", Quoted(name), " is not in this checkpoint"));
  }
  const SafetensorsFile& file = *files_[it->second.first];
  return file.Map(file.tensors()[it->second.second]);
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [name, loc] : index_) names.push_back(name);
  return names;
}

uint64_t Checkpoint::bytes_mapped() const {
  uint64_t total = 0;
  for (const auto& file : files_) total += file->bytes_mapped();
  return total;
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t total = 0;
  for (const auto& [name, loc] : index_) {
    const TensorInfo& t = files_[loc.first]->tensors()[loc.second];
    total += t.end - t.begin;
  }
  return total;
}

// ---- Writer ------------------------------------------------------------------------------------

namespace {

absl::Status WriteFileAtomically(const std::string& path, std::string_view head,
                                 const std::vector<const std::vector<uint8_t>*>& chunks) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::PermissionDeniedError(absl::StrCat(tmp, ": ", ErrnoText()));
  auto write_all = [fd](const void* data, size_t size) {
    const uint8_t* p = static_cast<const uint8_t*>(data);
    while (size > 0) {
      const ssize_t n = ::write(fd, p, size);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      p += n;
      size -= static_cast<size_t>(n);
    }
    return true;
  };
  bool ok = write_all(head.data(), head.size());
  for (const std::vector<uint8_t>* chunk : chunks) {
    if (ok) ok = write_all(chunk->data(), chunk->size());
  }
  if (::close(fd) != 0) ok = false;
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = ErrnoText();
    ::unlink(tmp.c_str());
    return absl::InternalError(absl::StrCat(A(path), ": write failed: ", why));
  }
  return absl::OkStatus();
}

absl::Status ValidateToWrite(const std::string& path,
                             const std::vector<const TensorToWrite*>& tensors) {
  std::set<std::string_view> names;
  for (const TensorToWrite* t : tensors) {
    if (t->name == "__metadata__" || !names.insert(t->name).second) {
      return TensorError(path, t->name, "name is reserved or appears twice");
    }
    uint64_t numel = 1;
    for (int64_t d : t->shape) {
      std::optional<uint64_t> n = d < 0 ? std::nullopt : CheckedMul(numel, d);
      if (!n) return TensorError(path, t->name, "invalid shape");
      numel = *n;
    }
    std::optional<uint64_t> bytes = CheckedMul(numel, DTypeSize(t->dtype));
    if (!bytes || *bytes != t->data.size()) {
      return TensorError(
          path, t->name,
          absl::StrFormat("data has %d bytes, shape [%s] x %s needs %s", t->data.size(),
                          absl::StrJoin(t->shape, ", "), A(DTypeName(t->dtype)),
                          bytes ? absl::StrCat(*bytes) : "more than 2^64"));
    }
  }
  return absl::OkStatus();
}

// Writes one file holding `tensors` in the given order (validated by the caller).
absl::Status WriteTensorFile(const std::string& path,
                             const std::vector<const TensorToWrite*>& tensors,
                             const std::map<std::string, std::string>& metadata) {
  json::object header;
  if (!metadata.empty()) {
    json::object meta;
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  uint64_t offset = 0;
  std::vector<const std::vector<uint8_t>*> chunks;
  for (const TensorToWrite* t : tensors) {
    json::array shape;
    for (int64_t d : t->shape) shape.push_back(d);
    header[t->name] = json::object{{"dtype", std::string(DTypeName(t->dtype))},
                                   {"shape", std::move(shape)},
                                   {"data_offsets", json::array{offset, offset + t->data.size()}}};
    offset += t->data.size();
    chunks.push_back(&t->data);
  }
  std::string text = json::serialize(header);
  text.resize((text.size() + 7) / 8 * 8, ' ');  // data section starts 8-byte aligned
  std::string head(8, '\0');
  for (int i = 0; i < 8; ++i) head[i] = static_cast<char>((text.size() >> (8 * i)) & 0xFF);
  head += text;
  return WriteFileAtomically(path, head, chunks);
}

std::vector<const TensorToWrite*> Pointers(const std::vector<TensorToWrite>& tensors) {
  std::vector<const TensorToWrite*> out;
  out.reserve(tensors.size());
  for (const TensorToWrite& t : tensors) out.push_back(&t);
  return out;
}

}  // namespace

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  const std::vector<const TensorToWrite*> all = Pointers(tensors);
  EM_RETURN_IF_ERROR(ValidateToWrite(path, all));
  return WriteTensorFile(path, all, metadata);
}

absl::Status WriteShardedCheckpoint(const std::string& dir,
                                    const std::vector<TensorToWrite>& tensors, int min_shards) {
  const size_t n_shards = static_cast<size_t>(std::max(1, min_shards));
  if (tensors.size() < n_shards) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": cannot split ", tensors.size(),
                                                   " tensors into ", n_shards, " shards"));
  }
  const std::vector<const TensorToWrite*> all = Pointers(tensors);
  EM_RETURN_IF_ERROR(ValidateToWrite(dir, all));
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": ", ec.message()));
  uint64_t total = 0;
  for (const TensorToWrite& t : tensors) total += t.data.size();
  const uint64_t target = (total + n_shards - 1) / n_shards;

  // Greedy split by size into exactly n_shards non-empty shards, keeping tensor order: a
  // shard closes once it holds `target` bytes, or when each remaining tensor must open one.
  std::vector<std::vector<const TensorToWrite*>> shards(1);
  uint64_t shard_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const size_t shards_left = n_shards - shards.size();
    const size_t tensors_left = tensors.size() - i;
    const bool full = shard_bytes >= target && shards_left > 0;
    const bool must_split = tensors_left == shards_left;
    if (!shards.back().empty() && (full || must_split)) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(&tensors[i]);
    shard_bytes += tensors[i].data.size();
  }
  json::object weight_map;
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string name =
        absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards.size());
    const std::string path = (std::filesystem::path(dir) / name).string();
    if (absl::Status st = WriteTensorFile(path, shards[s], {{"format", "pt"}}); !st.ok()) {
      return st;
    }
    for (const TensorToWrite* t : shards[s]) weight_map[t->name] = name;
  }
  json::object index{{"metadata", json::object{{"total_size", total}}},
                     {"weight_map", std::move(weight_map)}};
  const std::string text = json::serialize(index);
  const std::vector<uint8_t> bytes(text.begin(), text.end());
  return WriteFileAtomically((std::filesystem::path(dir) / kIndexFile).string(), "", {&bytes});
}

}  // namespace expertmesh
