// Merge forward / backward on the GPU against the double-precision CPU twin.
//
// Every tensor is a strided view inside a bigger buffer: the gaps between rows,
// a leading offset (misaligned views start one element in) and a trailing guard
// are NaN-poisoned, in inputs (a kernel reading outside its view produces NaN)
// and in outputs (a kernel writing outside its view leaves a non-NaN). Outputs
// are poisoned inside the view too, so full coverage is checked.
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <vector>

#include "common/catch.hpp"
#include "common/gpu_util.cuh"
#include "common/test_util.hpp"
#include "lory/merge.cuh"
#include "lory/merge_gemm.cuh"
#include "common/merge_variants.cuh"
#include "lory/reference/merge.hpp"

namespace {

using lory::Status;
using lory::detail::MergePath;
using namespace lory_test;

constexpr int64_t kGuard = 37;
// Enough P-tiles that every persistent block loops over many (fewer under the emulator's 2 SMs).
constexpr int64_t kManyTilesP = kEmulated ? 20000 : 300000;

// A [rows, cols] view with row stride `stride` starting `offset` elements into its buffer. With
// vrows > 1 each row is itself a 2-D view (lory/merge.hpp's rows and row pitch): vrows rows of
// cols elements, `pitch` apart; its flattened element j sits at (j / cols) * pitch + j % cols.
template <class T>
struct HostView {
  int64_t rows = 0, cols = 0, stride = 0, offset = 0;
  int64_t vrows = 1, pitch = 0;
  std::vector<T> data;
  T* view() { return data.data() + offset; }
  const T* view() const { return data.data() + offset; }
  int64_t at(int64_t r, int64_t j) const { return r * stride + (vrows == 1 ? j : (j / cols) * pitch + j % cols); }
  bool inside(int64_t i) const {
    const int64_t k = i - offset;
    if (k < 0 || k >= rows * stride) return false;
    const int64_t w = k % stride;
    return vrows == 1 ? w < cols : w < (vrows - 1) * pitch + cols && w % pitch < cols;
  }
};

// Inside the view: uniform random values (or poison); everywhere else: poison.
template <class T>
HostView<T> make_view(int64_t rows, int64_t cols, int64_t pad, int64_t offset, std::mt19937_64& rng,
                      bool random_inside) {
  HostView<T> v;
  v.rows = rows;
  v.cols = cols;
  v.stride = cols + pad;
  v.offset = offset;
  v.data.assign(static_cast<size_t>(offset + rows * v.stride + kGuard), poison_value<T>());
  if (random_inside) {
    std::uniform_real_distribution<double> dist(-1.0, 1.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) v.view()[r * v.stride + c] = lory::from_double<T>(dist(rng));
  }
  return v;
}

// got vs want (the twin's output in the same layout): inside the view no NaN and
// norm-relative error <= tol; outside the view still poison.
template <class T>
void check_view(const HostView<T>& got, const HostView<T>& want, double tol, const std::string& what) {
  std::vector<double> g, w;
  int64_t outside_written = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(got.data.size()); ++i) {
    if (got.inside(i)) {
      g.push_back(lory::to_double(got.data[i]));
      w.push_back(lory::to_double(want.data[i]));
    } else if (!std::isnan(lory::to_double(got.data[i]))) {
      ++outside_written;
    }
  }
  INFO(what << ": " << g.size() << " elements");
  CHECK(count_nan(g) == 0);
  CHECK(outside_written == 0);
  const double err = rel_error(g, w);
  INFO("rel error " << err << " (tolerance " << tol << "), max abs " << max_abs_error(g.data(), w.data(), g.size()));
  CHECK(err <= tol);
}

template <class T>
T* device_view(DeviceBuffer<T>& buf, const HostView<T>& v) { return buf.get() + v.offset; }

// n 2-D views of vrows x cols at `pitch`, `pad` elements between one view's end and the next's
// start, as make_view's: random (or poison) inside, poison in the gaps between rows and views.
template <class T>
HostView<T> make_view2d(int64_t n, int64_t vrows, int64_t cols, int64_t pitch, int64_t pad, int64_t offset,
                        std::mt19937_64& rng, bool random_inside) {
  HostView<T> v;
  v.rows = n;
  v.cols = cols;
  v.vrows = vrows;
  v.pitch = pitch;
  v.stride = (vrows - 1) * pitch + cols + pad;
  v.offset = offset;
  v.data.assign(static_cast<size_t>(offset + n * v.stride + kGuard), poison_value<T>());
  if (random_inside) {
    std::uniform_real_distribution<double> dist(-1.0, 1.0);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < vrows * cols; ++j) v.view()[v.at(r, j)] = lory::from_double<T>(dist(rng));
  }
  return v;
}

template <class T>
const char* dtype_tag() { return lory::dtype_name(lory::dtype_of<T>::value); }

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
struct FwdCase {
  int64_t S;
  int E;
  int64_t P;
  int64_t w_pad, out_pad;  // stride - P
  int64_t offset;          // elements; 1 = misaligned base pointers
};

// Tuning: the tensor-core kernel's knobs (the default, or a variant with a kName).
template <class Tuning, class Default>
std::string tuning_tag() {
  if constexpr (std::is_same<Tuning, Default>::value) return "";
  else return std::string("/") + Tuning::kName;
}

// The forward's arguments for case c over the views W and out.
template <class T>
lory::MergeForwardArgs<T, float> forward_args(const FwdCase& c, const T* W, int64_t w_stride, const float* weights,
                                              T* out, int64_t out_stride) {
  lory::MergeForwardArgs<T, float> a;
  a.num_segments = c.S;
  a.experts = c.E;
  a.params = c.P;
  a.W = W;
  a.expert_stride = w_stride;
  a.weights = weights;
  a.Wbar = out;
  a.segment_stride = out_stride;
  return a;
}

