// lory: similarity batching on the host -- the order in which documents enter training sequences
// (a greedy max-similarity path over a kNN graph, as In-Context Pretraining builds it) and the
// packing of ordered documents into fixed-length sequences.
//
// Host C++17 only: standard headers and lory's own host headers, no CUDA. Every entry point takes
// an arguments struct, validates everything before it writes anything, returns a Status and, on
// failure, records the argument at fault and why in lory::last_error_detail() (lory/status.hpp),
// like every lory entry point. Memory is the
// caller's: outputs and the workspace are caller-allocated, with a size query where a size is not
// known up front (a null workspace asks for its size, as everywhere in lory).
//
// ---- the kNN graph ------------------------------------------------------------------------------
// Row r of the graph lists up to k neighbours of document r, most similar first:
//   ids[r * row_stride + j], sims[r * row_stride + j], j < k   (row_stride 0 means k).
// A negative id marks a missing neighbour (FAISS writes -1); once a row has a missing entry, the
// rest of the row must be missing too, and the similarities of missing entries are never read.
// Valid entries must satisfy: 0 <= id < N, id != r (no self loops: a FAISS search of the corpus
// against itself returns each document as its own first neighbour -- point the view one column
// in, with k - 1 columns and row_stride k, to skip it), similarity not NaN, and similarities
// non-increasing along the row. A row may repeat an id (it then counts twice in the degree).
// The graph may be memory-mapped: it is only read, row by row.
//
// ---- the order (similarity_order) -----------------------------------------------------------------
// Only the first m = options.neighbours_used columns are used (0: all k). Let the *edges* be the
// valid entries among them.
//   degree(d)  = out-degree + in-degree of d over the edges (the number of edges touching d;
//                an edge listed by both ends counts twice).
//   start doc  = kMinDegree: the unvisited doc of minimum degree, ties to the lower id (the paper);
//                kFirstUnvisited: the unvisited doc of lowest id (the released code starts
//                anywhere; this is its deterministic form).
//   step       = from the current doc c, go to the unvisited doc t among c's edges with the
//                highest similarity sim(c, t) (as c's row lists it), ties to the lower id.
// The walk places a start doc, steps while it can, and when c has no unvisited neighbour (or the
// current chain already holds max_chain_len docs) it jumps to the next start doc. The docs between
// two jumps form a *chain*; the order is the concatenation of the chains. Every rule is a strict
// total order on docs, so the result is the same on every machine.
//
// Near-duplicate removal (dedup_threshold not NaN): two docs are near-duplicates when an edge
// between them (either direction) has similarity >= dedup_threshold. A doc about to be placed is
// dropped instead when one of its own edges reaches an already placed doc with similarity >= the
// threshold; when a doc is placed, every unvisited doc that its edges reach with similarity >= the
// threshold is dropped. So no two placed docs are near-duplicates, and the first one the walk
// reaches is the one kept. Dropped docs are never placed or stepped through; they are listed in
// dropped_out (when given) in the order they were dropped.
//
// Short-chain merging (merge_short_chains, needs max_chain_len > 0; the released ICLM code does
// this with 21): a chain with fewer than max_chain_len docs is *short*, the others are *long*.
// Every doc of a short chain moves to just before its best neighbour (highest similarity among
// its edges, ties to the lower id) that lies in a long chain; docs moving before the same doc keep
// their relative order. A doc with no neighbour in a long chain stays where it was (its chain's
// remaining docs keep their place and order): the released code crashes on that case. Targets are
// restricted to long chains so the result does not depend on the order chains are visited in.
//
// Cost: O(N m) time after the O(N k) validation; the workspace is order_workspace_size(N) bytes
// (about 25 bytes per doc), independent of k.
//
// ---- packing (pack_documents, write_token_sequences) -----------------------------------------------
// Each doc d of the order contributes its counts[d] tokens followed by a separator token when
// options.separator >= 0 (its *unit*). Units fill sequences of L = seq_len tokens:
//   kSplit: units are concatenated and cut every L tokens; a doc (and its separator) may straddle
//           sequences. A unit that ends exactly at a boundary before its separator puts the
//           separator alone at the start of the next sequence (an empty token range with
//           separator = 1), so every token and separator appears exactly once.
//   kMove:  a unit that does not fit in the space left in the current sequence, but would fit in
//           an empty one, closes the current sequence (its tail is padded with pad_token) and
//           starts the next one. A unit longer than L is split as in kSplit, starting right where
//           the current sequence is (it must be split anyway, so no space is wasted on it).
// The last sequence, when shorter than L (the leftover):
//   kDrop:      dropped, with its tokens (they appear in no range; sizes.dropped_tokens counts them);
//   kPad:       padded with pad_token to L;
//   kKeepShort: kept short: the writer's last row has only its real tokens.
// The output is token ranges, nothing is copied: ranges[seq_offsets[s] .. seq_offsets[s+1]) are
// sequence s's pieces in order; each names a doc and its token range [begin, end), and whether the
// doc's separator follows the piece. Empty docs without a separator produce no range.
// write_token_sequences turns ranges plus the docs' tokens into the token rows: row s starts at
// out[s * L] and holds L tokens (the last holds fewer only with kKeepShort).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "lory/config.hpp"
#include "lory/detail/validate.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN
namespace batching {

// ================================================================================================
// Arguments
// ================================================================================================

struct KnnGraphView {
  int64_t num_docs = 0;            // N
  int64_t k = 0;                   // columns per row
  int64_t row_stride = 0;          // elements from one row to the next (0: k); >= k
  const int64_t* ids64 = nullptr;  // [N, row_stride] neighbour ids, or
  const int32_t* ids32 = nullptr;  // [N, row_stride] (exactly one of the two)
  const float* sims = nullptr;     // [N, row_stride] similarities, non-increasing along each row
  int64_t stride() const { return row_stride == 0 ? k : row_stride; }
};

struct OrderOptions {
  enum class Start { kMinDegree, kFirstUnvisited };
  int64_t neighbours_used = 0;        // m: use the first m columns only (0: all k); ICLM's code: 9
  int64_t max_chain_len = 0;          // start a new chain after this many docs (0: no cap); ICLM's code: 21
  bool merge_short_chains = false;    // move short chains' docs into long chains (needs max_chain_len)
  Start start = Start::kMinDegree;    // kMinDegree: the paper; kFirstUnvisited: the released code's
  float dedup_threshold = std::numeric_limits<float>::quiet_NaN();  // NaN: no near-duplicate removal
  bool dedup() const { return !std::isnan(dedup_threshold); }
};

struct OrderArgs {
  KnnGraphView graph;
  OrderOptions options;
  int64_t* order_out = nullptr;          // [N] capacity: the placed docs, in order
  int64_t* num_out = nullptr;            // out: how many docs were placed (N without dedup)
  int64_t* dropped_out = nullptr;        // optional [N] capacity: the dropped docs (dedup)
  int64_t* num_dropped = nullptr;        // optional out: how many were dropped
  int64_t* chain_offsets_out = nullptr;  // optional [N + 1] capacity: chain c is
                                         //   order_out[offsets[c], offsets[c + 1])
  int64_t* num_chains = nullptr;         // out, required with chain_offsets_out
};

struct PackOptions {
  enum class Boundary { kSplit, kMove };
  enum class Leftover { kDrop, kPad, kKeepShort };
  int64_t seq_len = 0;                   // L
  int64_t separator = -1;                // token after every doc; -1: none
  Boundary boundary = Boundary::kSplit;
  Leftover leftover = Leftover::kPad;
  int64_t pad_token = 0;                 // fills kMove's early-closed sequences and kPad's leftover
};

// Tokens [begin, end) of doc, then its separator when separator == 1. Four int64 so that an
// array of ranges is an [R, 4] int64 tensor.
struct PackedRange {
  int64_t doc;
  int64_t begin;
  int64_t end;
  int64_t separator;
};
static_assert(sizeof(PackedRange) == 4 * sizeof(int64_t), "PackedRange is four int64");

struct PackSizes {
  int64_t num_seqs = 0;        // sequences kept
  int64_t num_ranges = 0;      // ranges in them
  int64_t output_tokens = 0;   // tokens the writer writes (rows, padding included)
  int64_t packed_tokens = 0;   // real tokens (doc tokens + separators) in them
  int64_t dropped_tokens = 0;  // tokens of a dropped leftover (kDrop)
};

struct PackArgs {
  const int64_t* order = nullptr;             // [num_ordered] distinct doc ids, in packing order
  int64_t num_ordered = 0;
  const int64_t* doc_token_counts = nullptr;  // [num_docs] tokens of each doc (>= 0)
  int64_t num_docs = 0;
  PackOptions options;
  PackedRange* ranges_out = nullptr;          // [ranges_capacity]
  int64_t ranges_capacity = 0;
  int64_t* seq_offsets_out = nullptr;         // [seq_offsets_capacity] >= num_seqs + 1
  int64_t seq_offsets_capacity = 0;
  PackSizes* sizes = nullptr;                 // out (both phases)
};

template <class Token>
struct WriteArgs {
  const PackedRange* ranges = nullptr;    // as pack_documents wrote them
  const int64_t* seq_offsets = nullptr;   // [num_seqs + 1]
  int64_t num_seqs = 0;
  PackOptions options;                    // the same options the ranges were packed with
  const Token* tokens = nullptr;          // every doc's tokens, doc d's at [doc_offsets[d], doc_offsets[d+1])
  const int64_t* doc_offsets = nullptr;   // [num_docs + 1], non-decreasing, doc_offsets[0] >= 0
  int64_t num_docs = 0;
  Token* out = nullptr;                   // [out_capacity] token rows
  int64_t out_capacity = 0;
};

// ================================================================================================
// Validation
// ================================================================================================
namespace detail {

// Failures are recorded in the library's per-thread error detail (lory::last_error_detail()).
using LORY_NS_QUALIFIER::detail::fail;

// Overflow-free: rows * cols elements of `elem` bytes are addressable.
inline bool bytes_fit(int64_t rows, int64_t cols, int64_t elem) {
  return LORY_NS_QUALIFIER::detail::mul_fits(rows, cols) &&
         LORY_NS_QUALIFIER::detail::mul_fits(rows * cols, elem);
}

// Byte ranges [a, a + a_bytes) and [b, b + b_bytes) share a byte (null or empty ranges never do).
inline bool overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  if (!a || !b || a_bytes == 0 || b_bytes == 0) return false;
  const uintptr_t x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x < y + b_bytes && y < x + a_bytes;
}

template <class Id>
Status validate_rows(const KnnGraphView& g, const Id* ids) {
  const int64_t N = g.num_docs, k = g.k, stride = g.stride();
  for (int64_t r = 0; r < N; ++r) {
    const Id* row = ids + r * stride;
    const float* srow = g.sims + r * stride;
    bool missing = false;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t id = static_cast<int64_t>(row[j]);
      if (id < 0) {
        missing = true;
        continue;
      }
      if (missing) return fail(Status::kErrorInvalidArgument, "graph.ids", "a neighbour after a missing one");
      if (id >= N) return fail(Status::kErrorInvalidArgument, "graph.ids", "neighbour id >= num_docs");
      if (id == r) return fail(Status::kErrorInvalidArgument, "graph.ids", "self loop");
      if (std::isnan(srow[j])) return fail(Status::kErrorInvalidArgument, "graph.sims", "NaN");
      if (j > 0 && srow[j] > srow[j - 1])
        return fail(Status::kErrorInvalidArgument, "graph.sims", "row not sorted in descending order");
    }
  }
  return Status::kSuccess;
}

}  // namespace detail

