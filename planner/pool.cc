#include "planner/pool.h"

#include <boost/json.hpp>
#include <cmath>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/base/file.h"
#include "core/base/json.h"
#include "core/base/status.h"

namespace expertmesh::planner {
namespace {

namespace jf = json_field;

// Fixed per-GPU memory: the CUDA context with cuBLASLt loaded (~0.4 GiB on these cards), a
// 256 MiB matmul workspace and the activation / staging buffers of a 256-row batch. An
// assumption, not a measurement (no GPU here): planner/README.md.
constexpr double kGpuOverheadGib = 1.0;
// A CPU shard process beside its mapped experts: code, gRPC, the packed-kernel scratch.
constexpr double kCpuOverheadGib = 0.25;
// Fraction of peak bandwidth the expert kernel streams at M = 1. GPUs: assumed (not measured
// here); a card without FP8 tensor cores (sm_86) widens every FP8 weight to FP16 in registers
// with integer ops (no e4m3 convert instruction before sm_89), which costs issue slots per
// byte: assumed lower. CPU: expertmesh-bench-kernels on the development machine (README).
constexpr double kFp8GpuEfficiency = 0.75;
constexpr double kWideningGpuEfficiency = 0.55;
constexpr double kCpuEfficiency = 0.4;
// The CPU FP8 kernel's rows per widening of a tile on 16-lane (AVX-512) targets.
constexpr int kCpuRowsPerPass = 6;

// Datasheet figures. memory: GiB on the board; bandwidth: bus width x data rate
// (3090: 384 bit x 19.5 Gbit/s = 936 GB/s; 3090 Ti and 4090: 384 x 21 = 1008 GB/s;
// 5090: 512 x 28 = 1792 GB/s); gflops: dense FP16 tensor-core TFLOP/s with FP32 accumulate from
// NVIDIA's Ampere GA102, Ada AD102 and Blackwell GB202 whitepapers (3090: 35.6, 3090 Ti: 40,
// 4090: 165.2, 5090: 209.5), taken as the rate each further row of a batch adds (at decode
// sizes rows are nearly free on a GPU: the weight stream dominates). fp8: FP8 tensor cores
// exist from sm_89 (Ada) on; sm_86 (Ampere) has none.
std::vector<CardKind> Table() {
  auto gpu = [](const char* name, double mem, double bw, bool fp8, double tflops) {
    return CardKind{name,
                    true,
                    mem,
                    bw,
                    fp8,
                    tflops * 1000,
                    fp8 ? kFp8GpuEfficiency : kWideningGpuEfficiency,
                    kGpuOverheadGib};
  };
  return {
      gpu("rtx3090", 24, 936, false, 35.6),
      gpu("rtx3090ti", 24, 1008, false, 40),
      gpu("rtx4090", 24, 1008, true, 165.2),
      gpu("rtx5090", 32, 1792, true, 209.5),
      // memory_gib, bandwidth_gbs (and gflops) depend on the host: given in the pool file.
      CardKind{"cpu", false, 0, 0, false, 0, kCpuEfficiency, kCpuOverheadGib, kCpuRowsPerPass},
  };
}

absl::Status ReadPositive(const boost::json::object& o, const char* key, const std::string& where,
                          double* out) {
  const boost::json::value* v = jf::Find(o, key);
  if (v == nullptr) return absl::OkStatus();
  std::optional<double> d = jf::AsNumber(*v);
  if (!d || !(*d >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ".", key, " must be a non-negative number"));
  }
  *out = *d;
  return absl::OkStatus();
}

// Applies the overrides of `o` to `kind`.
absl::Status ApplyOverrides(const boost::json::object& o, const std::string& where,
                            CardKind* kind) {
  EM_RETURN_IF_ERROR(ReadPositive(o, "memory_gib", where, &kind->memory_gib));
  EM_RETURN_IF_ERROR(ReadPositive(o, "bandwidth_gbs", where, &kind->bandwidth_gbs));
  EM_RETURN_IF_ERROR(ReadPositive(o, "gflops", where, &kind->gflops));
  EM_RETURN_IF_ERROR(ReadPositive(o, "efficiency", where, &kind->efficiency));
  EM_RETURN_IF_ERROR(ReadPositive(o, "overhead_gib", where, &kind->overhead_gib));
  if (const boost::json::value* v = jf::Find(o, "rows_per_pass")) {
    std::optional<double> d = jf::AsNumber(*v);
    if (!d || !(*d >= 0 && *d <= 4096) || *d != std::floor(*d)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ".rows_per_pass must be a whole number from 0 to 4096"));
    }
    kind->rows_per_pass = static_cast<int>(*d);
  }
  if (const boost::json::value* v = jf::Find(o, "fp8")) {
    std::optional<bool> b = jf::AsBool(*v);
    if (!b) return absl::InvalidArgumentError(absl::StrCat(where, ".fp8 must be true or false"));
    kind->fp8 = *b;
    // A GPU's default efficiency follows the flag unless the entry gives its own.
    if (kind->gpu && jf::Find(o, "efficiency") == nullptr) {
      kind->efficiency = kind->fp8 ? kFp8GpuEfficiency : kWideningGpuEfficiency;
    }
  }
  if (const boost::json::value* v = jf::Find(o, "gpu")) {
    std::optional<bool> b = jf::AsBool(*v);
    if (!b) return absl::InvalidArgumentError(absl::StrCat(where, ".gpu must be true or false"));
    kind->gpu = *b;
  }
  if (kind->efficiency > 1) {
    return absl::InvalidArgumentError(absl::StrCat(where, ".efficiency must be at most 1"));
  }
  return absl::OkStatus();
}

