// attention-service: the sequence owner (see attention_service.h). main only parses flags.
#include <string>

#include "attention-service/attention_service.h"
#include "core/kernels/cpu/thread_pool.h"
#include "service-common/bootstrap.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
  using namespace expertmesh;
  attention::AttentionServerOptions o;
  ServiceMain main("attention",
                   "attention-service: ExpertMesh sequence owner (scheduler, KV cache, dense "
                   "layers)",
                   {.listen = o.server.listen});
  CLI::App& app = main.app();
  int step_deadline_ms = 10000, attempt_timeout_ms = 3000, default_deadline_ms = 600000;
  int64_t kv_blocks = 1024, kv_block_size = 16, max_batch = 64, max_waiting = 256,
          prefill_chunk = 64;
  bool no_act_quant = false, no_mtp = false, mtp_always = false;
  int draft_k = 1;
  int micro_batches = 2;
  int64_t micro_batch_min_rows = 4;
  int drain_grace_s = 30;
  std::string device = "cpu";
  std::string combine = "exact";
  std::string data_plane = "auto";
  app.add_option("--model", o.model_dir, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--router", o.router_address, "Router address host:port")->required();
  app.add_option("--kv-blocks", kv_blocks, "KV cache blocks")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24))
      ->capture_default_str();
  app.add_option("--kv-block-size", kv_block_size, "Tokens per KV block")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--max-batch", max_batch, "Sequences per step")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--max-waiting", max_waiting, "Waiting queue bound (then RESOURCE_EXHAUSTED)")
      ->check(CLI::Range(0, 65536))
      ->capture_default_str();
  app.add_option("--prefill-chunk", prefill_chunk, "Prompt tokens per sequence per step")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--step-deadline-ms", step_deadline_ms, "Deadline of one MoE dispatch")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  app.add_option("--attempt-timeout-ms", attempt_timeout_ms,
                 "One shard replica's answer, then failover")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  app.add_option("--combine", combine,
                 "exact: shards answer each (token, expert) output and this service adds them in "
                 "expert order (bit-identical to the in-process engine for every placement); "
                 "partial: one partial sum per token and shard (fewer bytes, output depends on "
                 "which experts share a shard)")
      ->check(CLI::IsMember({"exact", "partial"}))
      ->capture_default_str();
  app.add_option("--data-plane", data_plane,
                 "auto: send expert requests on a shard replica's framed TCP data plane when it "
                 "has one (fewer thread hand-offs per round trip; never under mTLS, it is "
                 "plaintext); grpc: always on the gRPC Compute streams")
      ->check(CLI::IsMember({"auto", "grpc"}))
      ->capture_default_str();
  app.add_option("--default-deadline-ms", default_deadline_ms, "Deadline of a Submit without one")
      ->check(CLI::Range(1, 86400000))
      ->capture_default_str();
  app.add_option("--device", device,
                 "cpu, or cuda:N[,M...]: the dense layers on these GPUs (tensor parallel)")
      ->capture_default_str();
  app.add_flag("--no-act-quant", no_act_quant, "FP8 weights see float inputs (as transformers)");
  app.add_flag("--no-mtp", no_mtp, "No speculative decoding with the model's MTP module");
  app.add_flag("!--no-prefix-caching", o.scheduler.prefix_caching,
               "Do not share the KV blocks of common prompt prefixes between sequences");
  app.add_option("--micro-batches", micro_batches,
                 "Split each step's batch into this many micro-batches whose attention compute "
                 "overlaps the others' expert round trips (1 = off; --device cpu only, a GPU runs "
                 "steps unsplit)")
      ->check(CLI::Range(1, 8))
      ->capture_default_str();
  app.add_option("--micro-batch-min-rows", micro_batch_min_rows,
                 "Rows each micro-batch gets at least: steps below 2x this are not split")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20))
      ->capture_default_str();
  app.add_option("--draft-k", draft_k, "MTP drafts per step (adaptive: 0..k)")
      ->check(CLI::Range(1, 4))
      ->capture_default_str();
  app.add_flag("!--remote-mtp-experts", o.local_mtp_experts,
               "The MTP module's routed experts on the shards (default: held here, so drafting "
               "costs no network round trip)");
  app.add_flag("--mtp-always", mtp_always,
               "Draft every step (default: adaptive, drafting only when it pays)");
  app.add_option("--drain-grace-s", drain_grace_s,
                 "On SIGTERM: NOT_SERVING and no new sequences at once; the running ones get "
                 "this long to finish (keep it below terminationGracePeriodSeconds)")
      ->check(CLI::Range(0, 3600))
      ->capture_default_str();
  app.add_option("--instance-id", o.instance_id, "Name in handshakes and logs")
      ->capture_default_str();
  app.add_option_function<int>(
         "--threads", [](int n) { expertmesh::cpu::SetKernelThreads(n); },
         "CPU kernel threads, 0 = every CPU this process may use (affinity and cgroup cpu.max)")
      ->check(CLI::Range(0, 1024));
  if (std::optional<int> exit = main.Parse(argc, argv)) return *exit;
  o.server.listen = main.flags().listen;
  o.metrics_host = main.MetricsHost();
  o.metrics_port = main.flags().metrics_port;
  o.scheduler.kv_blocks = kv_blocks;
  o.scheduler.kv_block_size = kv_block_size;
  o.scheduler.max_batch = max_batch;
  o.scheduler.max_waiting = max_waiting;
  o.scheduler.prefill_chunk = prefill_chunk;
  o.scheduler.engine.quantize_activations = !no_act_quant;
  o.scheduler.device = device;
  o.scheduler.mtp = !no_mtp;
  o.scheduler.draft_k = draft_k;
  o.scheduler.micro_batches = micro_batches;
  o.scheduler.micro_batch_min_rows = micro_batch_min_rows;
  o.scheduler.policy.adaptive = !mtp_always;
  o.step_deadline = absl::Milliseconds(step_deadline_ms);
  o.attempt_timeout = absl::Milliseconds(attempt_timeout_ms);
  o.combine = combine == "partial" ? CombineMode::kPartial : CombineMode::kExact;
  o.data_plane = data_plane == "auto";
  o.default_deadline = absl::Milliseconds(default_deadline_ms);
  o.load_progress = true;

  absl::StatusOr<std::unique_ptr<attention::AttentionServer>> server =
      attention::AttentionServer::Start(o);
  if (!server.ok()) return main.StartFailed(server.status());
  spdlog::info("attention service on port {} (metrics port {}), router {}", (*server)->port(),
               (*server)->metrics_port(), o.router_address);
  return main.RunUntilSignal([&] { (*server)->Drain(absl::Seconds(drain_grace_s)); });
}
