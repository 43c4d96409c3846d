// Similarity batching (lory/batching.hpp): the greedy max-similarity order against a plain
// re-implementation of the same rules on many small random kNN graphs, step-by-step checks of the
// rules themselves, every option, the packing against a plain token-level packer, and bad input.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "common/catch.hpp"
#include "common/test_util.hpp"
#include "lory/batching.hpp"
#include "lory/batching_mapped_file.hpp"

namespace {

namespace lb = lory::batching;
using lory::Status;
using Start = lb::OrderOptions::Start;
using Boundary = lb::PackOptions::Boundary;
using Leftover = lb::PackOptions::Leftover;

constexpr int64_t kPoison = -0x5A5A5A5A5A5A5A5ALL;
struct SevenBytes {
  unsigned char bytes[7];
};

// ---- random graphs -------------------------------------------------------------------------------

struct Graph {
  int64_t N = 0, k = 0;
  std::vector<int64_t> ids;  // [N, k], -1 for missing
  std::vector<float> sims;
  std::vector<int32_t> ids32() const { return std::vector<int32_t>(ids.begin(), ids.end()); }
  lb::KnnGraphView view() const { return lb::KnnGraphView{N, k, 0, ids.data(), nullptr, sims.data()}; }
  int64_t id(int64_t r, int64_t j) const { return ids[r * k + j]; }
  float sim(int64_t r, int64_t j) const { return sims[r * k + j]; }
};

// Random ids, random similarities on a coarse grid (so that ties are common), rows sorted; some
// rows short (missing tails); repeats within a row when `repeats`.
Graph random_graph(std::mt19937_64& rng, int64_t N, int64_t k, bool repeats = false) {
  Graph g;
  g.N = N;
  g.k = k;
  g.ids.assign(N * k, -1);
  g.sims.assign(N * k, -std::numeric_limits<float>::infinity());
  std::uniform_int_distribution<int> levels(0, 5);
  for (int64_t r = 0; r < N; ++r) {
    std::vector<int64_t> pool;
    for (int64_t d = 0; d < N; ++d)
      if (d != r) pool.push_back(d);
    std::shuffle(pool.begin(), pool.end(), rng);
    int64_t valid = std::min<int64_t>(k, static_cast<int64_t>(pool.size()));
    if (rng() % 4 == 0) valid = static_cast<int64_t>(rng() % (valid + 1));
    std::vector<std::pair<float, int64_t>> row;
    for (int64_t j = 0; j < valid; ++j) {
      int64_t t = pool[j];
      if (repeats && j > 0 && rng() % 3 == 0) t = row[rng() % row.size()].second;
      row.push_back({0.25f * levels(rng) - 0.5f, t});
    }
    std::stable_sort(row.begin(), row.end(), [](auto& a, auto& b) { return a.first > b.first; });
    for (int64_t j = 0; j < valid; ++j) {
      g.ids[r * k + j] = row[j].second;
      g.sims[r * k + j] = row[j].first;
    }
  }
  return g;
}

// ---- the plain reference: the same rules, written directly (O(N^2)) ------------------------------

struct OrderResult {
  std::vector<int64_t> order, dropped, chain_offsets;
};

struct Reference {
  const Graph& g;
  lb::OrderOptions o;
  int64_t m;
  std::vector<int> state;  // 0 unvisited, 1 placed, 2 dropped
  std::vector<int64_t> degree;
  OrderResult res;

  Reference(const Graph& graph, lb::OrderOptions opt) : g(graph), o(opt) {
    m = o.neighbours_used == 0 ? g.k : o.neighbours_used;
    state.assign(g.N, 0);
    degree.assign(g.N, 0);
    for (int64_t r = 0; r < g.N; ++r)
      for (int64_t j = 0; j < m; ++j)
        if (g.id(r, j) >= 0) {
          degree[r] += 1;
          degree[g.id(r, j)] += 1;
        }
  }
  bool better(float s, int64_t t, float best_s, int64_t best) const {
    return best < 0 || s > best_s || (s == best_s && t < best);
  }
  int64_t start_doc() const {
    int64_t best = -1;
    for (int64_t d = 0; d < g.N; ++d) {
      if (state[d] != 0) continue;
      if (o.start == Start::kFirstUnvisited) return d;
      if (best < 0 || degree[d] < degree[best]) best = d;
    }
    return best;
  }
  int64_t step_doc(int64_t c) const {
    int64_t best = -1;
    float best_s = 0;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t t = g.id(c, j);
      if (t >= 0 && state[t] == 0 && better(g.sim(c, j), t, best_s, best)) {
        best = t;
        best_s = g.sim(c, j);
      }
    }
    return best;
  }
  bool dedup() const { return !std::isnan(o.dedup_threshold); }
  void drop(int64_t d) {
    state[d] = 2;
    res.dropped.push_back(d);
  }
  bool may_place(int64_t d) {
    if (!dedup()) return true;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t t = g.id(d, j);
      if (t >= 0 && state[t] == 1 && g.sim(d, j) >= o.dedup_threshold) {
        drop(d);
        return false;
      }
    }
    return true;
  }
  void place(int64_t d) {
    state[d] = 1;
    res.order.push_back(d);
    if (!dedup()) return;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t t = g.id(d, j);
      if (t >= 0 && state[t] == 0 && g.sim(d, j) >= o.dedup_threshold) drop(t);
    }
  }
  OrderResult run() {
    std::vector<std::vector<int64_t>> chains;
    int64_t cur = -1;
    for (;;) {
      int64_t next = -1;
      const bool capped = o.max_chain_len > 0 && !chains.empty() &&
                          static_cast<int64_t>(chains.back().size()) >= o.max_chain_len;
      if (cur >= 0 && !capped) {
        do next = step_doc(cur);
        while (next >= 0 && !may_place(next));
      }
      if (next < 0) {
        do next = start_doc();
        while (next >= 0 && !may_place(next));
        if (next < 0) break;
        chains.emplace_back();
      }
      place(next);
      chains.back().push_back(next);
      cur = next;
    }
    if (o.merge_short_chains) chains = merge(chains);
    res.order.clear();
    res.chain_offsets.assign(1, 0);
    for (auto& c : chains) {
      if (c.empty()) continue;
      res.order.insert(res.order.end(), c.begin(), c.end());
      res.chain_offsets.push_back(static_cast<int64_t>(res.order.size()));
    }
    return res;
  }
  // Short chains' docs move before their best neighbour in a long chain; the rest stay.
  std::vector<std::vector<int64_t>> merge(const std::vector<std::vector<int64_t>>& chains) {
    std::map<int64_t, bool> in_long;
    for (auto& c : chains)
      if (static_cast<int64_t>(c.size()) >= o.max_chain_len)
        for (int64_t d : c) in_long[d] = true;
    std::map<int64_t, std::vector<int64_t>> before;  // target -> docs, in order
    std::vector<std::vector<int64_t>> kept(chains.size());
    for (size_t ci = 0; ci < chains.size(); ++ci) {
      const bool is_long = static_cast<int64_t>(chains[ci].size()) >= o.max_chain_len;
      for (int64_t d : chains[ci]) {
        if (is_long) continue;
        int64_t best = -1;
        float best_s = 0;
        for (int64_t j = 0; j < m; ++j) {
          const int64_t t = g.id(d, j);
          if (t >= 0 && in_long.count(t) && better(g.sim(d, j), t, best_s, best)) {
            best = t;
            best_s = g.sim(d, j);
          }
        }
        if (best >= 0)
          before[best].push_back(d);
        else
          kept[ci].push_back(d);
      }
    }
    std::vector<std::vector<int64_t>> out;
    for (size_t ci = 0; ci < chains.size(); ++ci) {
      if (static_cast<int64_t>(chains[ci].size()) >= o.max_chain_len) {
        std::vector<int64_t> c;
        for (int64_t d : chains[ci]) {
          auto it = before.find(d);
          if (it != before.end()) c.insert(c.end(), it->second.begin(), it->second.end());
          c.push_back(d);
        }
        out.push_back(c);
      } else {
        out.push_back(kept[ci]);
      }
    }
    return out;
  }
};