// The graph's sizes and pointers only (O(1)).
inline Status validate_graph_shape(const KnnGraphView& g) {
  LORY_NS_QUALIFIER::detail::clear_error_detail();
  using detail::fail;
  if (g.num_docs <= 0) return fail(Status::kErrorInvalidSize, "graph.num_docs", "must be > 0");
  if (g.k <= 0) return fail(Status::kErrorInvalidSize, "graph.k", "must be > 0");
  if (g.row_stride < 0 || (g.row_stride != 0 && g.row_stride < g.k))
    return fail(Status::kErrorInvalidShape, "graph.row_stride", "must be 0 or >= k");
  if (!detail::bytes_fit(g.num_docs, g.stride(), 8))
    return fail(Status::kErrorInvalidSize, "graph.num_docs", "num_docs * row_stride overflows");
  if (g.ids64 && g.ids32) return fail(Status::kErrorInvalidArgument, "graph.ids64", "both graph.ids64 and graph.ids32 given");
  if (!g.ids64 && !g.ids32) return fail(Status::kErrorNullPointer, "graph.ids64", "neither graph.ids64 nor graph.ids32 given");
  if (!g.sims) return fail(Status::kErrorNullPointer, "graph.sims", "is null");
  return Status::kSuccess;
}

// The whole graph: shape, then every row (O(N k), one pass).
inline Status validate_graph(const KnnGraphView& g) {
  LORY_RETURN_IF_ERROR(validate_graph_shape(g));
  return g.ids64 ? detail::validate_rows(g, g.ids64) : detail::validate_rows(g, g.ids32);
}

