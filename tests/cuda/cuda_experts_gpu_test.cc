// CudaExperts (the RoutedExperts of an expert shard with --device cuda:N[,M...]) against the
// CPU reference LocalExperts, loading the same FP8 checkpoint. One device and a device listed
// twice (the multi-GPU path: per-device groups, host combine) must agree bitwise with each
// other, and with the CPU within the grouped GEMM's tolerance for the device's MMA path
// (fp8_tolerance.h, derived by promotion_emulation_test.cc).
#include "core/kernels/cuda/cuda_experts.h"

#include <filesystem>
#include <random>

#include "core/format/safetensors.h"
#include "tests/cuda/fp8_tolerance.h"
#include "tests/cuda/gpu_test_util.h"

namespace expertmesh::cuda::testing {
namespace {

ModelConfig TinyConfig() {
  ModelConfig c;
  c.model_type = "deepseek_v3";
  c.hidden_size = 256;
  c.moe_intermediate_size = 128;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 3;
  c.num_hidden_layers = 2;
  c.first_k_dense_replace = 0;
  c.moe_layer_freq = 1;
  c.quantization_config.present = true;
  c.quantization_config.quant_method = "fp8";
  c.quantization_config.weight_block_size = {128, 128};
  return c;
}

TensorToWrite Tensor(std::string name, DType dtype, std::vector<int64_t> shape, const void* data,
                     size_t bytes) {
  TensorToWrite t{std::move(name), dtype, std::move(shape), {}};
  t.data.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + bytes);
  return t;
}

class CudaExpertsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    EM_REQUIRE_GPU();
    config_ = TinyConfig();
    const int64_t H = config_.hidden_size, I = config_.moe_intermediate_size;
    std::mt19937 rng(77);
    std::vector<TensorToWrite> tensors;
    for (int layer = 0; layer < 2; ++layer) {
      for (int e = 0; e < config_.n_routed_experts; ++e) {
        const HostExpert x = RandomExpert(H, I, WeightKind::kRandom, rng);
        const std::string p =
            "model.layers." + std::to_string(layer) + ".mlp.experts." + std::to_string(e) + ".";
        auto add = [&](const std::string& proj, const std::vector<uint8_t>& w,
                       const std::vector<float>& s, int64_t out, int64_t in) {
          tensors.push_back(
              Tensor(p + proj + ".weight", DType::kF8E4M3, {out, in}, w.data(), w.size()));
          tensors.push_back(Tensor(p + proj + ".weight_scale_inv", DType::kF32,
                                   {NumBlocks(out, 128), NumBlocks(in, 128)}, s.data(),
                                   s.size() * 4));
        };
        add("gate_proj", x.gate, x.gate_scale, I, H);
        add("up_proj", x.up, x.up_scale, I, H);
        add("down_proj", x.down, x.down_scale, H, I);
      }
    }
    dir_ = std::filesystem::path(::testing::TempDir()) / "cuda_experts_ckpt";
    std::filesystem::create_directories(dir_);
    ASSERT_TRUE(WriteSafetensors((dir_ / "model.safetensors").string(), tensors).ok());
    auto ckpt = Checkpoint::Open(dir_.string());
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    ckpt_ = std::move(*ckpt);
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  ModelConfig config_;
  std::filesystem::path dir_;
  std::unique_ptr<Checkpoint> ckpt_;
};

TEST_F(CudaExpertsTest, MatchesCpuReferenceOnOneAndTwoDevices) {
  const std::vector<LayerExpert> all = AllExperts(config_);
  // CudaExperts keeps each expert's output in FP32: the reference without LocalExperts'
  // default BF16 rounding of expert outputs, as the bound was measured.
  LocalExperts::Options fp32_outputs;
  fp32_outputs.round_expert_outputs_bf16 = false;
  auto cpu = LocalExperts::Create(*ckpt_, config_, all, fp32_outputs);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto one = CudaExperts::Create(*ckpt_, config_, all, {.devices = {0}});
  ASSERT_TRUE(one.ok()) << one.status();
  auto two = CudaExperts::Create(*ckpt_, config_, all, {.devices = {0, 0}});
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ((*two)->num_devices(), 2);

  const int64_t H = config_.hidden_size, R = 37;
  std::mt19937 rng(8);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> xf(R * H);
  for (float& v : xf) v = normal(rng);
  const QuantizedActivations x = QuantizeActivations(xf, R, H);
  ExpertRoutes routes;
  for (int64_t r = 0; r < R; ++r) {
    std::vector<int32_t> e = {static_cast<int32_t>(r % 3), static_cast<int32_t>(3 + r % 2),
                              static_cast<int32_t>(5 + r % 3)};
    routes.AddRow(e, std::vector<float>{0.5f, 0.25f, 1.5f});
  }
  // CudaExperts runs the device's own MMA path; its bound follows.
  absl::StatusOr<DeviceArch> arch = QueryDeviceArch(0);
  ASSERT_TRUE(arch.ok()) << arch.status();
  const double bound = RandomBounds(*SelectMmaPath(*arch)).cosine_diff;
  for (int layer : {0, 1}) {
    std::vector<float> ref(R * H), got1(R * H), got2(R * H);
    ASSERT_TRUE((*cpu)->Run(layer, x, routes, ref).ok());
    ASSERT_TRUE((*one)->Run(layer, x, routes, got1).ok());
    ASSERT_TRUE((*two)->Run(layer, x, routes, got2).ok());
    EXPECT_EQ(got1, got2) << "layer " << layer;
    const double diff = CosineDiff(got1, ref);
    std::printf("[measured] CudaExperts layer %d vs LocalExperts: cosine diff %.3g (bound %.3g)\n",
                layer, diff, bound);
    EXPECT_LE(diff, bound);
  }
}

TEST_F(CudaExpertsTest, RefusesExpertsItDoesNotHold) {
  const std::vector<LayerExpert> some = {{1, 2}, {1, 5}};
  auto ce = CudaExperts::Create(*ckpt_, config_, some, {.devices = {0}});
  ASSERT_TRUE(ce.ok()) << ce.status();
  EXPECT_TRUE((*ce)->Holds(1, 5));
  EXPECT_FALSE((*ce)->Holds(0, 5));
  const int64_t H = config_.hidden_size;
  const QuantizedActivations x = QuantizeActivations(std::vector<float>(2 * H, 0.5f), 2, H);
  ExpertRoutes routes;
  const int32_t held[] = {2, 5}, missing[] = {3};
  const float w2[] = {1.0f, 1.0f}, w1[] = {1.0f};
  routes.AddRow(held, w2);
  routes.AddRow(missing, w1);
  std::vector<float> out(2 * H);
  EXPECT_EQ((*ce)->Run(1, x, routes, out).code(), absl::StatusCode::kInvalidArgument);
  ExpertRoutes ok_routes;
  ok_routes.AddRow(held, w2);
  ok_routes.AddRow({}, {});
  EXPECT_TRUE((*ce)->Run(1, x, ok_routes, out).ok());
  EXPECT_EQ((*ce)->Run(1, x, ok_routes, std::span<float>(out).first(H)).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace expertmesh::cuda::testing