// ---- running the library ---------------------------------------------------------------------------

struct Run {
  Status status;
  const char* what = nullptr;
  OrderResult res;
};

// Every output of the order, poisoned, one element past its capacity (to see nothing is written there).
struct OrderOutputs {
  std::vector<int64_t> order, dropped, offsets;
  int64_t n = kPoison, nd = kPoison, nc = kPoison;
  explicit OrderOutputs(int64_t N) : order(N + 1, kPoison), dropped(N + 1, kPoison), offsets(N + 2, kPoison) {}
  lb::OrderArgs args(const lb::KnnGraphView& view, const lb::OrderOptions& o = {}) {
    lb::OrderArgs a;
    a.graph = view;
    a.options = o;
    a.order_out = order.data();
    a.num_out = &n;
    a.dropped_out = dropped.data();
    a.num_dropped = &nd;
    a.chain_offsets_out = offsets.data();
    a.num_chains = &nc;
    return a;
  }
  bool untouched() const {
    for (const auto* v : {&order, &dropped, &offsets})
      for (int64_t x : *v)
        if (x != kPoison) return false;
    return n == kPoison && nd == kPoison && nc == kPoison;
  }
};

Run run_order(const lb::KnnGraphView& view, lb::OrderOptions o) {
  const int64_t N = view.num_docs;
  OrderOutputs out(N);
  std::vector<int64_t>& order = out.order;
  std::vector<int64_t>& dropped = out.dropped;
  std::vector<int64_t>& offsets = out.offsets;
  const int64_t &n = out.n, &nd = out.nd, &nc = out.nc;
  const lb::OrderArgs a = out.args(view, o);
  Run run;
  size_t bytes = 0;
  run.status = lb::similarity_order(a, nullptr, bytes, &run.what);
  if (run.status != Status::kSuccess) return run;
  REQUIRE(bytes == lb::order_workspace_size(N));
  std::vector<unsigned char> ws(bytes + 16, 0xAB);  // garbage: the walk must initialise it
  run.status = lb::similarity_order(a, ws.data(), bytes, &run.what);
  if (run.status != Status::kSuccess) return run;
  REQUIRE(n >= 0);
  REQUIRE(nd >= 0);
  REQUIRE(n + nd == N);
  REQUIRE(nc >= 1);
  CHECK(order[n] == kPoison);  // nothing past the count
  CHECK(dropped[nd] == kPoison);
  CHECK(offsets[nc + 1] == kPoison);
  run.res.order.assign(order.begin(), order.begin() + n);
  run.res.dropped.assign(dropped.begin(), dropped.begin() + nd);
  run.res.chain_offsets.assign(offsets.begin(), offsets.begin() + nc + 1);
  return run;
}

Run run_order(const Graph& g, lb::OrderOptions o) { return run_order(g.view(), o); }

bool is_permutation_of(std::vector<int64_t> v, int64_t N) {
  std::sort(v.begin(), v.end());
  for (int64_t i = 0; i < static_cast<int64_t>(v.size()); ++i)
    if (v[i] != i) return false;
  return static_cast<int64_t>(v.size()) == N;
}

// Checks the walk rule step by step from the output alone (no dedup, no merge): each chain start is
// the minimum-(degree, id) unvisited doc (or the lowest unvisited id), taken only when the previous
// doc has no unvisited neighbour or the chain is full; each other doc is the best unvisited
// neighbour of the one before it.
void check_steps(const Graph& g, const lb::OrderOptions& o, const OrderResult& r) {
  Reference ref(g, o);  // for its degrees and its rule helpers, on its own visited state
  std::vector<bool> is_start(g.N + 1, false);
  for (size_t c = 0; c + 1 < r.chain_offsets.size(); ++c) is_start[r.chain_offsets[c]] = true;
  int64_t chain_len = 0;
  for (int64_t p = 0; p < g.N; ++p) {
    const int64_t d = r.order[p];
    if (is_start[p]) {
      if (p > 0) {
        const bool full = o.max_chain_len > 0 && chain_len >= o.max_chain_len;
        INFO("position " << p << ": a jump while the chain had room and the previous doc an unvisited neighbour");
        REQUIRE((full || ref.step_doc(r.order[p - 1]) < 0));
      }
      for (int64_t e = 0; e < g.N; ++e) {
        if (ref.state[e] != 0 || e == d) continue;
        INFO("position " << p << ": start " << d << " (degree " << ref.degree[d] << ") but " << e
                         << " (degree " << ref.degree[e] << ") is unvisited");
        if (o.start == Start::kMinDegree)
          REQUIRE((ref.degree[d] < ref.degree[e] || (ref.degree[d] == ref.degree[e] && d < e)));
        else
          REQUIRE(d < e);
      }
      chain_len = 0;
    } else {
      INFO("position " << p << ": " << d << " after " << r.order[p - 1]);
      REQUIRE(!(o.max_chain_len > 0 && chain_len >= o.max_chain_len));  // a full chain ends
      REQUIRE(ref.step_doc(r.order[p - 1]) == d);
    }
    REQUIRE(ref.state[d] == 0);
    ref.state[d] = 1;
    ++chain_len;
  }
}

lb::OrderOptions random_options(std::mt19937_64& rng, int64_t k, bool dedup, bool merge) {
  lb::OrderOptions o;
  o.neighbours_used = static_cast<int64_t>(rng() % (k + 1));
  o.max_chain_len = rng() % 2 ? static_cast<int64_t>(rng() % 6) : 0;
  o.start = rng() % 2 ? Start::kMinDegree : Start::kFirstUnvisited;
  if (merge) {
    o.max_chain_len = 1 + static_cast<int64_t>(rng() % 6);
    o.merge_short_chains = true;
  }
  if (dedup) o.dedup_threshold = 0.25f * static_cast<float>(rng() % 5) - 0.5f;
  return o;
}

}  // namespace

// ================================================================================================
// The order
// ================================================================================================