template <class T, class Tuning = lory::detail::MergeForwardTcDefault>
void run_forward(const FwdCase& c, MergePath path) {
  const std::string tag = std::string("fwd/") + dtype_tag<T>() + "/S" + std::to_string(c.S) + "/E" +
                          std::to_string(c.E) + "/P" + std::to_string(c.P) + "/path" +
                          std::to_string(static_cast<int>(path)) + "/off" + std::to_string(c.offset) +
                          tuning_tag<Tuning, lory::detail::MergeForwardTcDefault>();
  INFO(tag);
  auto rng = make_rng(tag);
  auto W = make_view<T>(c.E, c.P, c.w_pad, c.offset, rng, true);
  auto out = make_view<T>(c.S, c.P, c.out_pad, c.offset, rng, false);
  auto weights = random_simplex_rows(c.S, c.E, rng);

  DeviceBuffer<T> dW(W.data), dout(out.data);
  DeviceBuffer<float> dweights(weights);
  const lory::MergeForwardArgs<T, float> a =
      forward_args<T>(c, device_view(dW, W), W.stride, dweights.get(), device_view(dout, out), out.stride);
  size_t bytes = 0;
  REQUIRE(lory::detail::merge_forward_on_path<T, Tuning>(a, nullptr, bytes, nullptr, path) == Status::kSuccess);
  auto ws = stale_workspace(bytes);
  REQUIRE(lory::detail::merge_forward_on_path<T, Tuning>(a, ws.get(), bytes, nullptr, path) == Status::kSuccess);
  LORY_TEST_SYNC();

  HostView<T> got = out;
  got.data = dout.download(out.data.size());
  HostView<T> want = out;
  lory::MergeForwardArgs<T, float> h = a;
  h.W = W.view();
  h.weights = weights.data();
  h.Wbar = want.view();
  REQUIRE(lory::reference::merge_forward<double>(h) == Status::kSuccess);
  check_view(got, want, tolerance<T>(), tag);
}

