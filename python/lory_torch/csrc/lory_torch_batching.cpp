// lory PyTorch extension: similarity batching (lory/batching.hpp) as CPU ops.
//
//   similarity_order(ids [N, k] int64|int32, sims [N, k] float32, neighbours_used, max_chain_len,
//                    merge_short_chains, start, dedup_threshold)
//       -> (order [num_placed] int64, dropped [num_dropped] int64, chain_offsets [chains + 1] int64)
//   pack_documents(order [M] int64, doc_token_counts [N] int64, seq_len, separator, boundary,
//                  leftover, pad_token)
//       -> (ranges [R, 4] int64 (doc, begin, end, separator), seq_offsets [S + 1] int64,
//           sizes [5] int64 (num_seqs, num_ranges, output_tokens, packed_tokens, dropped_tokens))
//   write_token_sequences(ranges, seq_offsets, tokens [T], doc_offsets [N + 1] int64, seq_len,
//                         separator, boundary, leftover, pad_token, out [capacity]) -> ()
//       tokens and out share one integer dtype (uint8, uint16, uint32, int32, int64); out may be a
//       memory-mapped file (torch.from_numpy of an np.memmap).
//
// The graph rows may be strided (ids.stride(0) == sims.stride(0) >= k, unit column stride), so a
// memory-mapped graph or a view that skips a self column is read in place. Every failure of the
// library raises ValueError naming the argument at fault; nothing is written then.
#include <torch/library.h>

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "lory/batching.hpp"
#include "lory/status.hpp"
#include "lory_torch_common.h"