// Options and output pointers (O(1)), for a graph of valid shape.
inline Status validate_order_options(const OrderArgs& a) {
  using detail::fail;
  const OrderOptions& o = a.options;
  if (a.graph.num_docs > INT64_MAX / 32)
    return fail(Status::kErrorInvalidSize, "graph.num_docs", "the workspace size overflows");
  if (o.neighbours_used < 0 || o.neighbours_used > a.graph.k)
    return fail(Status::kErrorInvalidArgument, "options.neighbours_used", "must be in [0, k]");
  if (o.max_chain_len < 0) return fail(Status::kErrorInvalidArgument, "options.max_chain_len", "negative");
  if (o.merge_short_chains && o.max_chain_len == 0)
    return fail(Status::kErrorInvalidArgument, "options.merge_short_chains", "needs options.max_chain_len > 0");
  if (o.start != OrderOptions::Start::kMinDegree && o.start != OrderOptions::Start::kFirstUnvisited)
    return fail(Status::kErrorInvalidArgument, "options.start", "not one of the enum's values");
  if (!a.order_out) return fail(Status::kErrorNullPointer, "order_out", "is null");
  if (!a.num_out) return fail(Status::kErrorNullPointer, "num_out", "is null");
  if (a.chain_offsets_out && !a.num_chains)
    return fail(Status::kErrorNullPointer, "num_chains", "required with chain_offsets_out");
  // The outputs may not overlap one another or the graph.
  const KnnGraphView& g = a.graph;
  const size_t n = static_cast<size_t>(g.num_docs) * 8;
  const size_t entries = static_cast<size_t>(g.num_docs) * static_cast<size_t>(g.stride());
  const void* ids = g.ids64 ? static_cast<const void*>(g.ids64) : static_cast<const void*>(g.ids32);
  const size_t id_bytes = entries * (g.ids64 ? 8 : 4);
  struct Out { const void* p; size_t bytes; const char* name; };
  const Out outs[] = {{a.order_out, n, "order_out"}, {a.dropped_out, n, "dropped_out"},
                      {a.chain_offsets_out, n + 8, "chain_offsets_out"}};
  for (size_t i = 0; i < 3; ++i) {
    if (detail::overlap(outs[i].p, outs[i].bytes, ids, id_bytes) ||
        detail::overlap(outs[i].p, outs[i].bytes, g.sims, entries * 4))
      return fail(Status::kErrorInvalidArgument, outs[i].name, "overlaps another output or the graph");
    for (size_t j = 0; j < i; ++j)
      if (detail::overlap(outs[i].p, outs[i].bytes, outs[j].p, outs[j].bytes))
        return fail(Status::kErrorInvalidArgument, outs[i].name, "overlaps another output or the graph");
  }
  return Status::kSuccess;
}

// Everything similarity_order checks: shapes, options, outputs, then every row of the graph.
inline Status order_can_implement(const OrderArgs& a) {
  LORY_NS_QUALIFIER::detail::clear_error_detail();
  LORY_RETURN_IF_ERROR(validate_graph_shape(a.graph));
  LORY_RETURN_IF_ERROR(validate_order_options(a));
  return validate_graph(a.graph);
}

// Workspace of similarity_order for N docs: a state byte, a visited bit and three int64 per doc.
inline size_t order_workspace_size(int64_t num_docs) {
  if (num_docs <= 0) return 0;
  const size_t n = static_cast<size_t>(num_docs);
  using LORY_NS_QUALIFIER::detail::align_up;
  return align_up(n) + align_up((n + 63) / 64 * 8) + align_up(n * 8) + align_up((n + 2) * 8) + align_up(n * 8);
}

