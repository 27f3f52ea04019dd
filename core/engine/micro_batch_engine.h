// Ping-pong micro-batches (as MegaScale-Infer): a ForwardEngine that splits a step's batch into
// micro-batches so that the dense compute (attention, gate, shared experts) of one micro-batch
// runs while the routed-expert round trip of another is on the wire.
//
// Each micro-batch is a contiguous run of whole sequences, the runs balanced by rows; each runs
// the reference engine's Forward on its own thread (micro-batch 0 on the caller's), with its
// own RoutedExperts (e.g. Dispatcher::MicroBatch(i): its own step table). A compute baton, one
// holder at a time, is held while a micro-batch computes and released while it waits for its
// routed experts, so the dense compute ping-pongs between the micro-batches (never two at
// once: the kernels keep their whole thread pool) while their expert round trips overlap:
//
//   baton:   [mb0 attn L1][mb1 attn L1][mb0 attn L2][mb1 attn L2] ...
//   experts:              [mb0 L1 ----][mb1 L1 ----][mb0 L2 ----] ...
//
// Every layer computes each row independently of the rest of the batch and the KV caches of
// different sequences are disjoint, so the outputs are bit-identical to one unsplit Forward.
// A batch of fewer than 2 x min_rows rows is not split (a micro-batch would have too little
// compute to hide anything, and batch 1 must lose nothing); ForwardMtp is never split.
//
// Legend: S = sequences of the batch, k = micro-batches of one Forward.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine/engine.h"
#include "core/engine/forward_engine.h"
#include "core/model/experts.h"
#include "core/model/model.h"

namespace expertmesh {

struct MicroBatchOptions {
  static constexpr int kMax = 8;
  int micro_batches = 2;  // [1, kMax]; 1: every Forward runs unsplit
  int64_t min_rows = 4;   // rows each micro-batch gets at least (>= 1)
};

// How a batch of S sequences with these row counts is split: the end (exclusive sequence index)
// of each of the k micro-batches, k = min(micro_batches, S, total rows / min_rows), at least 1.
// Cuts fall where the running row count first reaches j/k of the total (each micro-batch keeps
// at least one sequence).
std::vector<size_t> SplitMicroBatches(std::span<const int64_t> rows, int micro_batches,
                                      int64_t min_rows);

class MicroBatchForwardEngine final : public ForwardEngine {
 public:
  // experts[i]: what micro-batch i's MoE layers call; experts.size() == options.micro_batches.
  // `model` and the experts must outlive the engine.
  static absl::StatusOr<std::unique_ptr<MicroBatchForwardEngine>> Create(
      const Model& model, std::span<RoutedExperts* const> experts, EngineOptions engine,
      MicroBatchOptions options);
  ~MicroBatchForwardEngine() override;  // stops the micro-batch threads

  absl::StatusOr<std::vector<SequenceOutput>> Forward(
      std::span<const SequenceInput> batch) override;
  // Not split: micro-batch 0 (drafting's experts are in process by default).
  absl::StatusOr<std::vector<SequenceOutput>> ForwardMtp(std::span<const MtpInput> batch,
                                                         int depth) override;
  const Model& model() const override { return model_; }

  const MicroBatchOptions& options() const { return options_; }
  // Micro-batches of the last Forward (1 when it was not split).
  int last_split() const { return last_split_; }

 private:
  class BatonExperts;
  struct Worker;
  MicroBatchForwardEngine(const Model& model, MicroBatchOptions options);
  // Micro-batch i's forward over `part`, holding the baton except while its experts run.
  absl::StatusOr<std::vector<SequenceOutput>> RunMicroBatch(size_t i,
                                                            std::span<const SequenceInput> part);
  void WorkerLoop(Worker& w);

  const Model& model_;
  const MicroBatchOptions options_;
  std::mutex baton_;                                          // held by the micro-batch computing
  std::vector<std::unique_ptr<BatonExperts>> baton_experts_;  // [micro_batches]
  std::vector<std::unique_ptr<Engine>> engines_;  // [micro_batches], one per micro-batch
  std::vector<std::unique_ptr<Worker>> workers_;  // micro-batches 1.. (0: the caller)
  int last_split_ = 1;
};

}  // namespace expertmesh