absl::Status CheckComplete(const CardKind& k, const std::string& where) {
  if (k.memory_gib <= 0 || k.bandwidth_gbs <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": kind '", k.name, "' needs memory_gib and bandwidth_gbs (> 0) in the pool file"));
  }
  if (k.efficiency <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": efficiency must be > 0"));
  }
  return absl::OkStatus();
}

// A kind by name: the pool's "kinds" first (which may start from a built-in one of the same
// name), then the table; then the entry's own overrides.
absl::StatusOr<CardKind> ResolveKind(const boost::json::object& entry, const std::string& where,
                                     const boost::json::object* custom) {
  const boost::json::value* kv = jf::Find(entry, "kind");
  std::optional<std::string> name = kv ? jf::AsString(*kv) : std::nullopt;
  if (!name) return absl::InvalidArgumentError(absl::StrCat(where, ".kind (a string) is missing"));
  CardKind kind;
  const boost::json::value* c = custom ? jf::Find(custom, *name) : nullptr;
  absl::StatusOr<CardKind> known = KnownKind(*name);
  if (known.ok()) {
    kind = *known;
  } else if (c == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(where, ".kind: ", known.status().message(),
                                                   " (or define it under \"kinds\")"));
  } else {
    kind.name = *name;
    kind.efficiency = kFp8GpuEfficiency;
    kind.overhead_gib = kGpuOverheadGib;
  }
  if (c != nullptr) {
    if (!c->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat("kinds.", *name, " must be an object"));
    }
    EM_RETURN_IF_ERROR(ApplyOverrides(c->get_object(), absl::StrCat("kinds.", *name), &kind));
  }
  EM_RETURN_IF_ERROR(ApplyOverrides(entry, where, &kind));
  EM_RETURN_IF_ERROR(CheckComplete(kind, where));
  return kind;
}

absl::StatusOr<int64_t> ReadCount(const boost::json::object& o, const char* key,
                                  const std::string& where, int64_t dflt, int64_t max) {
  const boost::json::value* v = jf::Find(o, key);
  if (v == nullptr) return dflt;
  std::optional<int64_t> n = jf::AsInt64(*v);
  if (!n || *n < 1 || *n > max) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ".", key, " must be an integer in [1, ", max, "]"));
  }
  return *n;
}

