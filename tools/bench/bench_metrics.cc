// expertmesh-bench-metrics: the hot-path cost of the metrics the services update per step and
// per MoE layer, ours (service-common/metrics.h) beside Debian's prometheus-cpp in the same
// run: a counter increment and a histogram observation through a cached handle, the same
// looked up by name and labels every time (what the dispatcher did before its handles were
// cached), and one scrape of a registry shaped like an attention service's. Threads: 1 and 2
// (the machines have 2 cores). Built only where prometheus-cpp-dev is installed; CI does not
// need it.
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "prometheus/counter.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"
#include "service-common/metrics.h"

namespace {

using expertmesh::LatencyBucketsSeconds;
using expertmesh::MetricsRegistry;

// ---- ours ----
MetricsRegistry& Ours() {
  static MetricsRegistry r;
  return r;
}

void BM_Ours_CounterInc(benchmark::State& state) {
  expertmesh::Counter& c = Ours().GetCounter("bench_tokens_total", "t", {{"layer", "1"}});
  for (auto _ : state) c.Inc();
}
void BM_Ours_HistogramObserve(benchmark::State& state) {
  expertmesh::Histogram& h =
      Ours().GetHistogram("bench_latency_seconds", "t", LatencyBucketsSeconds(), {{"layer", "1"}});
  double v = 1e-4;
  for (auto _ : state) {
    h.Observe(v);
    v = v < 1 ? v * 1.01 : 1e-4;
  }
}
void BM_Ours_CounterLookupInc(benchmark::State& state) {
  for (auto _ : state) {
    Ours().GetCounter("bench_tokens_total", "t", {{"layer", "1"}}).Inc();
  }
}

// ---- prometheus-cpp ----
prometheus::Registry& Theirs() {
  static prometheus::Registry r;
  return r;
}
prometheus::Family<prometheus::Counter>& TheirCounters() {
  static auto& f =
      prometheus::BuildCounter().Name("bench_tokens_total").Help("t").Register(Theirs());
  return f;
}
prometheus::Family<prometheus::Histogram>& TheirHistograms() {
  static auto& f =
      prometheus::BuildHistogram().Name("bench_latency_seconds").Help("t").Register(Theirs());
  return f;
}
const prometheus::Histogram::BucketBoundaries& Buckets() {
  static const prometheus::Histogram::BucketBoundaries b = LatencyBucketsSeconds();
  return b;
}

void BM_PrometheusCpp_CounterInc(benchmark::State& state) {
  prometheus::Counter& c = TheirCounters().Add({{"layer", "1"}});
  for (auto _ : state) c.Increment();
}
void BM_PrometheusCpp_HistogramObserve(benchmark::State& state) {
  prometheus::Histogram& h = TheirHistograms().Add({{"layer", "1"}}, Buckets());
  double v = 1e-4;
  for (auto _ : state) {
    h.Observe(v);
    v = v < 1 ? v * 1.01 : 1e-4;
  }
}
void BM_PrometheusCpp_CounterLookupInc(benchmark::State& state) {
  for (auto _ : state) TheirCounters().Add({{"layer", "1"}}).Increment();
}

// ---- one scrape: 4 layers x 16 experts counters + 4 latency histograms + 8 gauges ----
void BM_Ours_Scrape(benchmark::State& state) {
  MetricsRegistry r;
  for (int l = 0; l < 4; ++l) {
    for (int e = 0; e < 16; ++e) {
      r.GetCounter("scrape_expert_tokens_total", "t",
                   {{"layer", std::to_string(l)}, {"expert", std::to_string(e)}})
          .Inc(e);
    }
    r.GetHistogram("scrape_latency_seconds", "t", LatencyBucketsSeconds(),
                   {{"layer", std::to_string(l)}})
        .Observe(1e-3);
  }
  for (int g = 0; g < 8; ++g) r.GetGauge("scrape_gauge_" + std::to_string(g), "t").Set(g);
  size_t bytes = 0;
  for (auto _ : state) bytes = r.RenderText().size();
  state.counters["bytes"] = static_cast<double>(bytes);
}
void BM_PrometheusCpp_Scrape(benchmark::State& state) {
  prometheus::Registry r;
  auto& counters =
      prometheus::BuildCounter().Name("scrape_expert_tokens_total").Help("t").Register(r);
  auto& hist = prometheus::BuildHistogram().Name("scrape_latency_seconds").Help("t").Register(r);
  for (int l = 0; l < 4; ++l) {
    for (int e = 0; e < 16; ++e) {
      counters.Add({{"layer", std::to_string(l)}, {"expert", std::to_string(e)}}).Increment(e);
    }
    hist.Add({{"layer", std::to_string(l)}}, Buckets()).Observe(1e-3);
  }
  for (int g = 0; g < 8; ++g) {
    prometheus::BuildGauge()
        .Name("scrape_gauge_" + std::to_string(g))
        .Help("t")
        .Register(r)
        .Add({})
        .Set(g);
  }
  prometheus::TextSerializer serializer;
  size_t bytes = 0;
  for (auto _ : state) bytes = serializer.Serialize(r.Collect()).size();
  state.counters["bytes"] = static_cast<double>(bytes);
}

BENCHMARK(BM_Ours_CounterInc)->Threads(1)->Threads(2);
BENCHMARK(BM_PrometheusCpp_CounterInc)->Threads(1)->Threads(2);
BENCHMARK(BM_Ours_HistogramObserve)->Threads(1)->Threads(2);
BENCHMARK(BM_PrometheusCpp_HistogramObserve)->Threads(1)->Threads(2);
BENCHMARK(BM_Ours_CounterLookupInc)->Threads(1)->Threads(2);
BENCHMARK(BM_PrometheusCpp_CounterLookupInc)->Threads(1)->Threads(2);
BENCHMARK(BM_Ours_Scrape);
BENCHMARK(BM_PrometheusCpp_Scrape);

}  // namespace

BENCHMARK_MAIN();
