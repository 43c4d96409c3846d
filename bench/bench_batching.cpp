// Host benchmarks of similarity batching (no CUDA): the greedy order over a random kNN graph
// (bench/batching_graph.hpp) at several N, the graph validation alone, and the packing.
// Counters: docs/s, the graph's bytes, the workspace's, and the process's peak RSS (getrusage),
// which holds the graph, the workspace, the order and the generator's temporaries.
#include <benchmark/benchmark.h>
#include <sys/resource.h>

#include <cstdio>
#include <map>
#include <memory>
#include <vector>

#include "batching_graph.hpp"
#include "lory/batching.hpp"

namespace {

namespace lb = lory::batching;

double peak_rss_mb() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;  // kB on Linux
}

// One graph kept at a time (10M docs with k = 10 is 1.2 GB).
const lory_bench::RandomKnnGraph& graph(int64_t N, int64_t k) {
  static std::unique_ptr<lory_bench::RandomKnnGraph> g;
  if (!g || g->num_docs != N || g->k != k) {
    g.reset();
    g = std::make_unique<lory_bench::RandomKnnGraph>(lory_bench::make_random_knn_graph(N, k, 2405));
  }
  return *g;
}

lb::KnnGraphView view(const lory_bench::RandomKnnGraph& g) {
  return lb::KnnGraphView{g.num_docs, g.k, 0, g.ids.data(), nullptr, g.sims.data()};
}

void set_counters(benchmark::State& st, int64_t N, int64_t k, size_t ws_bytes) {
  const double graph_mb = static_cast<double>(N * k) * (sizeof(int64_t) + sizeof(float)) / (1 << 20);
  st.counters["docs/s"] = benchmark::Counter(static_cast<double>(N), benchmark::Counter::kIsIterationInvariantRate);
  st.counters["graph_MB"] = graph_mb;
  st.counters["workspace_MB"] = static_cast<double>(ws_bytes) / (1 << 20);
  st.counters["peak_rss_MB"] = peak_rss_mb();
  st.counters["rss/graph"] = peak_rss_mb() / graph_mb;
}

// Args: N, start rule (0 min-degree, 1 first unvisited), neighbours used (0 all), chain cap, merge,
// dedup (1: threshold 0.99).
void BM_SimilarityOrder(benchmark::State& st) {
  const int64_t N = st.range(0), k = 10;
  const auto& g = graph(N, k);
  lb::OrderArgs a;
  a.graph = view(g);
  a.options.start = st.range(1) ? lb::OrderOptions::Start::kFirstUnvisited : lb::OrderOptions::Start::kMinDegree;
  a.options.neighbours_used = st.range(2);
  a.options.max_chain_len = st.range(3);
  a.options.merge_short_chains = st.range(4) != 0;
  if (st.range(5)) a.options.dedup_threshold = 0.99f;
  std::vector<int64_t> order(static_cast<size_t>(N));
  int64_t n = 0;
  a.order_out = order.data();
  a.num_out = &n;
  size_t bytes = 0;
  if (lb::similarity_order(a, nullptr, bytes) != lory::Status::kSuccess) {
    st.SkipWithError("size query failed");
    return;
  }
  std::vector<unsigned char> ws(bytes);
  for (auto _ : st) {
    if (lb::similarity_order(a, ws.data(), bytes) != lory::Status::kSuccess) {
      st.SkipWithError("similarity_order failed");
      return;
    }
    benchmark::DoNotOptimize(order.data());
  }
  set_counters(st, N, k, bytes);
  st.counters["placed"] = static_cast<double>(n);
}