// ================================================================================================
// similarity_order
// ================================================================================================
namespace detail {

enum : uint8_t {
  kUnvisited = 0,
  kPlaced = 1,
  kDropped = 2,
  kStateMask = 3,
  kLong = 4,        // placed in a long chain (merge)
  kMoved = 8,       // moves into a long chain (merge)
  kChainStart = 16  // first doc of its chain
};

template <class Id>
class OrderWalk {
 public:
  OrderWalk(const OrderArgs& a, const Id* ids, unsigned char* workspace)
      : a_(a), g_(a.graph), o_(a.options), ids_(ids), N_(g_.num_docs), stride_(g_.stride()),
        m_(o_.neighbours_used == 0 ? g_.k : o_.neighbours_used), dedup_(o_.dedup()),
        thr_(o_.dedup_threshold) {
    LORY_NS_QUALIFIER::detail::WorkspaceCarver c{workspace};
    state_ = c.take<uint8_t>(static_cast<size_t>(N_));
    visited_ = c.take<uint64_t>(static_cast<size_t>((N_ + 63) / 64));
    deg_ = c.take<int64_t>(static_cast<size_t>(N_));
    count_ = c.take<int64_t>(static_cast<size_t>(N_) + 2);
    by_degree_ = c.take<int64_t>(static_cast<size_t>(N_));
  }

  void run() {
    std::memset(state_, 0, static_cast<size_t>(N_));
    std::memset(visited_, 0, static_cast<size_t>((N_ + 63) / 64) * 8);
    if (o_.start == OrderOptions::Start::kMinDegree) sort_by_degree();
    walk();
    if (o_.merge_short_chains) merge();
    *a_.num_out = placed_;
    if (a_.num_dropped) *a_.num_dropped = dropped_;
    if (a_.chain_offsets_out) *a_.num_chains = chains_;
  }

 private:
  const Id* row_ids(int64_t r) const { return ids_ + r * stride_; }
  const float* row_sims(int64_t r) const { return g_.sims + r * stride_; }
  uint8_t status(int64_t d) const { return state_[d] & kStateMask; }
  // Placed or dropped: the hot test of the walk, on a bitset (N / 8 bytes) that stays in cache
  // far longer than the state bytes.
  bool visited(int64_t d) const { return (visited_[d >> 6] >> (d & 63)) & 1u; }
  void set_visited(int64_t d) { visited_[d >> 6] |= uint64_t{1} << (d & 63); }

  // Counting sort of the docs by (min(degree, N), id); degrees >= N only arise from repeated ids
  // and are few (at most m docs), so that last bucket is sorted by (degree, id) directly.
  void sort_by_degree() {
    std::fill(deg_, deg_ + N_, int64_t{0});
    constexpr int64_t kAhead = 8;  // rows: the increments are random, their cache lines fetched early
    for (int64_t r = 0; r < N_; ++r) {
#if defined(__GNUC__) || defined(__clang__)
      if (r + kAhead < N_) {
        const Id* ahead = row_ids(r + kAhead);
        for (int64_t j = 0; j < m_ && ahead[j] >= 0; ++j) __builtin_prefetch(deg_ + ahead[j], 1);
      }
#endif
      const Id* row = row_ids(r);
      int64_t out = 0;
      for (; out < m_; ++out) {
        const int64_t t = static_cast<int64_t>(row[out]);
        if (t < 0) break;
        ++deg_[t];
      }
      deg_[r] += out;
    }
    std::fill(count_, count_ + N_ + 2, int64_t{0});
    for (int64_t d = 0; d < N_; ++d) ++count_[std::min(deg_[d], N_) + 1];
    for (int64_t key = 1; key <= N_ + 1; ++key) count_[key] += count_[key - 1];
    const int64_t tail = count_[N_];
    for (int64_t d = 0; d < N_; ++d) by_degree_[count_[std::min(deg_[d], N_)]++] = d;
    std::sort(by_degree_ + tail, by_degree_ + N_, [this](int64_t x, int64_t y) {
      return deg_[x] != deg_[y] ? deg_[x] < deg_[y] : x < y;
    });
  }

  // The next start doc (not yet placed or dropped), or -1. The cursor only moves forward: O(N) in all.
  int64_t next_start_candidate() {
    if (o_.start == OrderOptions::Start::kMinDegree) {
      while (cursor_ < N_ && visited(by_degree_[cursor_])) ++cursor_;
      return cursor_ < N_ ? by_degree_[cursor_] : -1;
    }
    while (cursor_ < N_ && visited(cursor_)) ++cursor_;
    return cursor_ < N_ ? cursor_ : -1;
  }

  // Best doc among d's edges that `eligible` accepts: highest similarity, ties to the lower id.
  // Rows are sorted, so the scan stops at the first similarity below the best one found.
  template <class Eligible>
  int64_t best_neighbour(int64_t d, Eligible&& eligible) const {
    const Id* row = row_ids(d);
    const float* srow = row_sims(d);
    int64_t best = -1;
    float best_sim = 0.f;
    for (int64_t j = 0; j < m_; ++j) {
      const int64_t t = static_cast<int64_t>(row[j]);
      if (t < 0) break;
      if (best >= 0 && srow[j] < best_sim) break;
      if (!eligible(t)) continue;
      if (best < 0 || t < best) {
        best = t;
        best_sim = srow[j];
      }
    }
    return best;
  }
  int64_t best_unvisited_neighbour(int64_t c) const {
    return best_neighbour(c, [this](int64_t t) { return !visited(t); });
  }
  // Merging: the best neighbour of d placed in a long chain.
  int64_t best_long_neighbour(int64_t d) const {
    return best_neighbour(d, [this](int64_t t) { return (state_[t] & kLong) != 0; });
  }