TEST_CASE("batching: a hand-checked graph", "[batching]") {
  // 0 <-> 1 strongly similar, 2 hangs off 0, 3 off 1; degrees: 0:4 1:4 2:2 3:2.
  Graph g;
  g.N = 4;
  g.k = 2;
  g.ids = {1, 2, 0, 3, 0, -1, 1, -1};
  g.sims = {.9f, .5f, .9f, .4f, .5f, 0.f, .4f, 0.f};
  const Run r = run_order(g, {});
  REQUIRE(r.status == Status::kSuccess);
  CHECK(r.res.order == std::vector<int64_t>{2, 0, 1, 3});  // start at 2 (degree 2, lower id than 3)
  CHECK(r.res.chain_offsets == std::vector<int64_t>{0, 4});
  lb::OrderOptions first;
  first.start = Start::kFirstUnvisited;
  CHECK(run_order(g, first).res.order == std::vector<int64_t>{0, 1, 3, 2});
  lb::OrderOptions capped;
  capped.max_chain_len = 2;  // 2 0 | then the minimum-degree start 3, and 1
  const Run c = run_order(g, capped);
  CHECK(c.res.order == std::vector<int64_t>{2, 0, 3, 1});
  CHECK(c.res.chain_offsets == std::vector<int64_t>{0, 2, 4});
}

TEST_CASE("batching: the order follows the greedy rule on random graphs", "[batching]") {
  auto rng = lory_test::make_rng("batching order");
  int graphs = 0;
  for (int it = 0; it < 400; ++it) {
    const int64_t N = 1 + static_cast<int64_t>(rng() % 40);
    const int64_t k = 1 + static_cast<int64_t>(rng() % 7);
    const Graph g = random_graph(rng, N, k, /*repeats=*/it % 3 == 0);
    const lb::OrderOptions o = random_options(rng, k, false, false);
    INFO("graph " << it << ": N " << N << " k " << k << " m " << o.neighbours_used << " cap "
                  << o.max_chain_len << " start " << static_cast<int>(o.start));
    const Run r = run_order(g, o);
    REQUIRE(r.status == Status::kSuccess);
    REQUIRE(is_permutation_of(r.res.order, N));
    REQUIRE(r.res.dropped.empty());
    check_steps(g, o, r.res);
    const OrderResult ref = Reference(g, o).run();
    REQUIRE(r.res.order == ref.order);
    REQUIRE(r.res.chain_offsets == ref.chain_offsets);
    ++graphs;
  }
  CHECK(graphs == 400);
}

TEST_CASE("batching: int32 and int64 ids, repeated runs and strided rows give one order", "[batching]") {
  auto rng = lory_test::make_rng("batching determinism");
  for (int it = 0; it < 50; ++it) {
    const int64_t N = 1 + static_cast<int64_t>(rng() % 60), k = 1 + static_cast<int64_t>(rng() % 6);
    const Graph g = random_graph(rng, N, k);
    const lb::OrderOptions o = random_options(rng, k, it % 2 == 0, it % 3 == 0);
    const Run a = run_order(g, o);
    const Run b = run_order(g, o);
    const std::vector<int32_t> ids32 = g.ids32();
    lb::KnnGraphView v32 = g.view();
    v32.ids64 = nullptr;
    v32.ids32 = ids32.data();
    const Run c = run_order(v32, o);
    REQUIRE(a.status == Status::kSuccess);
    REQUIRE(c.status == Status::kSuccess);
    CHECK(a.res.order == b.res.order);
    CHECK(a.res.order == c.res.order);
    CHECK(a.res.dropped == c.res.dropped);
    CHECK(a.res.chain_offsets == c.res.chain_offsets);
    // The same graph with a self column in front, skipped through the view's row stride.
    std::vector<int64_t> wide_ids(N * (k + 1));
    std::vector<float> wide_sims(N * (k + 1));
    for (int64_t r = 0; r < N; ++r) {
      wide_ids[r * (k + 1)] = r;
      wide_sims[r * (k + 1)] = 2.f;
      for (int64_t j = 0; j < k; ++j) {
        wide_ids[r * (k + 1) + 1 + j] = g.id(r, j);
        wide_sims[r * (k + 1) + 1 + j] = g.sim(r, j);
      }
    }
    const lb::KnnGraphView wide{N, k, k + 1, wide_ids.data() + 1, nullptr, wide_sims.data() + 1};
    const Run d = run_order(wide, o);
    REQUIRE(d.status == Status::kSuccess);
    CHECK(a.res.order == d.res.order);
  }
}

TEST_CASE("batching: near-duplicate removal", "[batching]") {
  auto rng = lory_test::make_rng("batching dedup");
  int64_t total_dropped = 0;
  for (int it = 0; it < 300; ++it) {
    const int64_t N = 1 + static_cast<int64_t>(rng() % 40), k = 1 + static_cast<int64_t>(rng() % 6);
    const Graph g = random_graph(rng, N, k, it % 4 == 0);
    const lb::OrderOptions o = random_options(rng, k, true, it % 2 == 0);
    INFO("graph " << it << " threshold " << o.dedup_threshold);
    const Run r = run_order(g, o);
    REQUIRE(r.status == Status::kSuccess);
    std::vector<int64_t> all = r.res.order;
    all.insert(all.end(), r.res.dropped.begin(), r.res.dropped.end());
    REQUIRE(is_permutation_of(all, N));
    // No two kept docs are near-duplicates; every dropped doc is a near-duplicate of a kept one.
    const int64_t m = o.neighbours_used == 0 ? k : o.neighbours_used;
    std::vector<int> kept(N, 0);
    for (int64_t d : r.res.order) kept[d] = 1;
    std::vector<int> covered(N, 0);
    for (int64_t x = 0; x < N; ++x)
      for (int64_t j = 0; j < m; ++j) {
        const int64_t y = g.id(x, j);
        if (y < 0 || !(g.sim(x, j) >= o.dedup_threshold)) continue;
        REQUIRE(!(kept[x] && kept[y]));
        if (kept[x]) covered[y] = 1;
        if (kept[y]) covered[x] = 1;
      }
    for (int64_t d : r.res.dropped) REQUIRE(covered[d]);
    const OrderResult ref = Reference(g, o).run();
    REQUIRE(r.res.order == ref.order);
    REQUIRE(r.res.dropped == ref.dropped);
    REQUIRE(r.res.chain_offsets == ref.chain_offsets);
    total_dropped += static_cast<int64_t>(r.res.dropped.size());
  }
  CHECK(total_dropped > 100);  // the cases did exercise dropping
}

TEST_CASE("batching: near-duplicates are dropped from both directions of an edge", "[batching]") {
  // 0 -> 1 at 0.95 (1 lists only 2); 2 -> 0 at 0.97 (0 does not list 2).
  Graph g;
  g.N = 3;
  g.k = 1;
  g.ids = {1, 2, 0};
  g.sims = {.95f, .1f, .97f};
  lb::OrderOptions o;
  o.start = Start::kFirstUnvisited;
  o.dedup_threshold = 0.9f;
  const Run r = run_order(g, o);
  REQUIRE(r.status == Status::kSuccess);
  // 0 placed, drops 1 (its edge); 2 reached by a jump is dropped by its own edge to placed 0.
  CHECK(r.res.order == std::vector<int64_t>{0});
  CHECK(r.res.dropped == std::vector<int64_t>{1, 2});
  o.dedup_threshold = 0.96f;
  const Run s = run_order(g, o);
  CHECK(s.res.order == std::vector<int64_t>{0, 1});
  CHECK(s.res.dropped == std::vector<int64_t>{2});
}