// Baseline: the least a walk can do -- a visited bitset, the first unvisited neighbour of each row,
// a forward cursor for jumps; no validation, degrees, tie rule or options. Its time is the memory
// latency of one dependent row read per step, which bounds similarity_order from below.
void BM_MinimalWalkBaseline(benchmark::State& st) {
  const int64_t N = st.range(0), k = 10;
  const auto& g = graph(N, k);
  std::vector<uint64_t> visited(static_cast<size_t>((N + 63) / 64));
  std::vector<int64_t> order(static_cast<size_t>(N));
  for (auto _ : st) {
    std::fill(visited.begin(), visited.end(), uint64_t{0});
    int64_t cur = -1, cursor = 0, n = 0;
    for (;;) {
      int64_t next = -1;
      if (cur >= 0) {
        const int64_t* row = g.ids.data() + cur * k;
        for (int64_t j = 0; j < k && row[j] >= 0; ++j)
          if (!((visited[row[j] >> 6] >> (row[j] & 63)) & 1)) {
            next = row[j];
            break;
          }
      }
      if (next < 0) {
        while (cursor < N && ((visited[cursor >> 6] >> (cursor & 63)) & 1)) ++cursor;
        if (cursor == N) break;
        next = cursor;
      }
      visited[next >> 6] |= uint64_t{1} << (next & 63);
      order[n++] = cur = next;
    }
    benchmark::DoNotOptimize(order.data());
  }
  set_counters(st, N, k, 0);
}

void BM_ValidateGraph(benchmark::State& st) {
  const int64_t N = st.range(0), k = 10;
  const auto& g = graph(N, k);
  for (auto _ : st) {
    if (lb::validate_graph(view(g)) != lory::Status::kSuccess) st.SkipWithError("invalid graph");
  }
  set_counters(st, N, k, 0);
}

// Packing N docs of 1..2000 tokens (mean ~1000) into 4096-token sequences with a separator.
void BM_PackDocuments(benchmark::State& st) {
  const int64_t N = st.range(0);
  std::vector<int64_t> counts(static_cast<size_t>(N)), order(static_cast<size_t>(N));
  uint64_t s = 7;
  for (int64_t d = 0; d < N; ++d) {
    counts[d] = 1 + static_cast<int64_t>(lory_bench::splitmix64(s) % 2000);
    order[d] = (d * 7919) % N;  // a permutation when gcd(7919, N) = 1
  }
  lb::PackSizes sizes;
  lb::PackArgs a;
  a.order = order.data();
  a.num_ordered = N;
  a.doc_token_counts = counts.data();
  a.num_docs = N;
  a.options.seq_len = 4096;
  a.options.separator = 2;
  a.options.boundary = st.range(1) ? lb::PackOptions::Boundary::kMove : lb::PackOptions::Boundary::kSplit;
  a.sizes = &sizes;
  size_t bytes = 0;
  if (lb::pack_documents(a, nullptr, bytes) != lory::Status::kSuccess) {
    st.SkipWithError("size query failed");
    return;
  }
  std::vector<lb::PackedRange> ranges(static_cast<size_t>(sizes.num_ranges));
  std::vector<int64_t> offsets(static_cast<size_t>(sizes.num_seqs + 1));
  std::vector<unsigned char> ws(bytes);
  a.ranges_out = ranges.data();
  a.ranges_capacity = sizes.num_ranges;
  a.seq_offsets_out = offsets.data();
  a.seq_offsets_capacity = sizes.num_seqs + 1;
  for (auto _ : st) {
    if (lb::pack_documents(a, ws.data(), bytes) != lory::Status::kSuccess) st.SkipWithError("pack failed");
  }
  st.counters["docs/s"] = benchmark::Counter(static_cast<double>(N), benchmark::Counter::kIsIterationInvariantRate);
  st.counters["seqs"] = static_cast<double>(sizes.num_seqs);
}

}  // namespace

BENCHMARK(BM_SimilarityOrder)
    ->ArgNames({"N", "first_unvisited", "m", "cap", "merge", "dedup"})
    ->Args({100000, 0, 0, 0, 0, 0})
    ->Args({1000000, 0, 0, 0, 0, 0})
    ->Args({1000000, 1, 0, 0, 0, 0})
    ->Args({1000000, 1, 9, 21, 1, 0})
    ->Args({1000000, 0, 0, 0, 0, 1})
    ->Args({10000000, 0, 0, 0, 0, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_MinimalWalkBaseline)->ArgNames({"N"})->Arg(1000000)->Arg(10000000)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_ValidateGraph)->ArgNames({"N"})->Arg(1000000)->Arg(10000000)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_PackDocuments)->ArgNames({"N", "move"})->Args({10000000, 0})->Args({10000000, 1})->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
