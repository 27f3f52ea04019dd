// Prometheus metrics for every ExpertMesh service: counters, gauges and histograms with
// labels, rendered in the Prometheus text exposition format (version 0.0.4) for /metrics.
//
// A registry is an ordinary object the service owns and passes to the code that records
// (no process-wide globals). Metric families are created on first use; asking again for the
// same name and labels returns the same metric, so hot paths look a metric up once and keep
// the reference (metrics live as long as the registry). Recording is lock-free for counters
// and gauges and takes a short per-histogram lock for histograms.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace expertmesh {

// Label (name, value) pairs; their order is kept in the exposition.
using MetricLabels = std::vector<std::pair<std::string, std::string>>;

class Counter {
 public:
  void Inc(double v = 1.0);  // v >= 0
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Inc(double v = 1.0);
  void Dec(double v = 1.0) { Inc(-v); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  // upper_bounds: ascending, finite; +Inf is implicit.
  explicit Histogram(std::vector<double> upper_bounds);
  void Observe(double v);
  struct Snapshot {
    std::vector<double> upper_bounds;
    std::vector<uint64_t> cumulative_counts;  // [upper_bounds.size() + 1], last = +Inf
    double sum = 0.0;
    uint64_t count = 0;
  };
  Snapshot snapshot() const;
  // The q-quantile (0..1) estimated by linear interpolation inside the bucket that holds it
  // (what Prometheus' histogram_quantile does); 0 when empty.
  double Quantile(double q) const;

 private:
  std::vector<double> upper_bounds_;
  mutable std::mutex mu_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative, [upper_bounds_.size() + 1]
  double sum_ = 0.0;
  uint64_t count_ = 0;
};

// Bucket helpers.
std::vector<double> ExponentialBuckets(double start, double factor, int count);
std::vector<double> LatencyBucketsSeconds();  // 50 us .. ~30 s

class MetricsRegistry {
 public:
  MetricsRegistry() = default;
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  // name: [a-zA-Z_:][a-zA-Z0-9_:]*; a name keeps the kind and help it was created with
  // (asking for another kind under the same name is a programming error: fatal).
  Counter& GetCounter(std::string_view name, std::string_view help,
                      const MetricLabels& labels = {});
  Gauge& GetGauge(std::string_view name, std::string_view help, const MetricLabels& labels = {});
  Histogram& GetHistogram(std::string_view name, std::string_view help,
                          const std::vector<double>& upper_bounds, const MetricLabels& labels = {});

  // Called (in registration order) at the start of every RenderText(): lets a service set
  // gauges that are cheaper to read at scrape time (queue lengths, cache usage).
  void AddCollector(std::function<void()> collector);

  // The whole registry in the Prometheus text format, families sorted by name.
  std::string RenderText() const;

 private:
  enum class Kind { kCounter, kGauge, kHistogram };
  struct Family {
    Kind kind;
    std::string help;
    std::map<MetricLabels, std::unique_ptr<Counter>> counters;
    std::map<MetricLabels, std::unique_ptr<Gauge>> gauges;
    std::map<MetricLabels, std::unique_ptr<Histogram>> histograms;
  };
  Family& GetFamily(std::string_view name, std::string_view help, Kind kind);

  mutable std::mutex mu_;
  std::map<std::string, Family, std::less<>> families_;
  std::vector<std::function<void()>> collectors_;
};

}  // namespace expertmesh