TEST_CASE("batching: merging short chains", "[batching]") {
  auto rng = lory_test::make_rng("batching merge");
  int64_t moved = 0;
  for (int it = 0; it < 300; ++it) {
    const int64_t N = 1 + static_cast<int64_t>(rng() % 50), k = 1 + static_cast<int64_t>(rng() % 6);
    const Graph g = random_graph(rng, N, k, it % 4 == 0);
    const lb::OrderOptions o = random_options(rng, k, false, true);
    INFO("graph " << it << " cap " << o.max_chain_len);
    lb::OrderOptions unmerged = o;
    unmerged.merge_short_chains = false;
    const Run before = run_order(g, unmerged);
    const Run r = run_order(g, o);
    REQUIRE(r.status == Status::kSuccess);
    REQUIRE(is_permutation_of(r.res.order, N));
    const OrderResult ref = Reference(g, o).run();
    REQUIRE(r.res.order == ref.order);
    REQUIRE(r.res.chain_offsets == ref.chain_offsets);
    // Long chains keep their docs' relative order.
    std::vector<int64_t> pos(N);
    for (int64_t p = 0; p < N; ++p) pos[r.res.order[p]] = p;
    for (size_t c = 0; c + 1 < before.res.chain_offsets.size(); ++c) {
      const int64_t b = before.res.chain_offsets[c], e = before.res.chain_offsets[c + 1];
      if (e - b < o.max_chain_len) continue;
      for (int64_t p = b + 1; p < e; ++p) REQUIRE(pos[before.res.order[p - 1]] < pos[before.res.order[p]]);
    }
    for (int64_t p = 0; p < N; ++p) moved += (r.res.order[p] != before.res.order[p]) ? 1 : 0;
  }
  CHECK(moved > 100);
}

TEST_CASE("batching: a short chain whose neighbours are all in it stays whole", "[batching]") {
  // Two cliques: {0,1,2} long (cap 3), {3,4} short with neighbours only in itself (the released
  // code's crash), and 5 whose best neighbour in a long chain is 1.
  Graph g;
  g.N = 6;
  g.k = 2;
  g.ids = {1, 2, 0, 2, 0, 1, 4, -1, 3, -1, 1, 3};
  g.sims = {.9f, .8f, .9f, .7f, .8f, .7f, .6f, 0.f, .6f, 0.f, .5f, .4f};
  lb::OrderOptions o;
  o.start = Start::kFirstUnvisited;
  o.max_chain_len = 3;
  o.merge_short_chains = true;
  const Run r = run_order(g, o);
  REQUIRE(r.status == Status::kSuccess);
  // Chains before merging: 0 1 2 | 3 4 | 5. Doc 5 moves before 1; 3 and 4 stay.
  CHECK(r.res.order == std::vector<int64_t>{0, 5, 1, 2, 3, 4});
  CHECK(r.res.chain_offsets == std::vector<int64_t>{0, 4, 6});
}

TEST_CASE("batching: a single document and a graph with no edges", "[batching]") {
  Graph one;
  one.N = 1;
  one.k = 3;
  one.ids = {-1, -1, -1};
  one.sims = {0.f, 0.f, 0.f};
  const Run r = run_order(one, {});
  REQUIRE(r.status == Status::kSuccess);
  CHECK(r.res.order == std::vector<int64_t>{0});
  Graph empty;
  empty.N = 7;
  empty.k = 1;
  empty.ids.assign(7, -1);
  empty.sims.assign(7, 0.f);
  const Run e = run_order(empty, {});
  CHECK(e.res.order == std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6});
  CHECK(e.res.chain_offsets.size() == 8);
}

// ================================================================================================
// Bad input for the order: a clear status, the argument named, nothing written
// ================================================================================================

TEST_CASE("batching: bad order input is refused and nothing is written", "[batching]") {
  auto rng = lory_test::make_rng("batching bad order");
  const Graph base = random_graph(rng, 12, 4);
  struct Case {
    const char* name;
    Status expected;
    const char* what;  // a substring of *what
    void (*mutate)(Graph&, lb::OrderArgs&);  // edits the graph's data in place, or the arguments
  };
  using A = lb::OrderArgs;
  const Case cases[] = {
      {"id out of range", Status::kErrorInvalidArgument, "graph.ids", [](Graph& g, A&) { g.ids[5] = g.N; }},
      {"self loop", Status::kErrorInvalidArgument, "self loop", [](Graph& g, A&) { g.ids[2 * g.k] = 2; g.sims[2 * g.k] = 9.f; }},
      {"NaN similarity", Status::kErrorInvalidArgument, "NaN", [](Graph& g, A&) { g.ids[7 * g.k] = 0; g.sims[7 * g.k] = std::nanf(""); }},
      {"row not sorted", Status::kErrorInvalidArgument, "sorted", [](Graph& g, A&) {
         g.ids[3 * g.k] = 0; g.ids[3 * g.k + 1] = 1; g.sims[3 * g.k] = .1f; g.sims[3 * g.k + 1] = .2f; }},
      {"neighbour after a missing one", Status::kErrorInvalidArgument, "missing", [](Graph& g, A&) {
         g.ids[4 * g.k] = -1; g.ids[4 * g.k + 1] = 0; }},
      {"k = 0", Status::kErrorInvalidSize, "graph.k", [](Graph&, A& a) { a.graph.k = 0; }},
      {"k < 0", Status::kErrorInvalidSize, "graph.k", [](Graph&, A& a) { a.graph.k = -2; }},
      {"N = 0", Status::kErrorInvalidSize, "graph.num_docs", [](Graph&, A& a) { a.graph.num_docs = 0; }},
      {"N * k overflows", Status::kErrorInvalidSize, "overflows", [](Graph&, A& a) { a.graph.num_docs = int64_t{1} << 61; }},
      {"workspace size overflows", Status::kErrorInvalidSize, "workspace size overflows", [](Graph&, A& a) {
         a.graph.num_docs = int64_t{1} << 59; a.graph.k = 1; }},
      {"row_stride < k", Status::kErrorInvalidShape, "row_stride", [](Graph&, A& a) { a.graph.row_stride = 2; }},
      {"both id arrays", Status::kErrorInvalidArgument, "both", [](Graph&, A& a) {
         static const int32_t ids32[48] = {}; a.graph.ids32 = ids32; }},
      {"no id array", Status::kErrorNullPointer, "neither", [](Graph&, A& a) { a.graph.ids64 = nullptr; }},
      {"no sims", Status::kErrorNullPointer, "graph.sims", [](Graph&, A& a) { a.graph.sims = nullptr; }},
      {"no order_out", Status::kErrorNullPointer, "order_out", [](Graph&, A& a) { a.order_out = nullptr; }},
      {"no num_out", Status::kErrorNullPointer, "num_out", [](Graph&, A& a) { a.num_out = nullptr; }},
      {"chain offsets without a count", Status::kErrorNullPointer, "num_chains", [](Graph&, A& a) { a.num_chains = nullptr; }},
      {"neighbours_used > k", Status::kErrorInvalidArgument, "neighbours_used", [](Graph&, A& a) { a.options.neighbours_used = 5; }},
      {"neighbours_used < 0", Status::kErrorInvalidArgument, "neighbours_used", [](Graph&, A& a) { a.options.neighbours_used = -1; }},
      {"max_chain_len < 0", Status::kErrorInvalidArgument, "max_chain_len", [](Graph&, A& a) { a.options.max_chain_len = -3; }},
      {"merge without a cap", Status::kErrorInvalidArgument, "merge_short_chains", [](Graph&, A& a) { a.options.merge_short_chains = true; }},
      {"start out of range", Status::kErrorInvalidArgument, "options.start", [](Graph&, A& a) { a.options.start = static_cast<Start>(7); }},
      {"dropped_out aliases order_out", Status::kErrorInvalidArgument, "dropped_out overlaps", [](Graph&, A& a) { a.dropped_out = a.order_out + 3; }},
      {"order_out inside the graph", Status::kErrorInvalidArgument, "order_out overlaps", [](Graph& g, A& a) {
         a.order_out = reinterpret_cast<int64_t*>(g.sims.data()) + 1; }},
  };
  for (size_t ci = 0; ci <= std::size(cases); ++ci) {  // the last pass: the unmutated arguments succeed
    const bool valid = ci == std::size(cases);
    const Case& c = cases[valid ? 0 : ci];
    INFO((valid ? "unmutated" : c.name));
    Graph g = base;
    OrderOutputs out(g.N);
    lb::OrderArgs args = out.args(g.view());
    if (!valid) c.mutate(g, args);
    const char* what = nullptr;
    std::vector<unsigned char> ws(lb::order_workspace_size(std::max<int64_t>(base.N, 1)), 0x11);
    size_t bytes = ws.size();
    const Status s = lb::similarity_order(args, ws.data(), bytes, &what);
    if (valid) {
      CHECK(s == Status::kSuccess);
      CHECK(out.n == base.N);
      continue;
    }
    CHECK(s == c.expected);
    REQUIRE(what != nullptr);
    CHECK(std::string(what).find(c.what) != std::string::npos);
    CHECK(lb::order_can_implement(args) == c.expected);
    CHECK(out.untouched());
    for (unsigned char b : ws) CHECK(b == 0x11);
  }
}

