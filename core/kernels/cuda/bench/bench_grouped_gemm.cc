// bench_grouped_gemm: the routed-expert grouped GEMM (gate/up + SwiGLU + down + combine) on
// the shapes of DeepSeek-V3 (hidden 7168, moe_intermediate 2048, 256 experts, top-8) and of the
// bundled model (hidden 256, moe_intermediate 128, 16 experts, top-4), in the same run as
//   - cuBLASLt FP8 (per-tensor scaling) on the same FLOPs: one GEMM pair per expert (a loop
//     over experts, rows padded to 16) and one large GEMM pair over all rows;
//   - a device-to-device copy (the bandwidth a memory-bound kernel can hope for).
// Prefill batches report TFLOP/s; decode batches (few rows per expert) report GB/s of weights
// read. Prints one table; numbers are medians over the timed iterations.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "CLI/CLI.hpp"
#include "core/kernels/cuda/bench/bench_fill.h"
#include "core/kernels/cuda/device_buffer.h"
#include "core/kernels/cuda/dispatch.h"
#include "core/kernels/plan/expert_layout.h"
#include "spdlog/spdlog.h"

namespace expertmesh::cuda::bench {
namespace {

#define BENCH_CHECK(expr)                            \
  do {                                               \
    const absl::Status _s = (expr);                  \
    if (!_s.ok()) {                                  \
      spdlog::error("{}: {}", #expr, _s.ToString()); \
      return _s;                                     \
    }                                                \
  } while (0)

struct Shape {
  std::string model;
  int64_t H, I;
  int32_t E;
  int k;
};

struct Row {
  std::string model, regime;
  int64_t tokens = 0, slots = 0;
  int32_t active = 0;
  double ours_ms = 0, ours_tflops = 0, ours_gbs = 0;
  std::string plan;
  double lt_loop_tflops = -1, lt_one_tflops = -1, copy_gbs = 0;
};

// Median time of `fn` (which enqueues work on `stream`) over `iters` runs, in ms.
template <typename Fn>
double TimeMs(cudaStream_t stream, int iters, Fn&& fn) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  fn();  // warm-up
  cudaStreamSynchronize(stream);
  std::vector<float> ms;
  for (int i = 0; i < iters; ++i) {
    cudaEventRecord(a, stream);
    fn();
    cudaEventRecord(b, stream);
    cudaEventSynchronize(b);
    float t = 0;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// cuBLASLt FP8 GEMM Y[n, m] = X[n, k] W[m, k]^T (row-major), bf16 out; plans cached by shape.
class LtFp8 {
 public:
  static absl::StatusOr<LtFp8> Create(cudaStream_t stream) {
    LtFp8 lt;
    lt.stream_ = stream;
    if (cublasLtCreate(&lt.handle_) != CUBLAS_STATUS_SUCCESS) {
      return absl::InternalError("cublasLtCreate failed");
    }
    absl::StatusOr<DeviceBuffer<uint8_t>> ws = DeviceBuffer<uint8_t>::Create(kWorkspace);
    if (!ws.ok()) return ws.status();
    lt.workspace_ = std::move(*ws);
    return lt;
  }
  // False when cuBLASLt has no FP8 algorithm for this device / shape.
  bool Gemm(int64_t m, int64_t n, int64_t k, const uint8_t* w, const uint8_t* x, void* y) {
    Plan* plan = GetPlan(m, n, k);
    if (plan == nullptr) return false;
    const float alpha = 1.0f, beta = 0.0f;
    return cublasLtMatmul(handle_, plan->op, &alpha, w, plan->a, x, plan->b, &beta, y, plan->c, y,
                          plan->c, &plan->algo, workspace_.get(), kWorkspace,
                          stream_) == CUBLAS_STATUS_SUCCESS;
  }

 private:
  static constexpr size_t kWorkspace = 32u << 20;
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool ok = false;
  };
  Plan* GetPlan(int64_t m, int64_t n, int64_t k) {
    auto key = std::make_tuple(m, n, k);
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second.ok ? &it->second : nullptr;
    Plan& p = plans_[key];
    // Column-major view: Y^T [m, n] = op(W^T)[m, k] * X^T [k, n]; FP8 needs A transposed.
    cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    const cublasOperation_t t = CUBLAS_OP_T, nt = CUBLAS_OP_N;
    cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t));
    cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof(nt));
    cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8F_E4M3, k, m, k);
    cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8F_E4M3, k, n, k);
    cublasLtMatrixLayoutCreate(&p.c, CUDA_R_16BF, m, n, m);
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulPreferenceCreate(&pref);
    const size_t ws = kWorkspace;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                         sizeof(ws));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    if (cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c, pref, 1, &result,
                                       &found) == CUBLAS_STATUS_SUCCESS &&
        found > 0) {
      p.algo = result.algo;
      p.ok = true;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    return p.ok ? &p : nullptr;
  }

  cublasLtHandle_t handle_ = nullptr;
  cudaStream_t stream_ = nullptr;
  DeviceBuffer<uint8_t> workspace_;
  std::map<std::tuple<int64_t, int64_t, int64_t>, Plan> plans_;
};