absl::Status ReadLink(const boost::json::object& o, const std::string& where, double* gbps,
                      double* latency_us) {
  EM_RETURN_IF_ERROR(ReadPositive(o, "link_gbps", where, gbps));
  EM_RETURN_IF_ERROR(ReadPositive(o, "latency_us", where, latency_us));
  if (*gbps <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(where, ".link_gbps (> 0) is missing"));
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<std::string> KnownKindNames() {
  std::vector<std::string> names;
  for (const CardKind& k : Table()) names.push_back(k.name);
  return names;
}

absl::StatusOr<CardKind> KnownKind(std::string_view name) {
  for (const CardKind& k : Table()) {
    if (k.name == name) return k;
  }
  return absl::NotFoundError(absl::StrCat("unknown card kind '", std::string(name),
                                          "'; known: ", absl::StrJoin(KnownKindNames(), ", ")));
}

absl::StatusOr<Pool> ParsePool(std::string_view json_text) {
  boost::system::error_code ec;
  boost::json::value root = boost::json::parse(json_text, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("pool: not JSON: ", ec.message()));
  if (!root.is_object()) return absl::InvalidArgumentError("pool: the top level must be an object");
  const boost::json::object& top = root.get_object();
  const boost::json::object* custom = nullptr;
  if (const boost::json::value* k = jf::Find(top, "kinds")) {
    if (!k->is_object()) return absl::InvalidArgumentError("pool.kinds must be an object");
    custom = &k->get_object();
  }
  Pool pool;
  const boost::json::value* nodes = jf::Find(top, "nodes");
  if (nodes == nullptr || !nodes->is_array() || nodes->get_array().empty()) {
    return absl::InvalidArgumentError("pool.nodes must be a non-empty array");
  }
  constexpr int64_t kMaxCards = 4096;
  for (size_t i = 0; i < nodes->get_array().size(); ++i) {
    const std::string where = absl::StrCat("pool.nodes[", i, "]");
    const boost::json::value& nv = nodes->get_array()[i];
    if (!nv.is_object()) return absl::InvalidArgumentError(where + " must be an object");
    const boost::json::object& no = nv.get_object();
    Node node;
    node.name = absl::StrCat("node", i);
    if (const boost::json::value* n = jf::Find(no, "name")) {
      std::optional<std::string> s = jf::AsString(*n);
      if (!s) return absl::InvalidArgumentError(where + ".name must be a string");
      node.name = *s;
    }
    EM_RETURN_IF_ERROR(ReadLink(no, where, &node.link_gbps, &node.latency_us));
    const boost::json::value* cards = jf::Find(no, "cards");
    if (cards == nullptr || !cards->is_array() || cards->get_array().empty()) {
      return absl::InvalidArgumentError(where + ".cards must be a non-empty array");
    }
    for (size_t j = 0; j < cards->get_array().size(); ++j) {
      const std::string cw = absl::StrCat(where, ".cards[", j, "]");
      const boost::json::value& cv = cards->get_array()[j];
      if (!cv.is_object()) return absl::InvalidArgumentError(cw + " must be an object");
      EM_ASSIGN_OR_RETURN(CardKind kind, ResolveKind(cv.get_object(), cw, custom));
      EM_ASSIGN_OR_RETURN(int64_t count, ReadCount(cv.get_object(), "count", cw, 1, kMaxCards));
      for (int64_t c = 0; c < count; ++c) {
        pool.cards.push_back(Card{kind, static_cast<int>(pool.nodes.size())});
      }
      if (pool.cards.size() > static_cast<size_t>(kMaxCards)) {
        return absl::InvalidArgumentError(absl::StrCat("pool: more than ", kMaxCards, " cards"));
      }
    }
    pool.nodes.push_back(node);
  }
  const boost::json::value* att = jf::Find(top, "attention");
  if (att == nullptr || !att->is_object()) {
    return absl::InvalidArgumentError(
        "pool.attention (an object: kind, count, link_gbps, latency_us) is missing");
  }
  {
    const boost::json::object& ao = att->get_object();
    EM_ASSIGN_OR_RETURN(pool.attention.kind, ResolveKind(ao, "pool.attention", custom));
    EM_ASSIGN_OR_RETURN(int64_t count, ReadCount(ao, "count", "pool.attention", 1, 1024));
    pool.attention.count = static_cast<int>(count);
    EM_RETURN_IF_ERROR(
        ReadLink(ao, "pool.attention", &pool.attention.link_gbps, &pool.attention.latency_us));
  }
  if (const boost::json::value* b = jf::Find(top, "batch")) {
    pool.batches.clear();
    if (!b->is_array() || b->get_array().empty()) {
      return absl::InvalidArgumentError("pool.batch must be a non-empty array of integers");
    }
    for (const boost::json::value& v : b->get_array()) {
      std::optional<int64_t> n = jf::AsInt64(v);
      if (!n || *n < 1 || *n > 65536) {
        return absl::InvalidArgumentError("pool.batch: each batch size must be in [1, 65536]");
      }
      pool.batches.push_back(static_cast<int>(*n));
    }
  }
  EM_ASSIGN_OR_RETURN(pool.context, ReadCount(top, "context", "pool", 1024, int64_t{1} << 24));
  EM_RETURN_IF_ERROR(ReadPositive(top, "dispatch_overhead_us", "pool", &pool.dispatch_overhead_us));
  EM_RETURN_IF_ERROR(ReadPositive(top, "dispatch_overhead_per_row_us", "pool",
                                  &pool.dispatch_overhead_per_row_us));
  EM_RETURN_IF_ERROR(ReadPositive(top, "step_overhead_us", "pool", &pool.step_overhead_us));
  EM_RETURN_IF_ERROR(
      ReadPositive(top, "step_overhead_per_row_us", "pool", &pool.step_overhead_per_row_us));
  EM_ASSIGN_OR_RETURN(int64_t micro, ReadCount(top, "micro_batches", "pool", 2, 8));
  pool.micro_batches = static_cast<int>(micro);
  EM_ASSIGN_OR_RETURN(pool.micro_batch_min_rows,
                      ReadCount(top, "micro_batch_min_rows", "pool", 4, int64_t{1} << 20));
  return pool;
}

absl::StatusOr<Pool> LoadPool(const std::string& path) {
  EM_ASSIGN_OR_RETURN(std::string text, base::ReadFile(path));
  absl::StatusOr<Pool> pool = ParsePool(text);
  if (!pool.ok()) {
    return absl::Status(pool.status().code(), absl::StrCat(path, ": ", pool.status().message()));
  }
  return pool;
}

}  // namespace expertmesh::planner