TEST_CASE("batching: the order's workspace protocol", "[batching]") {
  auto rng = lory_test::make_rng("batching workspace");
  const Graph g = random_graph(rng, 30, 3);
  std::vector<int64_t> order(30, kPoison);
  int64_t n = kPoison;
  lb::OrderArgs a;
  a.graph = g.view();
  a.order_out = order.data();
  a.num_out = &n;
  size_t bytes = 0;
  REQUIRE(lb::similarity_order(a, nullptr, bytes) == Status::kSuccess);
  CHECK(bytes >= 30 * 25);
  CHECK(n == kPoison);  // a size query writes no output
  std::vector<unsigned char> ws(bytes + 64);
  size_t small = bytes - 1;
  const char* what = nullptr;
  CHECK(lb::similarity_order(a, ws.data(), small, &what) == Status::kErrorWorkspaceTooSmall);
  CHECK(std::string(what) == "workspace");
  size_t enough = bytes;
  unsigned char* base = ws.data();
  while (reinterpret_cast<uintptr_t>(base) % 16 != 1) ++base;
  CHECK(lb::similarity_order(a, base, enough) == Status::kErrorMisalignedPointer);
  std::vector<int64_t> shared((bytes + 7) / 8 + 30, kPoison);
  a.order_out = shared.data() + 4;  // the workspace starts at shared.data() and covers order_out
  size_t covered = bytes;
  CHECK(lb::similarity_order(a, shared.data(), covered, &what) == Status::kErrorInvalidArgument);
  CHECK(std::string(what) == "workspace overlaps an output");
  for (int64_t x : shared) CHECK(x == kPoison);
  a.order_out = order.data();
  for (int64_t x : order) CHECK(x == kPoison);
  CHECK(n == kPoison);
}