  void drop(int64_t d) {
    state_[d] = (state_[d] & ~kStateMask) | kDropped;
    set_visited(d);
    if (a_.dropped_out) a_.dropped_out[dropped_] = d;
    ++dropped_;
  }

  // Dedup: d may be placed unless one of its edges reaches a placed doc at >= threshold.
  bool may_place(int64_t d) {
    if (!dedup_) return true;
    const Id* row = row_ids(d);
    const float* srow = row_sims(d);
    for (int64_t j = 0; j < m_; ++j) {
      const int64_t t = static_cast<int64_t>(row[j]);
      if (t < 0 || !(srow[j] >= thr_)) break;
      if (status(t) == kPlaced) {
        drop(d);
        return false;
      }
    }
    return true;
  }

  void place(int64_t d) {
    state_[d] = (state_[d] & ~kStateMask) | kPlaced;
    set_visited(d);
    a_.order_out[placed_++] = d;
    if (!dedup_) return;
    const Id* row = row_ids(d);
    const float* srow = row_sims(d);
    for (int64_t j = 0; j < m_; ++j) {
      const int64_t t = static_cast<int64_t>(row[j]);
      if (t < 0 || !(srow[j] >= thr_)) break;
      if (!visited(t)) drop(t);
    }
  }

  void close_chain(int64_t begin) {
    const int64_t len = placed_ - begin;
    if (len == 0) return;
    state_[a_.order_out[begin]] |= kChainStart;
    if (o_.merge_short_chains && len >= o_.max_chain_len)
      for (int64_t p = begin; p < placed_; ++p) state_[a_.order_out[p]] |= kLong;
    if (a_.chain_offsets_out && !o_.merge_short_chains) a_.chain_offsets_out[chains_] = begin;
    ++chains_;
  }

  void walk() {
    int64_t cur = -1, chain_begin = 0;
    for (;;) {
      int64_t next = -1;
      const bool capped = o_.max_chain_len > 0 && placed_ - chain_begin >= o_.max_chain_len;
      if (cur >= 0 && !capped) {
        while ((next = best_unvisited_neighbour(cur)) >= 0 && !may_place(next)) {
        }
      }
      if (next < 0) {
        while ((next = next_start_candidate()) >= 0 && !may_place(next)) {
        }
        if (next < 0) break;
        close_chain(chain_begin);
        chain_begin = placed_;
      }
      place(next);
      cur = next;
    }
    close_chain(chain_begin);
    if (a_.chain_offsets_out && !o_.merge_short_chains) a_.chain_offsets_out[chains_] = placed_;
  }

  void merge() {
    // Per long-chain doc t, the list of short-chain docs moving before it, in order: head_[t],
    // next_[d] (pushed front while walking the order backwards).
    int64_t* head = count_;
    int64_t* next = deg_;
    int64_t* merged = by_degree_;
    std::fill(head, head + N_, int64_t{-1});
    for (int64_t p = placed_ - 1; p >= 0; --p) {
      const int64_t d = a_.order_out[p];
      if (state_[d] & kLong) continue;
      const int64_t t = best_long_neighbour(d);
      if (t < 0) continue;
      next[d] = head[t];
      head[t] = d;
      state_[d] |= kMoved;
    }
    int64_t n = 0;
    chains_ = 0;
    bool chain_pending = false;
    auto emit = [&](int64_t d) {
      if (chain_pending) {
        if (a_.chain_offsets_out) a_.chain_offsets_out[chains_] = n;
        ++chains_;
        chain_pending = false;
      }
      merged[n++] = d;
    };
    for (int64_t p = 0; p < placed_; ++p) {
      const int64_t d = a_.order_out[p];
      if (state_[d] & kChainStart) chain_pending = true;
      if (state_[d] & kLong) {
        for (int64_t s = head[d]; s >= 0; s = next[s]) emit(s);
        emit(d);
      } else if (!(state_[d] & kMoved)) {
        emit(d);
      }
    }
    if (a_.chain_offsets_out) a_.chain_offsets_out[chains_] = n;
    std::copy(merged, merged + n, a_.order_out);
  }

  const OrderArgs& a_;
  const KnnGraphView& g_;
  const OrderOptions& o_;
  const Id* ids_;
  const int64_t N_, stride_, m_;
  const bool dedup_;
  const float thr_;
  uint8_t* state_ = nullptr;
  uint64_t* visited_ = nullptr;
  int64_t* deg_ = nullptr;
  int64_t* count_ = nullptr;
  int64_t* by_degree_ = nullptr;
  int64_t cursor_ = 0;
  int64_t placed_ = 0;
  int64_t dropped_ = 0;
  int64_t chains_ = 0;
};

}  // namespace detail

