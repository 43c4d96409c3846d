// lory_batching_order: the similarity order of a kNN graph stored as raw files, for the comparison
// with the plain Python version (bench/batching_plain.py) and for trying the order on real graphs.
//   lory_batching_order generate N K SEED PREFIX
//       writes PREFIX.ids (int64 [N, K]) and PREFIX.sims (float32 [N, K]): bench/batching_graph.hpp
//   lory_batching_order order PREFIX N K OUT [first-unvisited] [m=M] [cap=C] [merge] [dedup=T]
//       maps the two files, writes the order to OUT (int64), prints the seconds the call took:
//       wall-clock, then this process's CPU time (less than wall-clock when the machine is shared)
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "batching_graph.hpp"
#include "lory/batching.hpp"
#include "lory/batching_mapped_file.hpp"

namespace lb = lory::batching;

static int usage() {
  std::fprintf(stderr,
               "usage: lory_batching_order generate N K SEED PREFIX\n"
               "       lory_batching_order order PREFIX N K OUT [first-unvisited] [m=M] [cap=C] [merge] [dedup=T]\n");
  return 2;
}

template <class T> static bool write_file(const std::string& path, const std::vector<T>& v) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return false;
  const bool ok = std::fwrite(v.data(), sizeof(T), v.size(), f) == v.size();
  return std::fclose(f) == 0 && ok;
}

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const std::string cmd = argv[1];
  if (cmd == "generate" && argc == 6) {
    const auto g = lory_bench::make_random_knn_graph(std::atoll(argv[2]), std::atoll(argv[3]),
                                                     std::strtoull(argv[4], nullptr, 10));
    const std::string prefix = argv[5];
    if (!write_file(prefix + ".ids", g.ids) || !write_file(prefix + ".sims", g.sims)) {
      std::fprintf(stderr, "cannot write %s.{ids,sims}\n", prefix.c_str());
      return 1;
    }
    return 0;
  }
  if (cmd != "order" || argc < 6) return usage();
  const std::string prefix = argv[2];
  const int64_t N = std::atoll(argv[3]), K = std::atoll(argv[4]);
  lb::OrderOptions o;
  for (int i = 6; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "first-unvisited") o.start = lb::OrderOptions::Start::kFirstUnvisited;
    else if (a.rfind("m=", 0) == 0) o.neighbours_used = std::atoll(a.c_str() + 2);
    else if (a.rfind("cap=", 0) == 0) o.max_chain_len = std::atoll(a.c_str() + 4);
    else if (a == "merge") o.merge_short_chains = true;
    else if (a.rfind("dedup=", 0) == 0) o.dedup_threshold = std::strtof(a.c_str() + 6, nullptr);
    else return usage();
  }
  lb::MappedFile ids, sims;
  if (ids.open((prefix + ".ids").c_str()) != lory::Status::kSuccess ||
      sims.open((prefix + ".sims").c_str()) != lory::Status::kSuccess) {
    std::fprintf(stderr, "cannot map %s.{ids,sims}\n", prefix.c_str());
    return 1;
  }
  if (ids.count<int64_t>() != N * K || sims.count<float>() != N * K) {
    std::fprintf(stderr, "%s.{ids,sims} do not hold [%lld, %lld] entries\n", prefix.c_str(),
                 static_cast<long long>(N), static_cast<long long>(K));
    return 1;
  }
  lb::OrderArgs a;
  a.graph = lb::KnnGraphView{N, K, 0, ids.as<int64_t>(), nullptr, sims.as<float>()};
  a.options = o;
  std::vector<int64_t> order(static_cast<size_t>(N));
  int64_t n = 0;
  a.order_out = order.data();
  a.num_out = &n;
  size_t bytes = 0;
  lory::Status s = lb::similarity_order(a, nullptr, bytes);
  std::vector<unsigned char> ws(bytes);
  const auto t0 = std::chrono::steady_clock::now();
  const std::clock_t c0 = std::clock();
  if (s == lory::Status::kSuccess) s = lb::similarity_order(a, ws.data(), bytes);
  const double cpu = static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (s != lory::Status::kSuccess) {
    const lory::ErrorDetail e = lory::last_error_detail();
    std::fprintf(stderr, "similarity_order: %s (%s: %s)\n", lory::status_string(s), e.argument, e.reason);
    return 1;
  }
  order.resize(static_cast<size_t>(n));
  if (!write_file(argv[5], order)) {
    std::fprintf(stderr, "cannot write %s\n", argv[5]);
    return 1;
  }
  std::printf("%.6f %.6f\n", sec, cpu);
  return 0;
}