const std::vector<FwdCase>& forward_cases() {
  static const std::vector<FwdCase> cases = {
      {1, 1, 1, 0, 0, 0},          // the smallest merge
      {5, 3, 1001, 0, 0, 0},       // P and strides not a multiple of the vector: scalar path
      {7, 64, 777, 0, 0, 0},       // E = 64
      {70, 16, 2048, 0, 0, 0},     // vector path; S crosses a 64-segment pass
      {33, 32, 4103, 9, 25, 0},    // strided views with a P tail on the vector path
      {9, 20, 1000, 8, 24, 1},     // misaligned base pointers
      {130, 8, 520, 0, 8, 0},      // S past one SIMT pass for every dtype
      {300, 5, 64, 0, 0, 0},       // a single P-tile: S split across blockIdx.y
      {200, 17, 24, 0, 0, 0},      // tensor cores with E padded to 32, S split
      {4, 256, 300, 4, 4, 0},      // E = kMaxExperts (SIMT, narrower tiles)
      {3, 100, 1500, 0, 12, 0},    // E not a power of two, several expert chunks
  };
  return cases;
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------
struct BwdCase {
  int64_t S;
  int E;
  int64_t P;
  int64_t pad;     // G's stride = P + pad; W's and dW's differ from it (bwd_pad_extra)
  int64_t offset;  // 1 = misaligned base pointers
};

// A merge over 2-D views (lory/merge.hpp's rows and row pitches): every expert and segment is
// rows x cols, at a row pitch of cols + pad per operand (a pad of 0: that operand's view is flat),
// with 8 poisoned elements after each expert's (segment's) view. The forward's Wbar takes g_pad.
struct View2DCase {
  int64_t S;
  int E;
  int64_t rows, cols;
  int64_t w_pad, g_pad, dw_pad;
  int64_t offset;  // 1 = misaligned base pointers
  std::string name() const {
    return "S" + std::to_string(S) + "/E" + std::to_string(E) + "/" + std::to_string(rows) + "x" + std::to_string(cols) +
           "/pads" + std::to_string(w_pad) + "," + std::to_string(g_pad) + "," + std::to_string(dw_pad) + "/off" +
           std::to_string(offset);
  }
  // Whether 16-bit storage gets 16-byte vectors on every operand.
  bool vec16() const { return offset == 0 && cols % 8 == 0 && w_pad % 8 == 0 && g_pad % 8 == 0 && dw_pad % 8 == 0; }
};
constexpr int64_t kView2DGap = 8;  // poisoned elements between one expert's (segment's) view and the next

// Extra pads of W (8 or 3) and dW (16 or 1) over G's: three distinct strides (a mixed-up stride
// shows), all multiples of 16 bytes when G's is, so that aligned cases reach the vector paths.
inline int64_t bwd_pad_extra(const BwdCase& c, int64_t aligned_extra, int64_t unaligned_extra) {
  return (c.P + c.pad) % 8 == 0 ? aligned_extra : unaligned_extra;
}

struct BwdMode {
  bool deterministic = true;
  bool want_dW = true, want_de = true;
  bool accumulate_dW = false, accumulate_de = false;
  std::string name() const {
    return std::string(deterministic ? "det" : "fast") + (want_dW ? "+dW" : "") + (want_de ? "+de" : "") +
           (accumulate_dW ? "+accdW" : "") + (accumulate_de ? "+accde" : "");
  }
};

template <class T>
struct BwdResult {
  std::vector<T> dW;
  std::vector<float> de;
};

// A backward problem of case c in mode m: fresh random inputs on the host and the device, the
// launcher's arguments for them. d_weights [S, E] is contiguous, followed by a poisoned guard.
template <class T>
struct BwdProblem {
  HostView<T> G, W, dW;
  std::vector<float> weights, de;
  DeviceBuffer<T> dG, dWd, ddW;
  DeviceBuffer<float> dweights, dde;
  lory::MergeBackwardArgs<T, float> a;
  BwdProblem(const BwdCase& c, const BwdMode& m, std::mt19937_64& rng)
      : G(make_view<T>(c.S, c.P, c.pad, c.offset, rng, true)),
        W(make_view<T>(c.E, c.P, c.pad + bwd_pad_extra(c, 8, 3), c.offset, rng, true)),
        dW(make_view<T>(c.E, c.P, c.pad + bwd_pad_extra(c, 16, 1), c.offset, rng, m.accumulate_dW)),
        weights(random_simplex_rows(c.S, c.E, rng)),
        de(make_de(c, m, rng)),
        dG(G.data),
        dWd(W.data),
        ddW(dW.data),
        dweights(weights),
        dde(de) {
    set_args(c.S, c.E, c.P, m);
  }
  BwdProblem(const View2DCase& c, const BwdMode& m, std::mt19937_64& rng)
      : G(make_view2d<T>(c.S, c.rows, c.cols, c.cols + c.g_pad, kView2DGap, c.offset, rng, true)),
        W(make_view2d<T>(c.E, c.rows, c.cols, c.cols + c.w_pad, kView2DGap, c.offset, rng, true)),
        dW(make_view2d<T>(c.E, c.rows, c.cols, c.cols + c.dw_pad, kView2DGap, c.offset, rng, m.accumulate_dW)),
        weights(random_simplex_rows(c.S, c.E, rng)),
        de(make_de(BwdCase{c.S, c.E, 1, 0, 0}, m, rng)),
        dG(G.data),
        dWd(W.data),
        ddW(dW.data),
        dweights(weights),
        dde(de) {
    set_args(c.S, c.E, c.cols, m);
    a.rows = c.rows;
    a.G_row_pitch = G.pitch;
    a.W_row_pitch = W.pitch;
    a.dW_row_pitch = dW.pitch;
  }
  void set_args(int64_t S, int E, int64_t P, const BwdMode& m) {
    a.num_segments = S;
    a.experts = E;
    a.params = P;
    a.G = device_view(dG, G);
    a.grad_segment_stride = G.stride;
    a.W = m.want_de ? device_view(dWd, W) : nullptr;
    a.expert_stride = W.stride;
    a.weights = dweights.get();
    a.dW = m.want_dW ? device_view(ddW, dW) : nullptr;
    a.dW_expert_stride = dW.stride;
    a.accumulate_dW = m.accumulate_dW;
    a.d_weights = m.want_de ? dde.get() : nullptr;
    a.accumulate_d_weights = m.accumulate_de;
    a.deterministic = m.deterministic;
  }
  static std::vector<float> make_de(const BwdCase& c, const BwdMode& m, std::mt19937_64& rng) {
    std::vector<float> v(static_cast<size_t>(c.S * c.E + kGuard), poison_value<float>());
    if (m.accumulate_de)
      for (int64_t i = 0; i < c.S * c.E; ++i) v[i] = static_cast<float>(std::uniform_real_distribution<double>(-1, 1)(rng));
    return v;
  }
};

// One launcher call of a backward test: (args, workspace, bytes) -> status; a null workspace asks.
template <class T>
using BwdLaunch = std::function<Status(const lory::MergeBackwardArgs<T, float>&, void*, size_t&)>;

// The body of a backward test on a problem: launch (`repeats` times, bitwise identical), then
// `reference` fills the host arguments' outputs (set up as copies of the initial outputs), and the
// results are checked against them: dW in its view (and nothing outside it written), d_weights
// element by element, untouched outputs where skipped.
template <class T>
using BwdReference = std::function<void(lory::MergeBackwardArgs<T, float>&, const BwdProblem<T>&)>;
template <class T>
BwdResult<T> run_backward_problem(BwdProblem<T>& prob, const BwdMode& m, const std::string& tag,
                                  const BwdLaunch<T>& launch, int repeats,
                                  const std::function<void(const lory::MergeBackwardArgs<T, float>&)>& check_args,
                                  const BwdReference<T>& reference) {
  auto& G = prob.G;
  auto& W = prob.W;
  auto& dW = prob.dW;
  auto& weights = prob.weights;
  auto& de = prob.de;
  auto& ddW = prob.ddW;
  auto& dde = prob.dde;
  auto& a = prob.a;
  if (check_args) check_args(a);
  size_t bytes = 0;
  REQUIRE(launch(a, nullptr, bytes) == Status::kSuccess);
  auto ws = stale_workspace(bytes);
  BwdResult<T> first;
  for (int rep = 0; rep < repeats; ++rep) {
    ddW.upload(dW.data);  // fresh initial values each repeat (accumulate modes)
    dde.upload(de);
    REQUIRE(launch(a, ws.get(), bytes) == Status::kSuccess);
    LORY_TEST_SYNC();
    BwdResult<T> r;
    r.dW = ddW.download(dW.data.size());
    r.de = dde.download(de.size());
    if (rep == 0) {
      first = r;
    } else {
      // Deterministic mode: bitwise identical run to run.
      CHECK(std::memcmp(first.dW.data(), r.dW.data(), r.dW.size() * sizeof(T)) == 0);
      CHECK(std::memcmp(first.de.data(), r.de.data(), r.de.size() * sizeof(float)) == 0);
    }
  }

  HostView<T> want_dW = dW;
  std::vector<float> want_de = de;
  lory::MergeBackwardArgs<T, float> h = a;
  h.G = G.view();
  h.W = m.want_de ? W.view() : nullptr;
  h.weights = weights.data();
  h.dW = m.want_dW ? want_dW.view() : nullptr;
  h.d_weights = m.want_de ? want_de.data() : nullptr;
  reference(h, prob);
  const int64_t S = a.num_segments, P = a.rows * a.params;
  const int E = a.experts;

  HostView<T> got_dW = dW;
  got_dW.data = first.dW;
  if (m.want_dW) {
    check_view(got_dW, want_dW, tolerance<T>(), tag + " dW");
  } else {
    CHECK(std::memcmp(got_dW.data.data(), dW.data.data(), dW.data.size() * sizeof(T)) == 0);  // untouched
  }
  if (m.want_de) {
    // d_weights is fp32: the kernels round the products (fp32 storage) and accumulate over P in
    // fp32, the twin in double. A dot product can cancel to almost nothing (one segment, one
    // expert, a few params), so the bound is relative to the magnitude of its terms,
    // sum_p |G[s, p] W[e, p]| (plus the old value when accumulating), element by element.
    std::vector<double> g(first.de.begin(), first.de.begin() + S * E), w(want_de.begin(), want_de.begin() + S * E);
    INFO(tag << " d_weights");
    CHECK(count_nan(g) == 0);
    int64_t off = 0;
    for (int64_t s = 0; s < S; ++s)
      for (int e = 0; e < E; ++e) {
        const size_t i = static_cast<size_t>(s * E + e);
        double mag = m.accumulate_de ? std::fabs(double(de[i])) : 0.0;
        for (int64_t q = 0; q < P; ++q)
          mag += std::fabs(double(lory::to_float(G.view()[G.at(s, q)])) *
                           double(lory::to_float(W.view()[W.at(e, q)])));
        off += std::fabs(g[i] - w[i]) > 2e-5 * mag;
      }
    CHECK(off == 0);
    CHECK(count_nan(first.de.data() + S * E, kGuard) == kGuard);
  } else {
    CHECK(std::memcmp(first.de.data(), de.data(), de.size() * sizeof(float)) == 0);
  }
  return first;
}

// Case c in mode m through `launch` (named `how` in the tag that seeds the data), against the
// double twin. `repeats` > 1 checks that the outputs are bitwise identical run to run.
template <class T>
BwdResult<T> run_backward_with(const BwdCase& c, const BwdMode& m, const std::string& how, const BwdLaunch<T>& launch,
                               int repeats = 1,
                               const std::function<void(const lory::MergeBackwardArgs<T, float>&)>& check_args = {}) {
  const std::string tag = std::string("bwd/") + dtype_tag<T>() + "/S" + std::to_string(c.S) + "/E" +
                          std::to_string(c.E) + "/P" + std::to_string(c.P) + "/pad" + std::to_string(c.pad) +
                          "/off" + std::to_string(c.offset) + "/" + how + "/" + m.name();
  INFO(tag);
  auto rng = make_rng(tag);
  BwdProblem<T> prob(c, m, rng);
  return run_backward_problem<T>(prob, m, tag, launch, repeats, check_args,
                                 [](lory::MergeBackwardArgs<T, float>& h, const BwdProblem<T>&) {
                                   REQUIRE(lory::reference::merge_backward<double>(h) == Status::kSuccess);
                                 });
}

// The fused kernel on `path` with tuning `Tuning`.
template <class T, class Tuning = lory::detail::MergeBackwardTcDefault>
BwdResult<T> run_backward(const BwdCase& c, const BwdMode& m, MergePath path, int repeats = 1) {
  const std::string how = "path" + std::to_string(static_cast<int>(path)) +
                          tuning_tag<Tuning, lory::detail::MergeBackwardTcDefault>();
  return run_backward_with<T>(
      c, m, how,
      [&](const lory::MergeBackwardArgs<T, float>& a, void* ws, size_t& bytes) {
        return lory::detail::merge_backward_on_path<T, Tuning>(a, ws, bytes, nullptr, path);
      },
      repeats,
      [&](const lory::MergeBackwardArgs<T, float>& a) {
        if (path != MergePath::kTensorCore) return;
        // Aligned views must really run the tensor-core kernel; misaligned ones fall back.
        const bool aligned = c.offset == 0 && (c.P + c.pad) % 8 == 0;
        CHECK(lory::detail::merge_backward_uses_tc(a, path) == aligned);
      });
}

// lory::merge_backward with a method (lory/merge_gemm.cuh), on the default stream; kAuto must
// resolve to `expect` (kAuto itself: no expectation).
template <class T>
BwdResult<T> run_backward_method(const BwdCase& c, const BwdMode& m, lory::MergeBackwardMethod method,
                                 cublasHandle_t handle, int repeats = 1,
                                 lory::MergeBackwardMethod expect = lory::MergeBackwardMethod::kAuto) {
  return run_backward_with<T>(
      c, m, std::string("method-") + lory::merge_backward_method_name(method),
      [&](const lory::MergeBackwardArgs<T, float>& a, void* ws, size_t& bytes) {
        return lory::merge_backward(a, method, ws, bytes, handle, nullptr);
      },
      repeats,
      [&](const lory::MergeBackwardArgs<T, float>& a) {
        if (expect != lory::MergeBackwardMethod::kAuto) CHECK(lory::resolve_merge_backward_method(a, method) == expect);
      });
}

// A cuBLAS handle on the default stream (the merge tests' stream).
struct DefaultStreamHandle {
  cublasHandle_t h = nullptr;
  DefaultStreamHandle() { REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS); }
  ~DefaultStreamHandle() { cublasDestroy(h); }
};