// The similarity order of the graph's documents (see the top of this file). A null workspace asks
// for its size (workspace_bytes = order_workspace_size(N)) after the O(1) checks; otherwise the
// graph is validated once (O(N k)) and nothing is written unless everything is valid.
inline Status similarity_order(const OrderArgs& a, void* workspace, size_t& workspace_bytes) {
  LORY_NS_QUALIFIER::detail::clear_error_detail();
  LORY_RETURN_IF_ERROR(validate_graph_shape(a.graph));
  LORY_RETURN_IF_ERROR(validate_order_options(a));
  bool size_query = false;
  const Status ws = LORY_NS_QUALIFIER::detail::workspace_protocol(
      workspace, workspace_bytes, order_workspace_size(a.graph.num_docs), size_query,
      LORY_NS_QUALIFIER::detail::kCarvedWorkspaceAlign);
  if (ws != Status::kSuccess) return ws;  // the protocol named the workspace argument
  if (size_query) return Status::kSuccess;
  const size_t n = static_cast<size_t>(a.graph.num_docs) * 8;
  if (detail::overlap(workspace, workspace_bytes, a.order_out, n) ||
      detail::overlap(workspace, workspace_bytes, a.dropped_out, n) ||
      detail::overlap(workspace, workspace_bytes, a.chain_offsets_out, n + 8))
    return detail::fail(Status::kErrorInvalidArgument, "workspace", "overlaps an output");
  LORY_RETURN_IF_ERROR(validate_graph(a.graph));
  auto* base = static_cast<unsigned char*>(workspace);
  if (a.graph.ids64) {
    detail::OrderWalk<int64_t>(a, a.graph.ids64, base).run();
  } else {
    detail::OrderWalk<int32_t>(a, a.graph.ids32, base).run();
  }
  return Status::kSuccess;
}

// ================================================================================================
// pack_documents
// ================================================================================================

// Bytes of pack_documents' workspace (a bit per doc, for the check that order has no repeats).
// Never 0: an empty allocation may come back as a null pointer, which would ask for the size again.
inline size_t pack_workspace_size(int64_t num_docs) {
  return num_docs <= 0 ? 8 : static_cast<size_t>((num_docs + 63) / 64) * 8;
}

namespace detail {

inline Status validate_pack_options(const PackOptions& o) {
  if (o.seq_len <= 0) return fail(Status::kErrorInvalidSize, "options.seq_len", "must be > 0");
  if (o.separator < -1) return fail(Status::kErrorInvalidArgument, "options.separator", "a token id or -1");
  if (o.pad_token < 0) return fail(Status::kErrorInvalidArgument, "options.pad_token", "negative");
  if (o.boundary != PackOptions::Boundary::kSplit && o.boundary != PackOptions::Boundary::kMove)
    return fail(Status::kErrorInvalidArgument, "options.boundary", "not one of the enum's values");
  if (o.leftover != PackOptions::Leftover::kDrop && o.leftover != PackOptions::Leftover::kPad &&
      o.leftover != PackOptions::Leftover::kKeepShort)
    return fail(Status::kErrorInvalidArgument, "options.leftover", "not one of the enum's values");
  return Status::kSuccess;
}

// The one definition of the packing: calls range(doc, begin, end, separator) for every piece and
// close(length, leftover) at the end of every sequence; leftover is true for the last sequence when
// it is shorter than L (kMove's early-closed sequences are not leftovers).
template <class Range, class Close>
void simulate_packing(const PackArgs& a, Range&& range, Close&& close) {
  const int64_t L = a.options.seq_len;
  const int64_t sep = a.options.separator >= 0 ? 1 : 0;
  const bool move = a.options.boundary == PackOptions::Boundary::kMove;
  int64_t fill = 0;
  for (int64_t i = 0; i < a.num_ordered; ++i) {
    const int64_t d = a.order[i];
    const int64_t count = a.doc_token_counts[d];
    const int64_t unit = count + sep;
    if (unit == 0) continue;
    if (move && fill > 0 && unit <= L && fill + unit > L) {
      close(fill, false);
      fill = 0;
    }
    for (int64_t b = 0; b < unit;) {
      const int64_t take = std::min(unit - b, L - fill);
      range(d, b, std::min(b + take, count), (sep && b + take == unit) ? int64_t{1} : int64_t{0});
      b += take;
      fill += take;
      if (fill == L) {
        close(fill, false);
        fill = 0;
      }
    }
  }
  if (fill > 0) close(fill, true);
}

// Sizes of the packing (inputs already validated).
inline PackSizes pack_sizes(const PackArgs& a) {
  PackSizes s;
  const int64_t L = a.options.seq_len;
  const bool drop = a.options.leftover == PackOptions::Leftover::kDrop;
  const bool keep_short = a.options.leftover == PackOptions::Leftover::kKeepShort;
  int64_t ranges_in_seq = 0;
  detail::simulate_packing(
      a, [&](int64_t, int64_t b, int64_t e, int64_t sep) {
        ++ranges_in_seq;
        s.packed_tokens += e - b + sep;
      },
      [&](int64_t length, bool leftover) {
        if (leftover && drop) {
          s.dropped_tokens = length;
          s.packed_tokens -= length;
          ranges_in_seq = 0;
          return;
        }
        ++s.num_seqs;
        s.num_ranges += ranges_in_seq;
        ranges_in_seq = 0;
        s.output_tokens += (leftover && keep_short) ? length : L;
      });
  return s;
}

}  // namespace detail