namespace lory_torch {
namespace {

namespace lb = lory::batching;
using at::Tensor;

// Raises ValueError naming the argument the library blamed (lory::last_error_detail(), set by the
// failed call on this thread): "lory::<op>: <argument>: <reason>: <status>".
void check_ok(lory::Status s, const char* op) {
  if (s == lory::Status::kSuccess) return;
  const lory::ErrorDetail e = lory::last_error_detail();
  TORCH_CHECK_VALUE(false, "lory::", op, ": ", e.argument[0] ? e.argument : "(no argument named)",
                    e.reason[0] ? ": " : "", e.reason, ": ", lory::status_string(s));
}

// int64 output; under LORY_TORCH_POISON=1 (the tests) filled with a value no valid output holds,
// so an element the library never wrote shows up.
Tensor new_index_output(at::IntArrayRef sizes) {
  Tensor t = at::empty(sizes, at::TensorOptions().dtype(at::kLong));
  if (poison_outputs() && t.numel() > 0) t.fill_(std::numeric_limits<int64_t>::min());
  return t;
}

void check_cpu(const Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "lory::", op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// A 1-D int64 CPU tensor, contiguous (copied only when it is not).
Tensor int64_vector(const Tensor& t, const char* name, const char* op) {
  check_cpu(t, name, op);
  TORCH_CHECK_VALUE(t.dim() == 1, "lory::", op, ": ", name, " must be 1-D, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, "lory::", op, ": ", name, " must be int64, got ", t.scalar_type());
  return t.contiguous();
}

lb::PackOptions pack_options(int64_t seq_len, int64_t separator, const std::string& boundary,
                             const std::string& leftover, int64_t pad_token, const char* op) {
  lb::PackOptions o;
  o.seq_len = seq_len;
  o.separator = separator;
  o.pad_token = pad_token;
  if (boundary == "split") o.boundary = lb::PackOptions::Boundary::kSplit;
  else if (boundary == "move") o.boundary = lb::PackOptions::Boundary::kMove;
  else TORCH_CHECK_VALUE(false, "lory::", op, ": boundary must be \"split\" or \"move\", got \"", boundary, "\"");
  if (leftover == "drop") o.leftover = lb::PackOptions::Leftover::kDrop;
  else if (leftover == "pad") o.leftover = lb::PackOptions::Leftover::kPad;
  else if (leftover == "keep") o.leftover = lb::PackOptions::Leftover::kKeepShort;
  else TORCH_CHECK_VALUE(false, "lory::", op, ": leftover must be \"drop\", \"pad\" or \"keep\", got \"", leftover, "\"");
  return o;
}

std::tuple<Tensor, Tensor, Tensor> similarity_order_cpu(const Tensor& ids_in, const Tensor& sims_in,
                                                        int64_t neighbours_used, int64_t max_chain_len,
                                                        bool merge_short_chains, const std::string& start,
                                                        std::optional<double> dedup_threshold) {
  const char* op = "similarity_order";
  check_cpu(ids_in, "ids", op);
  check_cpu(sims_in, "sims", op);
  TORCH_CHECK_VALUE(ids_in.dim() == 2, "lory::", op, ": ids must be 2-D [N, k], got ", ids_in.dim(), "-D");
  TORCH_CHECK_VALUE(sims_in.sizes() == ids_in.sizes(), "lory::", op, ": sims has shape ", sims_in.sizes(),
                    ", expected ids' shape ", ids_in.sizes());
  TORCH_CHECK_VALUE(ids_in.scalar_type() == at::kLong || ids_in.scalar_type() == at::kInt, "lory::", op,
                    ": ids must be int64 or int32, got ", ids_in.scalar_type());
  TORCH_CHECK_VALUE(sims_in.scalar_type() == at::kFloat, "lory::", op, ": sims must be float32, got ",
                    sims_in.scalar_type());
  const int64_t N = ids_in.size(0), k = ids_in.size(1);
  TORCH_CHECK_VALUE(N > 0, "lory::", op, ": ids has no row (empty corpus)");
  TORCH_CHECK_VALUE(k > 0, "lory::", op, ": ids has no column (k = 0)");
  // Rows are read in place when both tensors share a row stride with unit column stride.
  Tensor ids = ids_in, sims = sims_in;
  const bool in_place = (k == 1 || (ids.stride(1) == 1 && sims.stride(1) == 1)) && ids.stride(0) == sims.stride(0) &&
                        ids.stride(0) >= k;
  if (!in_place) {
    ids = ids.contiguous();
    sims = sims.contiguous();
  }
  lb::OrderArgs a;
  a.graph.num_docs = N;
  a.graph.k = k;
  a.graph.row_stride = N == 1 ? k : ids.stride(0);
  if (ids.scalar_type() == at::kLong) a.graph.ids64 = ids.const_data_ptr<int64_t>();
  else a.graph.ids32 = ids.const_data_ptr<int32_t>();
  a.graph.sims = sims.const_data_ptr<float>();
  a.options.neighbours_used = neighbours_used;
  a.options.max_chain_len = max_chain_len;
  a.options.merge_short_chains = merge_short_chains;
  if (start == "min_degree") a.options.start = lb::OrderOptions::Start::kMinDegree;
  else if (start == "first_unvisited") a.options.start = lb::OrderOptions::Start::kFirstUnvisited;
  else TORCH_CHECK_VALUE(false, "lory::", op, ": start must be \"min_degree\" or \"first_unvisited\", got \"", start, "\"");
  if (dedup_threshold.has_value()) {
    TORCH_CHECK_VALUE(!std::isnan(*dedup_threshold), "lory::", op, ": dedup_threshold is NaN (pass None to disable)");
    a.options.dedup_threshold = static_cast<float>(*dedup_threshold);
  }
  Tensor order = new_index_output({N}), dropped = new_index_output({N}), chains = new_index_output({N + 1});
  int64_t num = 0, num_dropped = 0, num_chains = 0;
  a.order_out = order.data_ptr<int64_t>();
  a.num_out = &num;
  a.dropped_out = dropped.data_ptr<int64_t>();
  a.num_dropped = &num_dropped;
  a.chain_offsets_out = chains.data_ptr<int64_t>();
  a.num_chains = &num_chains;
  size_t bytes = 0;
  check_ok(lb::similarity_order(a, nullptr, bytes), op);
  Tensor ws = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
  check_ok(lb::similarity_order(a, ws.data_ptr(), bytes), op);
  return {order.narrow(0, 0, num), dropped.narrow(0, 0, num_dropped), chains.narrow(0, 0, num_chains + 1)};
}

std::tuple<Tensor, Tensor, Tensor> pack_documents_cpu(const Tensor& order_in, const Tensor& counts_in,
                                                      int64_t seq_len, int64_t separator,
                                                      const std::string& boundary, const std::string& leftover,
                                                      int64_t pad_token) {
  const char* op = "pack_documents";
  const Tensor order = int64_vector(order_in, "order", op);
  const Tensor counts = int64_vector(counts_in, "doc_token_counts", op);
  lb::PackArgs a;
  a.order = order.const_data_ptr<int64_t>();
  a.num_ordered = order.numel();
  a.doc_token_counts = counts.const_data_ptr<int64_t>();
  a.num_docs = counts.numel();
  a.options = pack_options(seq_len, separator, boundary, leftover, pad_token, op);
  lb::PackSizes sizes;
  a.sizes = &sizes;
  size_t bytes = 0;
  check_ok(lb::pack_documents(a, nullptr, bytes), op);  // sizes only
  Tensor ranges = new_index_output({sizes.num_ranges, 4});
  Tensor seq_offsets = new_index_output({sizes.num_seqs + 1});
  Tensor ws = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
  a.ranges_out = reinterpret_cast<lb::PackedRange*>(ranges.data_ptr<int64_t>());
  a.ranges_capacity = sizes.num_ranges;
  a.seq_offsets_out = seq_offsets.data_ptr<int64_t>();
  a.seq_offsets_capacity = sizes.num_seqs + 1;
  check_ok(lb::pack_documents(a, ws.data_ptr(), bytes), op);
  Tensor s = at::empty({5}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = s.data_ptr<int64_t>();
  p[0] = sizes.num_seqs;
  p[1] = sizes.num_ranges;
  p[2] = sizes.output_tokens;
  p[3] = sizes.packed_tokens;
  p[4] = sizes.dropped_tokens;
  return {ranges, seq_offsets, s};
}

template <class Token>
void write_rows(lb::WriteArgs<Token>& a, const Tensor& tokens, Tensor& out) {
  a.tokens = tokens.const_data_ptr<Token>();
  a.out = out.mutable_data_ptr<Token>();
  check_ok(lb::write_token_sequences(a), "write_token_sequences");
}

void write_token_sequences_cpu(const Tensor& ranges_in, const Tensor& seq_offsets_in, const Tensor& tokens_in,
                               const Tensor& doc_offsets_in, int64_t seq_len, int64_t separator,
                               const std::string& boundary, const std::string& leftover, int64_t pad_token,
                               Tensor& out) {
  const char* op = "write_token_sequences";
  check_cpu(ranges_in, "ranges", op);
  TORCH_CHECK_VALUE(ranges_in.dim() == 2 && ranges_in.size(1) == 4 && ranges_in.scalar_type() == at::kLong,
                    "lory::", op, ": ranges must be [R, 4] int64, got ", ranges_in.sizes(), " ", ranges_in.scalar_type());
  const Tensor ranges = ranges_in.contiguous();
  const Tensor seq_offsets = int64_vector(seq_offsets_in, "seq_offsets", op);
  const Tensor doc_offsets = int64_vector(doc_offsets_in, "doc_offsets", op);
  TORCH_CHECK_VALUE(seq_offsets.numel() >= 1, "lory::", op, ": seq_offsets needs num_seqs + 1 >= 1 entries");
  TORCH_CHECK_VALUE(doc_offsets.numel() >= 1, "lory::", op, ": doc_offsets needs num_docs + 1 >= 1 entries");
  check_cpu(tokens_in, "tokens", op);
  check_cpu(out, "out", op);
  TORCH_CHECK_VALUE(tokens_in.dim() == 1, "lory::", op, ": tokens must be 1-D, got ", tokens_in.dim(), "-D");
  TORCH_CHECK_VALUE(out.dim() == 1 && out.is_contiguous(), "lory::", op, ": out must be a contiguous 1-D tensor");
  TORCH_CHECK_VALUE(out.scalar_type() == tokens_in.scalar_type(), "lory::", op, ": out has dtype ",
                    out.scalar_type(), ", expected tokens' dtype ", tokens_in.scalar_type());
  const Tensor tokens = tokens_in.contiguous();
  // The last doc offset must lie inside tokens; the library trusts doc_offsets for the reads.
  const int64_t last = doc_offsets.const_data_ptr<int64_t>()[doc_offsets.numel() - 1];
  TORCH_CHECK_VALUE(last <= tokens.numel(), "lory::", op, ": doc_offsets ends at ", last, " but tokens holds ",
                    tokens.numel(), " tokens");
  const int64_t R = ranges.size(0);
  const int64_t S = seq_offsets.numel() - 1;
  TORCH_CHECK_VALUE(seq_offsets.const_data_ptr<int64_t>()[S] <= R, "lory::", op, ": seq_offsets ends at ",
                    seq_offsets.const_data_ptr<int64_t>()[S], " but ranges has ", R, " rows");
  const lb::PackOptions o = pack_options(seq_len, separator, boundary, leftover, pad_token, op);
  auto fill = [&](auto& a) {
    a.ranges = reinterpret_cast<const lb::PackedRange*>(ranges.const_data_ptr<int64_t>());
    a.seq_offsets = seq_offsets.const_data_ptr<int64_t>();
    a.num_seqs = S;
    a.options = o;
    a.doc_offsets = doc_offsets.const_data_ptr<int64_t>();
    a.num_docs = doc_offsets.numel() - 1;
    a.out_capacity = out.numel();
  };
  switch (tokens.scalar_type()) {
#define LORY_WRITE_CASE(ST, T) \
  case ST: {                   \
    lb::WriteArgs<T> a;        \
    fill(a);                   \
    write_rows(a, tokens, out); \
    return;                    \
  }
    LORY_WRITE_CASE(at::kByte, uint8_t)
    LORY_WRITE_CASE(at::kUInt16, uint16_t)
    LORY_WRITE_CASE(at::kUInt32, uint32_t)
    LORY_WRITE_CASE(at::kInt, int32_t)
    LORY_WRITE_CASE(at::kLong, int64_t)
#undef LORY_WRITE_CASE
    default:
      TORCH_CHECK_VALUE(false, "lory::", op, ": tokens must be uint8, uint16, uint32, int32 or int64, got ",
                        tokens.scalar_type());
  }
}

}  // namespace
}  // namespace lory_torch

TORCH_LIBRARY_FRAGMENT(lory, m) {
  m.def("similarity_order(Tensor ids, Tensor sims, int neighbours_used=0, int max_chain_len=0, "
        "bool merge_short_chains=False, str start=\"min_degree\", float? dedup_threshold=None) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("pack_documents(Tensor order, Tensor doc_token_counts, int seq_len, int separator=-1, "
        "str boundary=\"split\", str leftover=\"pad\", int pad_token=0) -> (Tensor, Tensor, Tensor)");
  m.def("write_token_sequences(Tensor ranges, Tensor seq_offsets, Tensor tokens, Tensor doc_offsets, int seq_len, "
        "int separator, str boundary, str leftover, int pad_token, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(lory, CPU, m) {
  m.impl("similarity_order", &lory_torch::similarity_order_cpu);
  m.impl("pack_documents", &lory_torch::pack_documents_cpu);
  m.impl("write_token_sequences", &lory_torch::write_token_sequences_cpu);
}