absl::Status RunShape(const Shape& s, const std::vector<int64_t>& token_counts, int iters,
                      const DeviceArch& arch, cudaStream_t stream, LtFp8& lt, double copy_gbs,
                      std::vector<Row>& rows) {
  const int64_t H = s.H, I = s.I;
  const int64_t per_expert = 3 * H * I;  // gate + up ([I, H] each, adjacent) + down [H, I]
  auto weights = DeviceBuffer<uint8_t>::Create(per_expert * s.E);
  if (!weights.ok()) return weights.status();
  const int64_t n_scales = 3 * ((I + 127) / 128) * ((H + 127) / 128);
  auto scales = DeviceBuffer<float>::Create(n_scales * s.E);
  if (!scales.ok()) return scales.status();
  BENCH_CHECK(CudaStatus(FillFp8(weights->get(), weights->size(), 17, stream), "fill"));
  BENCH_CHECK(CudaStatus(FillFloat(scales->get(), scales->size(), 1.0f / 64, stream), "fill"));
  std::vector<ExpertWeightPtrs> table(s.E);
  const int64_t sb = ((I + 127) / 128) * ((H + 127) / 128);
  for (int32_t e = 0; e < s.E; ++e) {
    const uint8_t* base = weights->get() + e * per_expert;
    const float* sbase = scales->get() + e * n_scales;
    table[e] = {base, sbase, base + I * H, sbase + sb, base + 2 * I * H, sbase + 2 * sb};
  }
  auto table_d = DeviceBuffer<ExpertWeightPtrs>::FromHost(table);
  if (!table_d.ok()) return table_d.status();

  std::mt19937 rng(11);
  for (int64_t T : token_counts) {
    // Uniformly random distinct top-k experts per token (a balanced gate).
    ExpertRoutes routes;
    std::vector<int32_t> pool(s.E);
    for (int32_t e = 0; e < s.E; ++e) pool[e] = e;
    for (int64_t t = 0; t < T; ++t) {
      std::shuffle(pool.begin(), pool.end(), rng);
      std::vector<int32_t> chosen(pool.begin(), pool.begin() + s.k);
      std::sort(chosen.begin(), chosen.end());
      routes.AddRow(chosen, std::vector<float>(s.k, 1.0f / s.k));
    }
    absl::StatusOr<ExpertLayout> layout = BuildExpertLayout(routes, s.E);
    if (!layout.ok()) return layout.status();
    absl::StatusOr<GroupedGemmPlan> plan = PlanGroupedGemm(arch, layout->max_rows_per_expert());
    if (!plan.ok()) return plan.status();
    std::vector<int32_t> tiles;
    for (const GemmTile& t : BuildTileSchedule(*layout, plan->block_m)) {
      tiles.insert(tiles.end(), {t.expert, t.slot_begin, t.slot_end});
    }
    const int64_t P = layout->n_slots();
    const int64_t P_pad = (P + 15) / 16 * 16 + 16 * s.E;  // room for per-expert padding
    auto x = DeviceBuffer<uint8_t>::Create(std::max(P_pad, T) * std::max(H, I));
    auto x_scales = DeviceBuffer<float>::Create(T * ((H + 127) / 128));
    auto slot_row = DeviceBuffer<int32_t>::FromHost(layout->slot_row);
    auto slot_weight = DeviceBuffer<float>::FromHost(layout->slot_weight);
    auto tiles_d = DeviceBuffer<int32_t>::FromHost(tiles);
    auto row_offsets = DeviceBuffer<int32_t>::FromHost(layout->row_offsets);
    auto row_slots = DeviceBuffer<int32_t>::FromHost(layout->row_slots);
    auto workspace = DeviceBuffer<uint8_t>::Create(GroupedExpertsWorkspaceBytes(P, H, I));
    auto out = DeviceBuffer<float>::Create(T * H);
    auto lt_out = DeviceBuffer<uint16_t>::Create(P_pad * std::max(2 * I, H));
    for (const absl::Status& st :
         {x.status(), x_scales.status(), slot_row.status(), slot_weight.status(), tiles_d.status(),
          row_offsets.status(), row_slots.status(), workspace.status(), out.status(),
          lt_out.status()}) {
      BENCH_CHECK(st);
    }
    BENCH_CHECK(CudaStatus(FillFp8(x->get(), x->size(), 23, stream), "fill"));
    BENCH_CHECK(
        CudaStatus(FillFloat(x_scales->get(), x_scales->size(), 1.0f / 32, stream), "fill"));

    GroupedExpertsParams p;
    p.hidden_size = static_cast<int32_t>(H);
    p.moe_intermediate_size = static_cast<int32_t>(I);
    p.n_rows = static_cast<int32_t>(T);
    p.n_slots = static_cast<int32_t>(P);
    p.n_tiles = static_cast<int32_t>(tiles.size() / 3);
    p.experts = table_d->get();
    p.x = x->get();
    p.x_scales = x_scales->get();
    p.slot_row = slot_row->get();
    p.slot_weight = slot_weight->get();
    p.tiles = tiles_d->get();
    p.row_offsets = row_offsets->get();
    p.row_slots = row_slots->get();
    p.out = out->get();
    CarveGroupedExpertsWorkspace(workspace->get(), p);
    absl::Status launch = absl::OkStatus();
    Row row;
    row.model = s.model;
    row.tokens = T;
    row.slots = P;
    row.active = layout->active_experts();
    row.plan = plan->name();
    row.regime = plan->block_m == 16 ? "decode" : "prefill";
    row.ours_ms =
        TimeMs(stream, iters, [&] { launch.Update(GroupedExperts(arch, *plan, p, stream)); });
    BENCH_CHECK(launch);
    BENCH_CHECK(CudaStatus(cudaStreamSynchronize(stream), "grouped GEMM"));
    const double flops = 6.0 * P * H * I;
    row.ours_tflops = flops / (row.ours_ms * 1e-3) / 1e12;
    const double bytes = static_cast<double>(row.active) * (per_expert + 4.0 * n_scales) +
                         static_cast<double>(T) * H + 4.0 * T * H;
    row.ours_gbs = bytes / (row.ours_ms * 1e-3) / 1e9;

    // cuBLASLt, one GEMM pair per expert (rows padded to 16), then one pair over all rows.
    bool lt_ok = true;
    const double loop_ms = TimeMs(stream, iters, [&] {
      for (int32_t e = 0; e < s.E && lt_ok; ++e) {
        const int64_t n = layout->rows_of(e);
        if (n == 0) continue;
        const int64_t n_pad = (n + 15) / 16 * 16;
        const uint8_t* w = weights->get() + e * per_expert;
        lt_ok = lt.Gemm(2 * I, n_pad, H, w, x->get(), lt_out->get()) &&
                lt.Gemm(H, n_pad, I, w + 2 * I * H, x->get(), lt_out->get());
      }
    });
    if (lt_ok) row.lt_loop_tflops = flops / (loop_ms * 1e-3) / 1e12;
    const int64_t p16 = (P + 15) / 16 * 16;
    bool one_ok = true;
    const double one_ms = TimeMs(stream, iters, [&] {
      one_ok = lt.Gemm(2 * I, p16, H, weights->get(), x->get(), lt_out->get()) &&
               lt.Gemm(H, p16, I, weights->get() + 2 * I * H, x->get(), lt_out->get());
    });
    if (one_ok) row.lt_one_tflops = flops / (one_ms * 1e-3) / 1e12;
    row.copy_gbs = copy_gbs;
    rows.push_back(row);
    spdlog::info("{} T={} done", s.model, T);
  }
  return absl::OkStatus();
}