// ================================================================================================
// Packing
// ================================================================================================
namespace {

struct Packed {
  Status status;
  const char* what = nullptr;
  lb::PackSizes sizes;
  std::vector<lb::PackedRange> ranges;
  std::vector<int64_t> seq_offsets;
};

Packed pack(const std::vector<int64_t>& order, const std::vector<int64_t>& counts, lb::PackOptions o) {
  Packed p;
  lb::PackArgs a;
  a.order = order.data();
  a.num_ordered = static_cast<int64_t>(order.size());
  a.doc_token_counts = counts.data();
  a.num_docs = static_cast<int64_t>(counts.size());
  a.options = o;
  a.sizes = &p.sizes;
  size_t bytes = 0;
  p.status = lb::pack_documents(a, nullptr, bytes, &p.what);
  if (p.status != Status::kSuccess) return p;
  const lb::PackSizes queried = p.sizes;
  p.ranges.assign(queried.num_ranges + 1, lb::PackedRange{kPoison, kPoison, kPoison, kPoison});
  p.seq_offsets.assign(queried.num_seqs + 2, kPoison);
  a.ranges_out = p.ranges.data();
  a.ranges_capacity = queried.num_ranges;
  a.seq_offsets_out = p.seq_offsets.data();
  a.seq_offsets_capacity = queried.num_seqs + 1;
  std::vector<uint64_t> ws(bytes / 8 + 1, ~uint64_t{0});
  p.sizes = lb::PackSizes{};
  p.status = lb::pack_documents(a, ws.data(), bytes, &p.what);
  if (p.status != Status::kSuccess) return p;
  REQUIRE(p.sizes.num_seqs == queried.num_seqs);
  REQUIRE(p.sizes.num_ranges == queried.num_ranges);
  REQUIRE(p.ranges.back().doc == kPoison);  // nothing past the count
  REQUIRE(p.seq_offsets.back() == kPoison);
  p.ranges.pop_back();
  p.seq_offsets.pop_back();
  return p;
}

// Plain token-level packer: the units as token lists, placed one token at a time.
std::vector<int32_t> reference_rows(const std::vector<int64_t>& order, const std::vector<std::vector<int32_t>>& docs,
                                    const lb::PackOptions& o, int64_t* dropped) {
  std::vector<std::vector<int32_t>> rows(1);
  for (int64_t d : order) {
    std::vector<int32_t> unit = docs[d];
    if (o.separator >= 0) unit.push_back(static_cast<int32_t>(o.separator));
    if (unit.empty()) continue;
    const int64_t L = o.seq_len, u = static_cast<int64_t>(unit.size());
    if (o.boundary == Boundary::kMove && !rows.back().empty() && u <= L &&
        static_cast<int64_t>(rows.back().size()) + u > L) {
      rows.back().resize(L, static_cast<int32_t>(o.pad_token));
      rows.emplace_back();
    }
    for (int32_t t : unit) {
      rows.back().push_back(t);
      if (static_cast<int64_t>(rows.back().size()) == L) rows.emplace_back();
    }
  }
  *dropped = 0;
  if (rows.back().empty()) {
    rows.pop_back();
  } else if (o.leftover == Leftover::kDrop) {
    *dropped = static_cast<int64_t>(rows.back().size());
    rows.pop_back();
  } else if (o.leftover == Leftover::kPad) {
    rows.back().resize(o.seq_len, static_cast<int32_t>(o.pad_token));
  }
  std::vector<int32_t> flat;
  for (auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  return flat;
}

}  // namespace

TEST_CASE("batching: packing against a plain token-level packer", "[batching]") {
  auto rng = lory_test::make_rng("batching pack");
  int cases = 0;
  for (int it = 0; it < 600; ++it) {
    const int64_t num_docs = static_cast<int64_t>(rng() % 12);
    std::vector<int64_t> counts(num_docs);
    std::vector<std::vector<int32_t>> docs(num_docs);
    std::vector<int32_t> tokens;
    std::vector<int64_t> doc_offsets{0};
    for (int64_t d = 0; d < num_docs; ++d) {
      counts[d] = rng() % 5 == 0 ? 0 : static_cast<int64_t>(rng() % 25);
      for (int64_t t = 0; t < counts[d]; ++t) docs[d].push_back(static_cast<int32_t>(1000 * (d + 1) + t));
      tokens.insert(tokens.end(), docs[d].begin(), docs[d].end());
      doc_offsets.push_back(static_cast<int64_t>(tokens.size()));
    }
    std::vector<int64_t> order(num_docs);
    for (int64_t d = 0; d < num_docs; ++d) order[d] = d;
    std::shuffle(order.begin(), order.end(), rng);
    order.resize(static_cast<size_t>(num_docs == 0 ? 0 : rng() % (num_docs + 1)));  // a subset (dedup)
    lb::PackOptions o;
    const int64_t Ls[] = {1, 2, 3, 5, 8, 16, 40};
    o.seq_len = Ls[rng() % 7];
    o.separator = rng() % 2 ? 7 : -1;
    o.boundary = rng() % 2 ? Boundary::kSplit : Boundary::kMove;
    o.leftover = static_cast<Leftover>(rng() % 3);
    o.pad_token = 3;
    INFO("case " << it << ": docs " << num_docs << " ordered " << order.size() << " L " << o.seq_len << " sep "
                 << o.separator << " boundary " << static_cast<int>(o.boundary) << " leftover "
                 << static_cast<int>(o.leftover));
    const Packed p = pack(order, counts, o);
    REQUIRE(p.status == Status::kSuccess);
    REQUIRE(static_cast<int64_t>(p.seq_offsets.size()) == p.sizes.num_seqs + 1);
    REQUIRE(p.seq_offsets.front() == 0);
    REQUIRE(p.seq_offsets.back() == p.sizes.num_ranges);

    // Ranges: within their docs; per sequence at most L tokens; the pieces of each doc in order.
    std::vector<int64_t> next_token(num_docs, 0), seps(num_docs, 0);
    int64_t packed = 0;
    for (int64_t s = 0; s < p.sizes.num_seqs; ++s) {
      int64_t len = 0;
      for (int64_t r = p.seq_offsets[s]; r < p.seq_offsets[s + 1]; ++r) {
        const lb::PackedRange& x = p.ranges[r];
        REQUIRE(x.doc >= 0);
        REQUIRE(x.doc < num_docs);
        REQUIRE(x.begin == next_token[x.doc]);  // every token exactly once, in order
        REQUIRE(x.end >= x.begin);
        REQUIRE(x.end <= counts[x.doc]);
        REQUIRE(seps[x.doc] == 0);              // nothing of a doc after its separator
        next_token[x.doc] = x.end;
        seps[x.doc] += x.separator;
        if (x.separator) REQUIRE(x.end == counts[x.doc]);
        REQUIRE((x.end > x.begin || x.separator == 1));  // no empty pieces
        len += x.end - x.begin + x.separator;
      }
      REQUIRE(len <= o.seq_len);
      REQUIRE(len > 0);
      if (o.boundary == Boundary::kSplit && s + 1 < p.sizes.num_seqs) REQUIRE(len == o.seq_len);
      packed += len;
    }
    REQUIRE(packed == p.sizes.packed_tokens);
    int64_t total = 0;
    for (int64_t d : order) total += counts[d] + (o.separator >= 0 ? 1 : 0);
    REQUIRE(packed + p.sizes.dropped_tokens == total);
    if (o.leftover != Leftover::kDrop) {
      for (int64_t d : order) {
        REQUIRE(next_token[d] == counts[d]);
        REQUIRE(seps[d] == (o.separator >= 0 ? 1 : 0));
      }
    }
    if (o.boundary == Boundary::kMove) {  // a doc that fits in a sequence is never split
      std::vector<int64_t> pieces(num_docs, 0);
      for (auto& x : p.ranges) ++pieces[x.doc];
      for (int64_t d : order)
        if (counts[d] + (o.separator >= 0 ? 1 : 0) <= o.seq_len && next_token[d] == counts[d]) REQUIRE(pieces[d] <= 1);
    }

    // The writer's rows against the plain packer's.
    int64_t ref_dropped = 0;
    const std::vector<int32_t> ref = reference_rows(order, docs, o, &ref_dropped);
    REQUIRE(ref_dropped == p.sizes.dropped_tokens);
    REQUIRE(static_cast<int64_t>(ref.size()) == p.sizes.output_tokens);
    std::vector<int32_t> out(ref.size() + 1, -99);
    lb::WriteArgs<int32_t> w;
    w.ranges = p.ranges.data();
    w.seq_offsets = p.seq_offsets.data();
    w.num_seqs = p.sizes.num_seqs;
    w.options = o;
    w.tokens = tokens.data();
    w.doc_offsets = doc_offsets.data();
    w.num_docs = num_docs;
    w.out = out.data();
    w.out_capacity = static_cast<int64_t>(ref.size());
    REQUIRE(lb::write_token_sequences(w) == Status::kSuccess);
    CHECK(out.back() == -99);
    out.pop_back();
    REQUIRE(out == ref);
    ++cases;
  }
  CHECK(cases == 600);
}

TEST_CASE("batching: packing by hand (boundaries, separators, leftovers)", "[batching]") {
  const std::vector<int64_t> counts = {5, 3, 0, 2};
  const std::vector<int64_t> order = {3, 0, 2, 1};
  lb::PackOptions o;
  o.seq_len = 4;
  o.separator = 9;
  // kSplit: units 3:[2 tok + sep] 0:[5 + sep] 2:[sep] 1:[3 + sep] = 3 + 6 + 1 + 4 = 14 tokens.
  // seq0 = 3[0,2)+sep, 0[0,1); seq1 = 0[1,5); seq2 = 0[5,5)+sep, 2 sep, 1[0,2); seq3 = 1[2,3)+sep.
  Packed p = pack(order, counts, o);
  REQUIRE(p.status == Status::kSuccess);
  CHECK(p.sizes.num_seqs == 4);
  CHECK(p.sizes.output_tokens == 16);
  CHECK(p.sizes.packed_tokens == 14);
  REQUIRE(p.sizes.num_ranges == 7);
  CHECK(p.seq_offsets == std::vector<int64_t>{0, 2, 3, 6, 7});
  const int64_t expect[7][4] = {{3, 0, 2, 1}, {0, 0, 1, 0}, {0, 1, 5, 0}, {0, 5, 5, 1}, {2, 0, 0, 1}, {1, 0, 2, 0}, {1, 2, 3, 1}};
  for (int r = 0; r < 7; ++r) {
    INFO("range " << r);
    CHECK(p.ranges[r].doc == expect[r][0]);
    CHECK(p.ranges[r].begin == expect[r][1]);
    CHECK(p.ranges[r].end == expect[r][2]);
    CHECK(p.ranges[r].separator == expect[r][3]);
  }
  o.leftover = Leftover::kDrop;
  p = pack(order, counts, o);
  CHECK(p.sizes.num_seqs == 3);
  CHECK(p.sizes.dropped_tokens == 2);
  o.leftover = Leftover::kKeepShort;
  p = pack(order, counts, o);
  CHECK(p.sizes.output_tokens == 14);
  // kMove: 3 (3 tok) | 0 (6 > 4: split from where it is: 1 more in seq0) ...
  o.boundary = Boundary::kMove;
  o.leftover = Leftover::kPad;
  p = pack(order, counts, o);
  // seq0 = 3[0,2)+sep, 0[0,1); seq1 = 0[1,5); seq2 = 0 sep, 2 sep, (1: 4 tokens do not fit in 2) pad;
  // seq3 = 1[0,3)+sep.
  CHECK(p.seq_offsets == std::vector<int64_t>{0, 2, 3, 5, 6});
  CHECK(p.sizes.packed_tokens == 14);
  CHECK(p.sizes.output_tokens == 16);
  // Nothing to pack: zero sequences, and the one offset is still written.
  p = pack({}, {}, o);
  REQUIRE(p.status == Status::kSuccess);
  CHECK(p.sizes.num_seqs == 0);
  CHECK(p.seq_offsets == std::vector<int64_t>{0});
  CHECK(lb::pack_workspace_size(0) > 0);
  // No separator, L = 1: one token per sequence, empty docs vanish.
  o = lb::PackOptions{};
  o.seq_len = 1;
  p = pack(order, counts, o);
  CHECK(p.sizes.num_seqs == 10);
  CHECK(p.sizes.num_ranges == 10);
}

TEST_CASE("batching: bad packing input is refused and nothing is written", "[batching]") {
  struct Case {
    const char* name;
    Status expected;
    const char* what;
    void (*mutate)(lb::PackArgs&, std::vector<int64_t>&, std::vector<int64_t>&);
  };
  const Case cases[] = {
      {"L = 0", Status::kErrorInvalidSize, "seq_len", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>&) { a.options.seq_len = 0; }},
      {"L < 0", Status::kErrorInvalidSize, "seq_len", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>&) { a.options.seq_len = -4; }},
      {"negative count", Status::kErrorInvalidArgument, "negative count", [](lb::PackArgs&, std::vector<int64_t>&, std::vector<int64_t>& c) { c[2] = -1; }},
      {"counts overflow", Status::kErrorInvalidSize, "overflows", [](lb::PackArgs&, std::vector<int64_t>&, std::vector<int64_t>& c) {
         c[0] = INT64_MAX / 2; c[1] = INT64_MAX / 2; }},
      {"id out of range", Status::kErrorInvalidArgument, "out of range", [](lb::PackArgs&, std::vector<int64_t>& o, std::vector<int64_t>&) { o[1] = 6; }},
      {"negative id", Status::kErrorInvalidArgument, "out of range", [](lb::PackArgs&, std::vector<int64_t>& o, std::vector<int64_t>&) { o[1] = -1; }},
      {"repeated doc", Status::kErrorInvalidArgument, "twice", [](lb::PackArgs&, std::vector<int64_t>& o, std::vector<int64_t>&) { o[3] = o[0]; }},
      {"more ordered than docs", Status::kErrorInvalidShape, "num_ordered", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>&) { a.num_ordered = 7; }},
      {"no order", Status::kErrorNullPointer, "order", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>&) { a.order = nullptr; }},
      {"no counts", Status::kErrorNullPointer, "doc_token_counts", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>&) { a.doc_token_counts = nullptr; }},
      {"no sizes", Status::kErrorNullPointer, "sizes", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>&) { a.sizes = nullptr; }},
      {"separator < -1", Status::kErrorInvalidArgument, "separator", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>&) { a.options.separator = -2; }},
      {"ranges too small", Status::kErrorInvalidSize, "ranges_capacity", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>&) { a.ranges_capacity -= 1; }},
      {"offsets too small", Status::kErrorInvalidSize, "seq_offsets_capacity", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>&) { a.seq_offsets_capacity -= 1; }},
      {"no ranges", Status::kErrorNullPointer, "ranges_out", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>&) { a.ranges_out = nullptr; }},
      {"ranges alias offsets", Status::kErrorInvalidArgument, "overlaps", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>&) {
         a.seq_offsets_out = reinterpret_cast<int64_t*>(a.ranges_out) + 5; }},
      {"offsets alias the counts", Status::kErrorInvalidArgument, "overlaps", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>& c) {
         a.seq_offsets_out = c.data(); }},
      {"bad boundary", Status::kErrorInvalidArgument, "boundary", [](lb::PackArgs& a, std::vector<int64_t>&, std::vector<int64_t>&) { a.options.boundary = static_cast<Boundary>(5); }},
  };
  for (size_t ci = 0; ci <= std::size(cases); ++ci) {  // the last pass: the unmutated arguments succeed
    const bool valid = ci == std::size(cases);
    const Case& c = cases[valid ? 0 : ci];
    INFO((valid ? "unmutated" : c.name));
    std::vector<int64_t> counts = {5, 3, 0, 2, 8, 1};
    std::vector<int64_t> order = {3, 0, 2, 1, 5};
    lb::PackSizes sizes{kPoison, kPoison, kPoison, kPoison, kPoison};
    std::vector<lb::PackedRange> ranges(64, lb::PackedRange{kPoison, kPoison, kPoison, kPoison});
    std::vector<int64_t> offsets(64, kPoison);
    lb::PackArgs a;
    a.num_ordered = static_cast<int64_t>(order.size());
    a.num_docs = static_cast<int64_t>(counts.size());
    a.options.seq_len = 4;
    a.options.separator = 0;
    a.ranges_out = ranges.data();
    a.ranges_capacity = 8;        // exactly what this packing needs
    a.seq_offsets_out = offsets.data();
    a.seq_offsets_capacity = 5;   // 4 sequences + 1
    a.sizes = &sizes;
    a.order = order.data();
    a.doc_token_counts = counts.data();
    if (!valid) c.mutate(a, order, counts);
    const char* what = nullptr;
    std::vector<uint64_t> ws(4, 0x1234);
    size_t bytes = 32;
    const Status s = lb::pack_documents(a, ws.data(), bytes, &what);
    if (valid) {
      CHECK(s == Status::kSuccess);
      CHECK(sizes.num_seqs == 4);
      CHECK(sizes.num_ranges == 8);
      continue;
    }
    CHECK(s == c.expected);
    REQUIRE(what != nullptr);
    CHECK(std::string(what).find(c.what) != std::string::npos);
    for (auto& r : ranges) CHECK(r.doc == kPoison);
    for (int64_t x : offsets) CHECK(x == kPoison);
    CHECK(sizes.num_seqs == kPoison);
    CHECK(sizes.num_ranges == kPoison);
  }
}