const std::vector<BwdCase>& backward_cases() {
  static const std::vector<BwdCase> cases = {
      {1, 1, 1, 0, 0},          // the smallest
      {5, 3, 1001, 0, 0},       // scalar path, P tail
      {17, 64, 777, 0, 0},      // E = 64
      {40, 16, 4103, 9, 0},     // vector path (strides multiple of 8) with a tail
      {9, 20, 1000, 8, 1},      // misaligned base pointers
      {33, 8, kManyTilesP, 0, 0},    // many P-tiles per persistent block; S not a multiple of the chunk
      {70, 256, 100, 0, 0},     // E = 256: S*E past the on-chip partial (workspace partials)
      {600, 32, 257, 7, 0},     // S*E past the on-chip partial with the paper's E
  };
  return cases;
}

// Tensor-core backward (16-bit storage, E <= 64): aligned views with every tail:
// S not a multiple of the 32-segment chunk, E not a multiple of 16 (or of 8), P
// not a multiple of the 128-param tile (nor of the 8-element vector).
const std::vector<BwdCase>& backward_tc_cases() {
  static const std::vector<BwdCase> cases = {
      {1, 1, 8, 0, 0},          // the smallest aligned one
      {45, 20, 1001, 7, 0},     // every tail at once
      {17, 64, 4096, 0, 0},     // E = 64 (K = 4 x 16)
      {100, 3, 2048, 0, 0},     // E = 3: one n8 unit of d_weights, mostly padding
      {64, 48, 520, 0, 0},      // S a multiple of the chunk, E = 48 (on-chip partial swizzled in pairs of rows)
      {50, 31, 1000, 0, 0},     // odd E: partial rows padded to 32 floats and swizzled, scalar updates
      {21, 12, 520, 0, 0},      // E = 12: partial rows padded to 16 floats
      {33, 8, kManyTilesP, 0, 0},    // many P-tiles per persistent block
      {600, 32, 257, 7, 0},     // S*E past the on-chip partial: workspace partials
      {513, 33, 136, 0, 0},     // the same with E = 33 and a one-segment last chunk
      {400, 32, 1000, 8, 0},    // on-chip partial too big for two blocks with four stages: two stages
      {100, 64, 600, 0, 0},     // the same at E = 64 (K = 4 x 16)
      {512, 16, 264, 0, 0},     // E = 16, S = 512: the k1-fit3 variant's two stages for three blocks
      {256, 64, 136, 0, 0},     // E = 64 with the largest on-chip partial (64 KiB): one block per SM
      {9, 20, 1000, 8, 1},      // misaligned: the forced path falls back to CUDA cores
  };
  return cases;
}

// The full mode matrix on some cases, the default mode on all of them.
template <class T, class Tuning = lory::detail::MergeBackwardTcDefault>
void run_backward_modes(const std::vector<BwdCase>& cases, std::initializer_list<int> matrix, MergePath path) {
  for (const auto& c : cases) run_backward<T, Tuning>(c, BwdMode{}, path);
  for (int ci : matrix) {
    for (bool det : {true, false})
      for (int outs = 0; outs < 3; ++outs)
        for (bool acc : {false, true}) {
          BwdMode m;
          m.deterministic = det;
          m.want_dW = outs != 2;
          m.want_de = outs != 1;
          m.accumulate_dW = acc;
          m.accumulate_de = acc;
          run_backward<T, Tuning>(cases[ci], m, path);
        }
  }
}