// Pack the ordered docs into sequences (see the top of this file). Two phases: a null workspace
// asks for workspace_bytes and fills *sizes (O(num_ordered) checks: ids in range, counts >= 0,
// totals that fit); a call with the workspace also checks that order repeats no doc and that the
// outputs are large enough, then writes ranges_out[0 .. num_ranges), seq_offsets_out[0 .. num_seqs]
// and *sizes. Nothing is written (not even *sizes) when a check fails.
inline Status pack_documents(const PackArgs& a, void* workspace, size_t& workspace_bytes) {
  LORY_NS_QUALIFIER::detail::clear_error_detail();
  using detail::fail;
  LORY_RETURN_IF_ERROR(detail::validate_pack_options(a.options));
  if (a.num_docs < 0) return fail(Status::kErrorInvalidSize, "num_docs", "negative");
  if (a.num_ordered < 0) return fail(Status::kErrorInvalidSize, "num_ordered", "negative");
  if (a.num_ordered > a.num_docs)
    return fail(Status::kErrorInvalidShape, "num_ordered", "exceeds num_docs (order cannot be a permutation)");
  if (!a.sizes) return fail(Status::kErrorNullPointer, "sizes", "is null");
  if (a.num_ordered > 0 && !a.order) return fail(Status::kErrorNullPointer, "order", "is null");
  if (a.num_docs > 0 && !a.doc_token_counts) return fail(Status::kErrorNullPointer, "doc_token_counts", "is null");
  // Token totals: each count and the running total (separators included) stay below 2^62.
  const int64_t limit = int64_t{1} << 62;
  int64_t total = 0;
  for (int64_t i = 0; i < a.num_ordered; ++i) {
    const int64_t d = a.order[i];
    if (d < 0 || d >= a.num_docs) return fail(Status::kErrorInvalidArgument, "order", "doc id out of range");
    const int64_t c = a.doc_token_counts[d];
    if (c < 0) return fail(Status::kErrorInvalidArgument, "doc_token_counts", "negative count");
    if (c >= limit - total - 1) return fail(Status::kErrorInvalidSize, "doc_token_counts", "total overflows");
    total += c + 1;
  }
  bool size_query = false;
  const Status ws = LORY_NS_QUALIFIER::detail::workspace_protocol(
      workspace, workspace_bytes, pack_workspace_size(a.num_docs), size_query, alignof(uint64_t));
  if (ws != Status::kSuccess) return ws;  // the protocol named the workspace argument
  const PackSizes sizes = detail::pack_sizes(a);
  if (size_query) {
    *a.sizes = sizes;
    return Status::kSuccess;
  }
  auto* seen = static_cast<uint64_t*>(workspace);
  std::fill(seen, seen + (a.num_docs + 63) / 64, uint64_t{0});
  for (int64_t i = 0; i < a.num_ordered; ++i) {
    const uint64_t d = static_cast<uint64_t>(a.order[i]);
    const uint64_t bit = uint64_t{1} << (d % 64);
    if (seen[d / 64] & bit) return fail(Status::kErrorInvalidArgument, "order", "a doc appears twice");
    seen[d / 64] |= bit;
  }
  if (sizes.num_ranges > 0 && !a.ranges_out) return fail(Status::kErrorNullPointer, "ranges_out", "is null");
  if (a.ranges_capacity < sizes.num_ranges)
    return fail(Status::kErrorInvalidSize, "ranges_capacity", "smaller than sizes.num_ranges");
  if (!a.seq_offsets_out) return fail(Status::kErrorNullPointer, "seq_offsets_out", "is null");
  if (a.seq_offsets_capacity < sizes.num_seqs + 1)
    return fail(Status::kErrorInvalidSize, "seq_offsets_capacity", "smaller than sizes.num_seqs + 1");
  const size_t range_bytes = static_cast<size_t>(sizes.num_ranges) * sizeof(PackedRange);
  const size_t offset_bytes = static_cast<size_t>(sizes.num_seqs + 1) * 8;
  if (detail::overlap(a.ranges_out, range_bytes, a.seq_offsets_out, offset_bytes))
    return fail(Status::kErrorInvalidArgument, "ranges_out", "overlaps seq_offsets_out");
  const size_t order_bytes = static_cast<size_t>(a.num_ordered) * 8, count_bytes = static_cast<size_t>(a.num_docs) * 8;
  if (detail::overlap(a.ranges_out, range_bytes, a.order, order_bytes) ||
      detail::overlap(a.ranges_out, range_bytes, a.doc_token_counts, count_bytes) ||
      detail::overlap(a.ranges_out, range_bytes, workspace, workspace_bytes))
    return fail(Status::kErrorInvalidArgument, "ranges_out", "overlaps an input or the workspace");
  if (detail::overlap(a.seq_offsets_out, offset_bytes, a.order, order_bytes) ||
      detail::overlap(a.seq_offsets_out, offset_bytes, a.doc_token_counts, count_bytes) ||
      detail::overlap(a.seq_offsets_out, offset_bytes, workspace, workspace_bytes))
    return fail(Status::kErrorInvalidArgument, "seq_offsets_out", "overlaps an input or the workspace");

  int64_t n = 0, seqs = 0;
  a.seq_offsets_out[0] = 0;
  detail::simulate_packing(
      a, [&](int64_t d, int64_t b, int64_t e, int64_t sep) {
        if (n < sizes.num_ranges) a.ranges_out[n] = PackedRange{d, b, e, sep};
        ++n;
      },
      [&](int64_t, bool) {
        if (seqs < sizes.num_seqs) a.seq_offsets_out[seqs + 1] = std::min(n, sizes.num_ranges);
        ++seqs;
      });
  *a.sizes = sizes;
  return Status::kSuccess;
}

// ================================================================================================
// write_token_sequences
// ================================================================================================