TEST_CASE("batching: bad writer input is refused and nothing is written", "[batching]") {
  const std::vector<int64_t> counts = {5, 3};
  const std::vector<int16_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8};
  const std::vector<int64_t> doc_offsets = {0, 5, 8};
  lb::PackOptions o;
  o.seq_len = 5;
  o.separator = 9;
  const Packed p = pack({0, 1}, counts, o);
  REQUIRE(p.status == Status::kSuccess);
  struct Case {
    const char* name;
    Status expected;
    const char* what;
    void (*mutate)(lb::WriteArgs<int16_t>&, std::vector<lb::PackedRange>&, std::vector<int64_t>&);
  };
  const Case cases[] = {
      {"range past its doc", Status::kErrorInvalidArgument, "outside", [](lb::WriteArgs<int16_t>&, std::vector<lb::PackedRange>& r, std::vector<int64_t>&) { r[1].end = 6; }},
      {"range reversed", Status::kErrorInvalidArgument, "outside", [](lb::WriteArgs<int16_t>&, std::vector<lb::PackedRange>& r, std::vector<int64_t>&) { r[0].begin = 3; r[0].end = 2; }},
      {"doc out of range", Status::kErrorInvalidArgument, "doc out of range", [](lb::WriteArgs<int16_t>&, std::vector<lb::PackedRange>& r, std::vector<int64_t>&) { r[0].doc = 2; }},
      {"sequence longer than L", Status::kErrorInvalidShape, "longer", [](lb::WriteArgs<int16_t>& w, std::vector<lb::PackedRange>&, std::vector<int64_t>&) { w.options.seq_len = 4; }},
      {"decreasing doc offsets", Status::kErrorInvalidArgument, "doc_offsets", [](lb::WriteArgs<int16_t>&, std::vector<lb::PackedRange>&, std::vector<int64_t>& d) { d[1] = 9; }},
      {"separator flag without a separator", Status::kErrorInvalidArgument, "separator", [](lb::WriteArgs<int16_t>& w, std::vector<lb::PackedRange>&, std::vector<int64_t>&) { w.options.separator = -1; }},
      {"separator does not fit the token type", Status::kErrorInvalidArgument, "does not fit", [](lb::WriteArgs<int16_t>& w, std::vector<lb::PackedRange>&, std::vector<int64_t>&) { w.options.separator = 40000; }},
      {"output too small", Status::kErrorInvalidSize, "out_capacity", [](lb::WriteArgs<int16_t>& w, std::vector<lb::PackedRange>&, std::vector<int64_t>&) { w.out_capacity -= 1; }},
      {"rows overflow", Status::kErrorInvalidSize, "overflows", [](lb::WriteArgs<int16_t>& w, std::vector<lb::PackedRange>&, std::vector<int64_t>&) { w.options.seq_len = INT64_MAX / 2 + 1; }},
      {"output aliases the offsets", Status::kErrorInvalidArgument, "overlaps", [](lb::WriteArgs<int16_t>& w, std::vector<lb::PackedRange>&, std::vector<int64_t>& d) {
         w.out = reinterpret_cast<int16_t*>(d.data()); w.out_capacity = 12; }},
      {"no output", Status::kErrorNullPointer, "out", [](lb::WriteArgs<int16_t>& w, std::vector<lb::PackedRange>&, std::vector<int64_t>&) { w.out = nullptr; }},
  };
  for (size_t ci = 0; ci <= std::size(cases); ++ci) {  // the last pass: the unmutated arguments succeed
    const bool valid = ci == std::size(cases);
    const Case& c = cases[valid ? 0 : ci];
    INFO((valid ? "unmutated" : c.name));
    std::vector<lb::PackedRange> ranges = p.ranges;
    std::vector<int64_t> offs = doc_offsets;
    std::vector<int16_t> out(p.sizes.output_tokens + 4, -7);
    lb::WriteArgs<int16_t> w;
    w.ranges = ranges.data();
    w.seq_offsets = p.seq_offsets.data();
    w.num_seqs = p.sizes.num_seqs;
    w.options = o;
    w.tokens = tokens.data();
    w.doc_offsets = offs.data();
    w.num_docs = 2;
    w.out = out.data();
    w.out_capacity = p.sizes.output_tokens;
    if (!valid) c.mutate(w, ranges, offs);
    const char* what = nullptr;
    const Status s = lb::write_token_sequences(w, &what);
    if (valid) {
      CHECK(s == Status::kSuccess);
      CHECK(out[0] == 1);
      continue;
    }
    CHECK(s == c.expected);
    REQUIRE(what != nullptr);
    CHECK(std::string(what).find(c.what) != std::string::npos);
    for (int16_t x : out) CHECK(x == -7);
  }
}

