// A deterministic random kNN graph for the batching benchmarks: row r lists k distinct ids other
// than r, drawn uniformly (splitmix64 of the seed and r, so the graph does not depend on how it is
// generated), with similarities uniform in [0, 1) sorted in descending order. Uniform ids are the
// cache's worst case, as in a real corpus whose neighbours are scattered over the document ids;
// in-degrees are Poisson(k) here, where real kNN graphs have hubs.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

namespace lory_bench {

inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct RandomKnnGraph {
  int64_t num_docs = 0, k = 0;
  std::vector<int64_t> ids;  // [N, k]
  std::vector<float> sims;   // [N, k]
};

inline RandomKnnGraph make_random_knn_graph(int64_t N, int64_t k, uint64_t seed) {
  RandomKnnGraph g;
  g.num_docs = N;
  g.k = k;
  g.ids.resize(static_cast<size_t>(N * k));
  g.sims.resize(static_cast<size_t>(N * k));
  const int64_t valid = std::min<int64_t>(k, N - 1);
  for (int64_t r = 0; r < N; ++r) {
    uint64_t s = seed * 0x100000001B3ull ^ static_cast<uint64_t>(r);
    int64_t* row = g.ids.data() + r * k;
    float* srow = g.sims.data() + r * k;
    for (int64_t j = 0; j < k; ++j) {
      if (j >= valid) {
        row[j] = -1;
        srow[j] = 0.f;
        continue;
      }
      int64_t t;
      do t = static_cast<int64_t>(splitmix64(s) % static_cast<uint64_t>(N));
      while (t == r || std::find(row, row + j, t) != row + j);
      row[j] = t;
      srow[j] = static_cast<float>(splitmix64(s) >> 40) * (1.0f / 16777216.0f);
    }
    std::sort(srow, srow + valid, std::greater<float>());
  }
  return g;
}

}  // namespace lory_bench