// Token rows from packed ranges: row s = out[s * L, ...) holds sequence s's pieces (each doc piece's
// tokens, then its separator when the range says so), then pad_token up to L (the last row stops
// at its real tokens with kKeepShort). Validated first, in O(num_docs + num_ranges): ranges within
// their docs, sequences of at most L tokens, offsets, capacity, separator and pad representable.
template <class Token>
Status write_token_sequences(const WriteArgs<Token>& a) {
  LORY_NS_QUALIFIER::detail::clear_error_detail();
  static_assert(std::is_integral<Token>::value, "tokens are integers");
  using detail::fail;
  LORY_RETURN_IF_ERROR(detail::validate_pack_options(a.options));
  const PackOptions& o = a.options;
  const int64_t L = o.seq_len;
  if (a.num_seqs < 0) return fail(Status::kErrorInvalidSize, "num_seqs", "negative");
  if (a.num_docs < 0) return fail(Status::kErrorInvalidSize, "num_docs", "negative");
  if (!LORY_NS_QUALIFIER::detail::mul_fits(a.num_seqs, L))
    return fail(Status::kErrorInvalidSize, "num_seqs", "num_seqs * seq_len overflows");
  if (!a.seq_offsets) return fail(Status::kErrorNullPointer, "seq_offsets", "is null");
  if (!a.doc_offsets) return fail(Status::kErrorNullPointer, "doc_offsets", "is null");
  const int64_t token_max = static_cast<int64_t>(std::min<uint64_t>(
      static_cast<uint64_t>(std::numeric_limits<Token>::max()), static_cast<uint64_t>(INT64_MAX)));
  if (o.separator > token_max) return fail(Status::kErrorInvalidArgument, "options.separator", "does not fit Token");
  if (o.pad_token > token_max) return fail(Status::kErrorInvalidArgument, "options.pad_token", "does not fit Token");
  if (a.doc_offsets[0] < 0) return fail(Status::kErrorInvalidArgument, "doc_offsets[0]", "negative");
  for (int64_t d = 0; d < a.num_docs; ++d)
    if (a.doc_offsets[d + 1] < a.doc_offsets[d])
      return fail(Status::kErrorInvalidArgument, "doc_offsets", "decreasing");
  if (a.num_docs > 0 && a.doc_offsets[a.num_docs] > a.doc_offsets[0] && !a.tokens)
    return fail(Status::kErrorNullPointer, "tokens", "is null");
  if (a.seq_offsets[0] != 0) return fail(Status::kErrorInvalidArgument, "seq_offsets[0]", "must be 0");
  int64_t needed = 0;
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const int64_t r0 = a.seq_offsets[s], r1 = a.seq_offsets[s + 1];
    if (r1 < r0) return fail(Status::kErrorInvalidArgument, "seq_offsets", "decreasing");
    if (r1 > r0 && !a.ranges) return fail(Status::kErrorNullPointer, "ranges", "is null");
    int64_t length = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const PackedRange& p = a.ranges[r];
      if (p.doc < 0 || p.doc >= a.num_docs) return fail(Status::kErrorInvalidArgument, "ranges", "doc out of range");
      const int64_t doc_len = a.doc_offsets[p.doc + 1] - a.doc_offsets[p.doc];
      if (p.begin < 0 || p.begin > p.end || p.end > doc_len)
        return fail(Status::kErrorInvalidArgument, "ranges", "token range outside its doc");
      if (p.separator != 0 && p.separator != 1) return fail(Status::kErrorInvalidArgument, "ranges", "separator not 0 or 1");
      if (p.separator && o.separator < 0)
        return fail(Status::kErrorInvalidArgument, "ranges", "a separator but options.separator is -1");
      length += p.end - p.begin + p.separator;
      if (length > L) return fail(Status::kErrorInvalidShape, "ranges", "a sequence longer than seq_len");
    }
    const bool last_short = s == a.num_seqs - 1 && o.leftover == PackOptions::Leftover::kKeepShort;
    needed += last_short ? length : L;
  }
  if (needed > 0 && !a.out) return fail(Status::kErrorNullPointer, "out", "is null");
  if (a.out_capacity < needed) return fail(Status::kErrorInvalidSize, "out_capacity", "smaller than the rows");
  const size_t out_bytes = static_cast<size_t>(needed) * sizeof(Token);
  if (a.num_docs > 0 && a.tokens &&
      detail::overlap(a.out, out_bytes, a.tokens + a.doc_offsets[0],
                      static_cast<size_t>(a.doc_offsets[a.num_docs] - a.doc_offsets[0]) * sizeof(Token)))
    return fail(Status::kErrorInvalidArgument, "out", "overlaps tokens");
  if (detail::overlap(a.out, out_bytes, a.ranges, static_cast<size_t>(a.seq_offsets[a.num_seqs]) * sizeof(PackedRange)) ||
      detail::overlap(a.out, out_bytes, a.seq_offsets, static_cast<size_t>(a.num_seqs + 1) * 8) ||
      detail::overlap(a.out, out_bytes, a.doc_offsets, static_cast<size_t>(a.num_docs + 1) * 8))
    return fail(Status::kErrorInvalidArgument, "out", "overlaps ranges, seq_offsets or doc_offsets");

  for (int64_t s = 0; s < a.num_seqs; ++s) {
    Token* row = a.out + s * L;
    int64_t length = 0;
    for (int64_t r = a.seq_offsets[s]; r < a.seq_offsets[s + 1]; ++r) {
      const PackedRange& p = a.ranges[r];
      const Token* src = a.tokens + a.doc_offsets[p.doc];
      std::copy(src + p.begin, src + p.end, row + length);
      length += p.end - p.begin;
      if (p.separator) row[length++] = static_cast<Token>(o.separator);
    }
    const bool last_short = s == a.num_seqs - 1 && o.leftover == PackOptions::Leftover::kKeepShort;
    if (!last_short) std::fill(row + length, row + L, static_cast<Token>(o.pad_token));
  }
  return Status::kSuccess;
}

}  // namespace batching
LORY_NAMESPACE_END
