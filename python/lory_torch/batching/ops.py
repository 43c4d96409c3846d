"""The library's traversal and packing (lory/batching.hpp) as Python functions over numpy arrays,
torch tensors or memory-mapped arrays (np.memmap: read in place through torch.from_numpy).
Bad arguments raise ValueError naming the argument (the library's own checks included)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

STARTS = ("min_degree", "first_unvisited")
BOUNDARIES = ("split", "move")
LEFTOVERS = ("drop", "pad", "keep")


def load():
    """Builds / loads the lory extension (the ops below need it)."""
    import lory_torch

    lory_torch.load()


def _ops():
    load()
    return torch.ops.lory


def as_tensor(x, name: str) -> torch.Tensor:
    """A CPU tensor sharing memory with x where possible (numpy arrays, memmaps, tensors)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if not x.dtype.isnative:
            raise ValueError(f"{name}: byte-swapped arrays are not supported")
        with warnings.catch_warnings():
            # A read-only memmap is only read by the ops; torch warns about non-writable arrays.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(x)
    if isinstance(x, (list, tuple)):
        return torch.as_tensor(x)
    raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def similarity_order(ids, sims, neighbours_used: int = 0, max_chain_len: int = 0, merge_short_chains: bool = False,
                     start: str = "min_degree", dedup_threshold: Optional[float] = None):
    """The greedy max-similarity order over a kNN graph: ids [N, k] (int64 or int32, -1 = missing)
    and sims [N, k] float32, rows sorted by descending similarity, no self loops.
    Returns (order, dropped, chain_offsets) as int64 numpy arrays: the placed docs in order, the
    near-duplicates dropped (dedup_threshold), and the chains (chain c = order[off[c]:off[c+1]])."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if dedup_threshold is not None and not np.isfinite(dedup_threshold):
        raise ValueError(f"dedup_threshold must be a finite number or None, got {dedup_threshold!r}")
    o, d, c = _ops().similarity_order(as_tensor(ids, "ids"), as_tensor(sims, "sims"), int(neighbours_used),
                                      int(max_chain_len), bool(merge_short_chains), start,
                                      None if dedup_threshold is None else float(dedup_threshold))
    return o.numpy(), d.numpy(), c.numpy()


@dataclass
class Packing:
    """Sequence s is made of ranges[seq_offsets[s]:seq_offsets[s+1]], each (doc, begin, end,
    separator): tokens [begin, end) of doc, then the separator when separator == 1."""
    ranges: np.ndarray        # [R, 4] int64
    seq_offsets: np.ndarray   # [S + 1] int64
    num_seqs: int
    output_tokens: int        # tokens in the rows, padding included
    packed_tokens: int        # document tokens + separators kept
    dropped_tokens: int       # tokens of a dropped leftover


def pack_documents(order, doc_token_counts, seq_len: int, separator: int = -1, boundary: str = "split",
                   leftover: str = "pad", pad_token: int = 0) -> Packing:
    """Packs the docs of `order` (their token counts in doc_token_counts [N]) into sequences of
    seq_len tokens (see lory/batching.hpp: boundary "split" | "move", leftover "drop" | "pad" | "keep")."""
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    if leftover not in LEFTOVERS:
        raise ValueError(f"leftover must be one of {LEFTOVERS}, got {leftover!r}")
    r, s, z = _ops().pack_documents(as_tensor(order, "order"), as_tensor(doc_token_counts, "doc_token_counts"),
                                    int(seq_len), int(separator), boundary, leftover, int(pad_token))
    z = z.tolist()
    return Packing(r.numpy(), s.numpy(), z[0], z[2], z[3], z[4])


def write_token_sequences(packing_ranges, seq_offsets, tokens, doc_offsets, seq_len: int, separator: int,
                          boundary: str, leftover: str, pad_token: int, out) -> None:
    """Writes the token rows of packed ranges into out (1-D, tokens' dtype; may be an np.memmap)."""
    _ops().write_token_sequences(as_tensor(packing_ranges, "ranges"), as_tensor(seq_offsets, "seq_offsets"),
                                 as_tensor(tokens, "tokens"), as_tensor(doc_offsets, "doc_offsets"), int(seq_len),
                                 int(separator), boundary, leftover, int(pad_token), as_tensor(out, "out"))