absl::StatusOr<double> CopyGbs(cudaStream_t stream, int iters) {
  const size_t bytes = size_t{1} << 30;
  auto a = DeviceBuffer<uint8_t>::Create(bytes);
  auto b = DeviceBuffer<uint8_t>::Create(bytes);
  if (!a.ok()) return a.status();
  if (!b.ok()) return b.status();
  const double ms = TimeMs(stream, iters, [&] {
    cudaMemcpyAsync(b->get(), a->get(), bytes, cudaMemcpyDeviceToDevice, stream);
  });
  return 2.0 * bytes / (ms * 1e-3) / 1e9;  // read + write
}

std::string Fmt(double v, const char* f = "%.1f") {
  if (v < 0) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof(buf), f, v);
  return buf;
}

int Main(int argc, char** argv) {
  CLI::App app{"Grouped FP8 expert GEMM beside cuBLASLt FP8 and a device-to-device copy"};
  int device = 0, iters = 10;
  bool quick = false;
  app.add_option("--device", device, "CUDA device index");
  app.add_option("--iters", iters, "timed iterations per measurement (median reported)");
  app.add_flag("--quick", quick, "fewer batch sizes (for a smoke run)");
  CLI11_PARSE(app, argc, argv);

  const absl::StatusOr<int> n_devices = DeviceCount();
  if (!n_devices.ok()) {
    spdlog::error("{}", n_devices.status().ToString());
    return 1;
  }
  if (*n_devices == 0) {
    spdlog::error("no CUDA device present");
    return 2;
  }
  if (cudaSetDevice(device) != cudaSuccess) {
    spdlog::error("cannot select CUDA device {}", device);
    return 2;
  }
  absl::StatusOr<DeviceArch> arch = QueryDeviceArch(device);
  if (!arch.ok()) {
    spdlog::error("{}", arch.status().ToString());
    return 1;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, device);
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  absl::StatusOr<LtFp8> lt = LtFp8::Create(stream);
  absl::StatusOr<double> copy = CopyGbs(stream, iters);
  if (!lt.ok() || !copy.ok()) {
    spdlog::error("setup failed: {} {}", lt.status().ToString(), copy.status().ToString());
    return 1;
  }
  std::vector<Row> rows;
  const Shape v3{"deepseek-v3", 7168, 2048, 256, 8};
  const Shape tiny{"bundled", 256, 128, 16, 4};
  const std::vector<int64_t> v3_tokens =
      quick ? std::vector<int64_t>{64, 4096} : std::vector<int64_t>{16, 64, 256, 1024, 4096, 8192};
  const std::vector<int64_t> tiny_tokens =
      quick ? std::vector<int64_t>{4, 512} : std::vector<int64_t>{1, 4, 64, 512, 4096};
  for (const auto& [shape, tokens] : {std::pair{tiny, tiny_tokens}, std::pair{v3, v3_tokens}}) {
    absl::Status s = RunShape(shape, tokens, iters, *arch, stream, *lt, *copy, rows);
    if (!s.ok()) {
      spdlog::error("{}: {}", shape.model, s.ToString());
      return 1;
    }
  }
  std::printf("\ndevice: %s (sm_%d%d, %d SMs); D2D copy %.0f GB/s (read + write)\n", prop.name,
              arch->major, arch->minor, arch->sm_count, *copy);
  std::printf("%-12s %-8s %6s %7s %6s %-14s %9s %9s %9s %11s %11s\n", "model", "regime", "tokens",
              "slots", "active", "plan", "ms", "TFLOP/s", "GB/s", "LtLoop TF/s", "LtOne TF/s");
  for (const Row& r : rows) {
    std::printf("%-12s %-8s %6ld %7ld %6d %-14s %9.3f %9s %9s %11s %11s\n", r.model.c_str(),
                r.regime.c_str(), static_cast<long>(r.tokens), static_cast<long>(r.slots), r.active,
                r.plan.c_str(), r.ours_ms, Fmt(r.ours_tflops).c_str(),
                Fmt(r.ours_gbs, "%.0f").c_str(), Fmt(r.lt_loop_tflops).c_str(),
                Fmt(r.lt_one_tflops).c_str());
  }
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace
}  // namespace expertmesh::cuda::bench

int main(int argc, char** argv) { return expertmesh::cuda::bench::Main(argc, argv); }