#if LORY_HAS_MMAP
TEST_CASE("batching: a graph read through MappedFile", "[batching]") {
  auto rng = lory_test::make_rng("batching mapped file");
  const Graph g = random_graph(rng, 300, 5);
  const std::string prefix =
      (std::filesystem::temp_directory_path() / ("lory_test_batching_" + std::to_string(lory_test::test_seed()))).string();
  for (const auto& [suffix, data, bytes] :
       {std::tuple<const char*, const void*, size_t>{".ids", g.ids.data(), g.ids.size() * 8},
        std::tuple<const char*, const void*, size_t>{".sims", g.sims.data(), g.sims.size() * 4}}) {
    FILE* f = std::fopen((prefix + suffix).c_str(), "wb");
    REQUIRE(f != nullptr);
    REQUIRE(std::fwrite(data, 1, bytes, f) == bytes);
    REQUIRE(std::fclose(f) == 0);
  }
  lb::MappedFile ids, sims;
  REQUIRE(ids.open((prefix + ".ids").c_str()) == Status::kSuccess);
  REQUIRE(sims.open((prefix + ".sims").c_str()) == Status::kSuccess);
  std::remove((prefix + ".ids").c_str());  // the mappings stay valid
  std::remove((prefix + ".sims").c_str());
  REQUIRE(ids.count<int64_t>() == 300 * 5);
  REQUIRE(sims.count<float>() == 300 * 5);
  CHECK(ids.as<int64_t>()[7] == g.ids[7]);
  CHECK(ids.as<SevenBytes>() == nullptr);  // 12000 bytes is not a whole number of 7-byte records
  const Run mapped = run_order(lb::KnnGraphView{300, 5, 0, ids.as<int64_t>(), nullptr, sims.as<float>()}, {});
  const Run in_memory = run_order(g, {});
  REQUIRE(mapped.status == Status::kSuccess);
  CHECK(mapped.res.order == in_memory.res.order);
  lb::MappedFile moved = std::move(ids);
  CHECK(ids.as<int64_t>() == nullptr);
  CHECK(moved.count<int64_t>() == 300 * 5);
  lb::MappedFile missing;
  CHECK(missing.open((prefix + ".none").c_str()) == Status::kErrorInvalidArgument);
  CHECK(missing.open(nullptr) == Status::kErrorNullPointer);
}
#endif