// ---------------------------------------------------------------------------
// 2-D views: each expert's and segment's P = rows * cols elements are rows of cols at a row pitch
// (a column slice of a larger matrix). The poison between rows and after each view must stay in
// the outputs; the reference is written here in double over the flattened element index.
// ---------------------------------------------------------------------------
template <class T, class Tuning = lory::detail::MergeForwardTcDefault>
void run_forward_2d(const View2DCase& c, MergePath path) {
  const std::string tag = std::string("fwd2d/") + dtype_tag<T>() + "/" + c.name() + "/path" +
                          std::to_string(static_cast<int>(path)) +
                          tuning_tag<Tuning, lory::detail::MergeForwardTcDefault>();
  INFO(tag);
  auto rng = make_rng(tag);
  auto W = make_view2d<T>(c.E, c.rows, c.cols, c.cols + c.w_pad, kView2DGap, c.offset, rng, true);
  auto out = make_view2d<T>(c.S, c.rows, c.cols, c.cols + c.g_pad, kView2DGap, c.offset, rng, false);
  auto weights = random_simplex_rows(c.S, c.E, rng);
  DeviceBuffer<T> dW(W.data), dout(out.data);
  DeviceBuffer<float> dweights(weights);
  lory::MergeForwardArgs<T, float> a = forward_args<T>(FwdCase{c.S, c.E, c.cols, 0, 0, 0}, device_view(dW, W), W.stride,
                                                       dweights.get(), device_view(dout, out), out.stride);
  a.rows = c.rows;
  a.W_row_pitch = W.pitch;
  a.Wbar_row_pitch = out.pitch;
  size_t bytes = 0;
  REQUIRE(lory::detail::merge_forward_on_path<T, Tuning>(a, nullptr, bytes, nullptr, path) == Status::kSuccess);
  auto ws = stale_workspace(bytes);
  REQUIRE(lory::detail::merge_forward_on_path<T, Tuning>(a, ws.get(), bytes, nullptr, path) == Status::kSuccess);
  LORY_TEST_SYNC();

  HostView<T> got = out;
  got.data = dout.download(out.data.size());
  HostView<T> want = out;
  for (int64_t s = 0; s < c.S; ++s)
    for (int64_t j = 0; j < c.rows * c.cols; ++j) {
      double acc = 0;
      for (int e = 0; e < c.E; ++e) acc += double(weights[s * c.E + e]) * lory::to_double(W.view()[W.at(e, j)]);
      want.view()[want.at(s, j)] = lory::from_double<T>(acc);
    }
  check_view(got, want, tolerance<T>(), tag);
}

// The backward over 2-D views through `launch`, against the double reference below.
template <class T>
BwdResult<T> run_backward_2d_with(const View2DCase& c, const BwdMode& m, const std::string& how,
                                  const BwdLaunch<T>& launch, int repeats = 1,
                                  const std::function<void(const lory::MergeBackwardArgs<T, float>&)>& check_args = {}) {
  const std::string tag = std::string("bwd2d/") + dtype_tag<T>() + "/" + c.name() + "/" + how + "/" + m.name();
  INFO(tag);
  auto rng = make_rng(tag);
  BwdProblem<T> prob(c, m, rng);
  return run_backward_problem<T>(prob, m, tag, launch, repeats, check_args,
                                 [&c](lory::MergeBackwardArgs<T, float>& h, const BwdProblem<T>& pr) {
                                   const int64_t P = c.rows * c.cols;
                                   HostView<T> dW = pr.dW;  // h.dW points into a copy in dW's layout
                                   for (int e = 0; h.dW && e < c.E; ++e)
                                     for (int64_t j = 0; j < P; ++j) {
                                       double acc = h.accumulate_dW ? lory::to_double(h.dW[dW.at(e, j)]) : 0.0;
                                       for (int64_t s = 0; s < c.S; ++s)
                                         acc += double(h.weights[s * c.E + e]) * lory::to_double(pr.G.view()[pr.G.at(s, j)]);
                                       h.dW[dW.at(e, j)] = lory::from_double<T>(acc);
                                     }
                                   for (int64_t s = 0; h.d_weights && s < c.S; ++s)
                                     for (int e = 0; e < c.E; ++e) {
                                       double acc = 0;
                                       for (int64_t j = 0; j < P; ++j)
                                         acc += lory::to_double(pr.G.view()[pr.G.at(s, j)]) *
                                                lory::to_double(pr.W.view()[pr.W.at(e, j)]);
                                       float& o = h.d_weights[s * c.E + e];
                                       o = static_cast<float>(h.accumulate_d_weights ? double(o) + acc : acc);
                                     }
                                 });
}

template <class T, class Tuning = lory::detail::MergeBackwardTcDefault>
BwdResult<T> run_backward_2d(const View2DCase& c, const BwdMode& m, MergePath path, int repeats = 1) {
  const std::string how = "path" + std::to_string(static_cast<int>(path)) +
                          tuning_tag<Tuning, lory::detail::MergeBackwardTcDefault>();
  return run_backward_2d_with<T>(
      c, m, how,
      [&](const lory::MergeBackwardArgs<T, float>& a, void* ws, size_t& bytes) {
        return lory::detail::merge_backward_on_path<T, Tuning>(a, ws, bytes, nullptr, path);
      },
      repeats,
      [&](const lory::MergeBackwardArgs<T, float>& a) {
        // 16-byte vectors (so the tensor cores) exactly where no vector straddles a row.
        if (path == MergePath::kTensorCore) CHECK(lory::detail::merge_backward_uses_tc(a, path) == c.vec16());
      });
}

// Odd cols (the scalar path), cols a multiple of the vector (the vector path), pitches above cols
// with poison between rows, flat and non-flat operands mixed, ragged tails against every tile
// width, E in {1, 3, 8, 20, 32}, and a flat 2-D view (all pads 0: the launchers run it as 1-D).
const std::vector<View2DCase>& view2d_cases() {
  static const std::vector<View2DCase> cases = {
      {5, 3, 7, 33, 2, 5, 1, 0},       // odd cols: scalar, every pitch different
      {70, 8, 6, 64, 8, 16, 24, 0},    // vector path; S past a 64-segment pass
      {33, 32, 5, 136, 8, 0, 16, 0},   // W and dW strided, Wbar / G flat; P = 680 ragged on every tile
      {3, 1, 9, 24, 8, 8, 8, 0},       // E = 1
      {45, 20, 4, 200, 8, 24, 8, 1},   // misaligned base pointers: scalar
      {17, 32, 3, 8, 56, 8, 16, 0},    // one vector per row, wide gaps
      {21, 3, 3, 129, 3, 0, 1, 0},     // odd cols across tile boundaries
      {9, 8, 4, 72, 0, 0, 0, 0},       // flat 2-D view
  };
  return cases;
}
// Past the on-chip d_weights partial (S * E > 16384): the workspace partials, E = 32.
constexpr View2DCase kView2DWorkspaceCase{600, 32, 3, 40, 8, 16, 0, 0};

template <class T, class Tuning = lory::detail::MergeBackwardTcDefault>
void run_backward_2d_modes(std::initializer_list<int> matrix, MergePath path) {
  for (const auto& c : view2d_cases()) run_backward_2d<T, Tuning>(c, BwdMode{}, path);
  for (bool det : {true, false}) {
    BwdMode m;
    m.deterministic = det;
    run_backward_2d<T, Tuning>(kView2DWorkspaceCase, m, path);
  }
  for (int ci : matrix) {
    for (bool det : {true, false})
      for (int outs = 0; outs < 3; ++outs)
        for (bool acc : {false, true}) {
          BwdMode m;
          m.deterministic = det;
          m.want_dW = outs != 2;
          m.want_de = outs != 1;
          m.accumulate_dW = acc;
          m.accumulate_de = acc;
          run_backward_2d<T, Tuning>(view2d_cases()[ci], m, path);
        }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("merge_forward (CUDA cores) matches the CPU twin", "[gpu][merge]", float, __half, __nv_bfloat16) {
  for (const auto& c : forward_cases()) run_forward<TestType>(c, MergePath::kSimt);
}

TEMPLATE_TEST_CASE("merge_forward (tensor cores) matches the CPU twin", "[gpu][merge]", __half, __nv_bfloat16) {
  for (const auto& c : forward_cases())
    if (c.E <= 64) run_forward<TestType>(c, MergePath::kTensorCore);
}

// The variants of the tensor-core forward (512-param tiles, evict-first stores, three blocks per SM,
// tiles taken from a counter in the workspace) that bench/ab/merge_ab.cu times against the default,
// on every case the tensor cores take.
TEMPLATE_TEST_CASE("merge_forward (tensor-core variants) matches the CPU twin", "[gpu][merge]", __nv_bfloat16) {
  lory::detail::for_each_merge_forward_tc_variant([](auto tag) {
    using V = typename decltype(tag)::type;
    for (const auto& c : forward_cases())
      if (c.E <= 64) run_forward<TestType, V>(c, MergePath::kTensorCore);
  });
}

TEMPLATE_TEST_CASE("merge_forward (launcher's choice) matches the CPU twin", "[gpu][merge]", float, __half,
                   __nv_bfloat16) {
  for (const auto& c : forward_cases()) run_forward<TestType>(c, MergePath::kAuto);
}

TEMPLATE_TEST_CASE("merge_backward (CUDA cores) matches the CPU twin in every mode", "[gpu][merge]", float, __half,
                   __nv_bfloat16) {
  run_backward_modes<TestType>(backward_cases(), {1, 3, 4, 6}, MergePath::kSimt);
}

// The tensor-core backward was written without GPU access: this test is its first run.
TEMPLATE_TEST_CASE("merge_backward (tensor cores) matches the CPU twin in every mode", "[gpu][merge]", __half,
                   __nv_bfloat16) {
  run_backward_modes<TestType>(backward_tc_cases(), {1, 3, 6, 8, 9}, MergePath::kTensorCore);
}

// The variants of the tensor-core kernel (other dW warp layouts, d_weights unit shapes, pipeline
// depths) that bench/ab/merge_ab.cu times against the default: each must be right before its speed
// matters. Every case and the mode matrix on the every-tail, workspace-partial and two-stage cases.
TEMPLATE_TEST_CASE("merge_backward (tensor-core variants) matches the CPU twin", "[gpu][merge]", __nv_bfloat16) {
  lory::detail::for_each_merge_backward_tc_variant([](auto tag) {
    using V = typename decltype(tag)::type;
    run_backward_modes<TestType, V>(backward_tc_cases(), {1, 8, 10}, MergePath::kTensorCore);
  });
}

// The Hopper warpgroup-MMA kernel (sm_90a; docs/merge-backward-sm90.md), a variant not in the list
// above: tagged [sm90] so that a GPU run keeps it in a process of its own (a misread descriptor
// faults) and other devices skip it. Every tensor-core case, the mode matrix on the every-tail,
// workspace-partial and two-stage cases, and the deterministic mode run twice.
TEMPLATE_TEST_CASE("merge_backward (wgmma variant) matches the CPU twin", "[gpu][merge][sm90]", __nv_bfloat16,
                   __half) {
  lory_test::require_wgmma();
  using Wgmma = lory::detail::MergeBackwardWgmma;
  run_backward_modes<TestType, Wgmma>(backward_tc_cases(), {1, 8, 10}, MergePath::kTensorCore);
  BwdMode m;
  m.accumulate_de = true;
  run_backward<TestType, Wgmma>({33, 8, kManyTilesP, 0, 0}, m, MergePath::kTensorCore, 2);
  run_backward<TestType, Wgmma>({600, 32, 257, 7, 0}, m, MergePath::kTensorCore, 2);
}

// Elsewhere (an sm_80, or the emulated one) the wgmma variant is refused with a status, before it
// touches the outputs or the workspace.
TEST_CASE("merge_backward (wgmma variant) is refused off sm_90 and touches nothing", "[gpu][merge]") {
  if (lory_test::device_has_wgmma()) {
    SUCCEED("sm_90 device: the [sm90] test runs the variant instead");
    return;
  }
  using T = __nv_bfloat16;
  auto rng = make_rng("wgmma-refused");
  BwdProblem<T> prob(BwdCase{70, 32, 520, 0, 0}, BwdMode{}, rng);
  const auto& a = prob.a;
  using Wgmma = lory::detail::MergeBackwardWgmma;
  size_t bytes = 0;
  REQUIRE(lory::detail::merge_backward_on_path<T, Wgmma>(a, nullptr, bytes, nullptr, MergePath::kAuto) ==
          Status::kSuccess);
  std::vector<unsigned char> poison(bytes, 0xA5);
  DeviceBuffer<unsigned char> ws(poison);
  CHECK(lory::detail::merge_backward_on_path<T, Wgmma>(a, ws.get(), bytes, nullptr, MergePath::kAuto) ==
        Status::kErrorInvalidArgument);
  LORY_TEST_SYNC();
  const std::vector<T> got_dW = prob.ddW.download(prob.dW.data.size());
  CHECK(std::memcmp(got_dW.data(), prob.dW.data.data(), got_dW.size() * sizeof(T)) == 0);
  CHECK(count_nan(prob.dde.download(prob.de.size())) == static_cast<int64_t>(prob.de.size()));
  CHECK(ws.download(bytes) == poison);
}

TEMPLATE_TEST_CASE("merge_backward (launcher's choice) matches the CPU twin", "[gpu][merge]", float, __half,
                   __nv_bfloat16) {
  for (const auto& c : backward_cases()) run_backward<TestType>(c, BwdMode{}, MergePath::kAuto);
  for (const auto& c : backward_tc_cases()) run_backward<TestType>(c, BwdMode{}, MergePath::kAuto);
}

// Shapes whose shared memory passes 99 KiB per block on the default layout: forward tiles at
// E = 33..64 with long slices of routing weights, and the backward's on-chip d_weights partial (up
// to 64 KiB) beside its pipeline stages. On a device with 99 KiB per block (sm_86, sm_89, sm_120;
// CTest runs this again on the emulated sm_86) the launchers must fit them, in every mode: shorter
// slices, and the partial in the workspace (which the query reserves for such a device).
TEMPLATE_TEST_CASE("merge kernels fit the device's shared memory at shapes past 99 KiB per block",
                   "[gpu][merge][smem99]", __nv_bfloat16) {
  using T = TestType;
  for (const FwdCase& c : {FwdCase{300, 64, 600, 0, 0, 0}, FwdCase{200, 40, 520, 8, 8, 0}}) {
    run_forward<T>(c, MergePath::kAuto);
    run_forward<T>(c, MergePath::kTensorCore);
  }
  // E = 8, S = 2048: a 64 KiB partial (100.4 KiB with two stages); E = 64, S = 200 and E = 32,
  // S = 480: partials of 50 and 60 KiB beside 64 and 45 KiB of stages.
  const std::vector<BwdCase> tc = {{2048, 8, 136, 0, 0}, {200, 64, 136, 0, 0}, {480, 32, 264, 8, 0}};
  run_backward_modes<T>(tc, {0, 1, 2}, MergePath::kTensorCore);
  // The CUDA-core kernel at E = 64 with a 62.5 KiB partial (about 108 KiB in all).
  run_backward_modes<T>({BwdCase{250, 64, 100, 0, 0}}, {0}, MergePath::kSimt);
}

TEMPLATE_TEST_CASE("merge_backward deterministic mode is bitwise reproducible", "[gpu][merge]", float,
                   __nv_bfloat16) {
  BwdMode m;
  m.accumulate_de = true;
  for (MergePath path : {MergePath::kSimt, MergePath::kTensorCore}) {
    if (path == MergePath::kTensorCore && !lory::detail::merge_tc_supports<TestType>(8)) continue;
    run_backward<TestType>({33, 8, kManyTilesP, 0, 0}, m, path, 2);
    run_backward<TestType>({600, 32, 257, 7, 0}, m, path, 2);
  }
}

// The merge backward as two cuBLAS GEMMs (lory::merge_backward with MergeBackwardMethod::kGemm):
// every case of both lists and the mode matrix (the fast mode runs the same GEMMs), bitwise
// reproducible, and kAuto's choice on the tensor-core cases.
TEMPLATE_TEST_CASE("merge_backward (cuBLAS GEMM method) matches the CPU twin in every mode", "[gpu][merge]", float,
                   __half, __nv_bfloat16) {
  using lory::MergeBackwardMethod;
  DefaultStreamHandle handle;
  for (const auto& c : backward_cases()) run_backward_method<TestType>(c, BwdMode{}, MergeBackwardMethod::kGemm, handle.h);
  for (const auto& c : backward_tc_cases())
    run_backward_method<TestType>(c, BwdMode{}, MergeBackwardMethod::kGemm, handle.h);
  for (int ci : {1, 4, 6}) {
    for (int outs = 0; outs < 3; ++outs)
      for (bool acc : {false, true}) {
        BwdMode m;
        m.deterministic = outs != 1;
        m.want_dW = outs != 2;
        m.want_de = outs != 1;
        m.accumulate_dW = acc;
        m.accumulate_de = acc;
        run_backward_method<TestType>(backward_cases()[ci], m, MergeBackwardMethod::kGemm, handle.h);
      }
  }
  BwdMode m;
  m.accumulate_de = true;
  m.accumulate_dW = true;
  run_backward_method<TestType>({600, 32, 257, 7, 0}, m, MergeBackwardMethod::kGemm, handle.h, 2);
}

// kAuto: the fused tensor-core kernel at E <= 8 with aligned 16-bit views, the GEMMs otherwise.
TEMPLATE_TEST_CASE("merge_backward (method kAuto) picks by the shape and matches the CPU twin", "[gpu][merge]",
                   float, __half, __nv_bfloat16) {
  using lory::MergeBackwardMethod;
  DefaultStreamHandle handle;
  const bool b16 = !std::is_same<TestType, float>::value;
  const struct {
    BwdCase c;
    bool fused;  // for 16-bit storage
  } cases[] = {
      {{100, 3, 2048, 0, 0}, true},     // E = 3, aligned
      {{33, 8, 4096, 0, 0}, true},      // E = 8, aligned
      {{21, 12, 520, 0, 0}, false},     // E = 12
      {{45, 20, 1001, 7, 0}, false},    // E = 20
      {{600, 32, 257, 7, 0}, false},    // E = 32
      {{9, 8, 1000, 8, 1}, false},      // E = 8, misaligned: the fused kernel would run on CUDA cores
  };
  for (const auto& k : cases)
    run_backward_method<TestType>(k.c, BwdMode{}, MergeBackwardMethod::kAuto, handle.h, 1,
                                  b16 && k.fused ? MergeBackwardMethod::kFused : MergeBackwardMethod::kGemm);
  // kFused through the same entry point runs the fused kernel without a handle.
  run_backward_method<TestType>({45, 20, 1001, 7, 0}, BwdMode{}, MergeBackwardMethod::kFused, nullptr);
}

// The GEMM method's refusals come before anything is launched: the outputs and the workspace stay
// as they were.
TEST_CASE("merge_backward (cuBLAS GEMM method) refuses a bad handle or workspace and touches nothing", "[gpu][merge]") {
  using T = __nv_bfloat16;
  using lory::MergeBackwardMethod;
  auto rng = make_rng("gemm-refused");
  BwdProblem<T> prob(BwdCase{70, 32, 520, 0, 0}, BwdMode{}, rng);
  const auto& a = prob.a;
  size_t bytes = 0;
  REQUIRE(lory::merge_backward(a, MergeBackwardMethod::kGemm, nullptr, bytes, nullptr, nullptr) == Status::kSuccess);
  CHECK(bytes == size_t(70) * 32 * sizeof(T));
  std::vector<unsigned char> poison(bytes + 16, 0xA5);
  DeviceBuffer<unsigned char> ws(poison);
  DefaultStreamHandle on_default;
  GpuContext on_other;  // a handle bound to another stream
  cublasHandle_t device_mode = nullptr;
  REQUIRE(cublasCreate(&device_mode) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasSetPointerMode(device_mode, CUBLAS_POINTER_MODE_DEVICE) == CUBLAS_STATUS_SUCCESS);
  const struct {
    cublasHandle_t h;
    void* ws;
    size_t bytes;
    MergeBackwardMethod method;
    Status want;
  } calls[] = {
      {nullptr, ws.get(), bytes, MergeBackwardMethod::kGemm, Status::kErrorNullPointer},
      {nullptr, ws.get(), bytes, MergeBackwardMethod::kAuto, Status::kErrorNullPointer},  // E = 32: the GEMMs
      {on_other.handle, ws.get(), bytes, MergeBackwardMethod::kGemm, Status::kErrorInvalidArgument},
      {device_mode, ws.get(), bytes, MergeBackwardMethod::kGemm, Status::kErrorInvalidArgument},
      {on_default.h, ws.get(), bytes - 1, MergeBackwardMethod::kGemm, Status::kErrorWorkspaceTooSmall},
      {on_default.h, ws.get() + 1, bytes, MergeBackwardMethod::kGemm, Status::kErrorMisalignedPointer},
      {on_default.h, ws.get(), bytes, static_cast<MergeBackwardMethod>(7), Status::kErrorInvalidArgument},
  };
  for (const auto& k : calls) {
    size_t n = k.bytes;
    CHECK(lory::merge_backward(a, k.method, k.ws, n, k.h, nullptr) == k.want);
  }
  cublasDestroy(device_mode);
  LORY_TEST_SYNC();
  const std::vector<T> got_dW = prob.ddW.download(prob.dW.data.size());
  CHECK(std::memcmp(got_dW.data(), prob.dW.data.data(), got_dW.size() * sizeof(T)) == 0);
  CHECK(count_nan(prob.dde.download(prob.de.size())) == static_cast<int64_t>(prob.de.size()));
  CHECK(ws.download(bytes + 16) == poison);
}

// 2-D views (a column slice of a larger matrix merged in place): every kernel path and the GEMM
// method, against a double reference; the poison between rows stays in Wbar and dW.
TEMPLATE_TEST_CASE("merge_forward over 2-D views (CUDA cores, launcher's choice)", "[gpu][merge][view2d]", float,
                   __half, __nv_bfloat16) {
  for (const auto& c : view2d_cases()) {
    run_forward_2d<TestType>(c, MergePath::kSimt);
    run_forward_2d<TestType>(c, MergePath::kAuto);
  }
}

TEMPLATE_TEST_CASE("merge_forward over 2-D views (tensor cores and their variants)", "[gpu][merge][view2d]", __half,
                   __nv_bfloat16) {
  for (const auto& c : view2d_cases()) run_forward_2d<TestType>(c, MergePath::kTensorCore);
  if constexpr (std::is_same<TestType, __nv_bfloat16>::value) {
    lory::detail::for_each_merge_forward_tc_variant([](auto tag) {
      using V = typename decltype(tag)::type;
      for (const auto& c : view2d_cases()) run_forward_2d<TestType, V>(c, MergePath::kTensorCore);
    });
  }
}

TEMPLATE_TEST_CASE("merge_backward over 2-D views (CUDA cores) in every mode", "[gpu][merge][view2d]", float, __half,
                   __nv_bfloat16) {
  run_backward_2d_modes<TestType>({0, 2}, MergePath::kSimt);
}

TEMPLATE_TEST_CASE("merge_backward over 2-D views (tensor cores) in every mode", "[gpu][merge][view2d]", __half,
                   __nv_bfloat16) {
  run_backward_2d_modes<TestType>({1, 2}, MergePath::kTensorCore);
  for (const auto& c : view2d_cases()) run_backward_2d<TestType>(c, BwdMode{}, MergePath::kAuto);
}

TEMPLATE_TEST_CASE("merge_backward over 2-D views (tensor-core variants)", "[gpu][merge][view2d]", __nv_bfloat16) {
  lory::detail::for_each_merge_backward_tc_variant([](auto tag) {
    using V = typename decltype(tag)::type;
    run_backward_2d_modes<TestType, V>({2}, MergePath::kTensorCore);
  });
}

TEMPLATE_TEST_CASE("merge_backward over 2-D views (wgmma variant)", "[gpu][merge][view2d][sm90]", __nv_bfloat16) {
  lory_test::require_wgmma();
  using Wgmma = lory::detail::MergeBackwardWgmma;
  run_backward_2d_modes<TestType, Wgmma>({1, 2}, MergePath::kTensorCore);
  BwdMode m;
  m.accumulate_de = true;
  run_backward_2d<TestType, Wgmma>(kView2DWorkspaceCase, m, MergePath::kTensorCore, 2);
}

TEMPLATE_TEST_CASE("merge_backward over 2-D views (cuBLAS GEMM method, kAuto)", "[gpu][merge][view2d]", float,
                   __half, __nv_bfloat16) {
  using lory::MergeBackwardMethod;
  DefaultStreamHandle handle;
  auto run = [&](const View2DCase& c, const BwdMode& m, MergeBackwardMethod method, int repeats = 1) {
    run_backward_2d_with<TestType>(c, m, std::string("method-") + lory::merge_backward_method_name(method),
                                   [&](const lory::MergeBackwardArgs<TestType, float>& a, void* ws, size_t& bytes) {
                                     return lory::merge_backward(a, method, ws, bytes, handle.h, nullptr);
                                   },
                                   repeats);
  };
  for (const auto& c : view2d_cases()) {
    run(c, BwdMode{}, MergeBackwardMethod::kGemm);
    run(c, BwdMode{}, MergeBackwardMethod::kAuto);
  }
  for (int ci : {0, 2})
    for (int outs = 0; outs < 3; ++outs)
      for (bool acc : {false, true}) {
        BwdMode m;
        m.want_dW = outs != 2;
        m.want_de = outs != 1;
        m.accumulate_dW = acc;
        m.accumulate_de = acc;
        run(view2d_cases()[ci], m, MergeBackwardMethod::kGemm);
      }
  BwdMode m;
  m.accumulate_de = true;
  m.accumulate_dW = true;
  run(kView2DWorkspaceCase, m, MergeBackwardMethod::kGemm, 2);  // bitwise reproducible
}
