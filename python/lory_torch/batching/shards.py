"""The packed-dataset format and its torch Dataset.

A packed dataset is a folder:
  index.json     format, seq_len, count (sequences), dtype, vocabulary (vocab_size, separator_id,
                 pad_id), shards [{file, count, tokens}], num_docs, the options it was built with,
                 the embedder / tokenizer / kNN descriptions and token statistics;
  tokens-NNNNN.bin   raw token rows of `dtype` (uint16 up to 65536 ids, else uint32), row after row,
                 each seq_len tokens (the very last one shorter with leftover "keep");
  pieces.npz     ranges [R, 4] int64 (doc, begin, end, separator) and seq_offsets [count + 1]: the
                 pieces of sequence s are ranges[seq_offsets[s]:seq_offsets[s+1]] (tokens
                 [begin, end) of document doc, doc being its position in the input, then the
                 separator when separator == 1); order (the packing order), dropped (near-duplicates
                 removed), chain_offsets (similarity chains), doc_token_counts.
index.json is written last: a folder without it is an unfinished build.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

FORMAT = "lory-packed-v1"


def read_index(path: str) -> dict:
    f = os.path.join(path, "index.json")
    if not os.path.exists(f):
        raise ValueError(f"path: {path!r} holds no index.json (not a packed dataset, or an unfinished build)")
    with open(f) as fh:
        idx = json.load(fh)
    if idx.get("format") != FORMAT:
        raise ValueError(f"path: {f} has format {idx.get('format')!r}, expected {FORMAT!r}")
    return idx


class PackedSequenceDataset(torch.utils.data.Dataset):
    """Training sequences of a packed dataset: item i is an int64 tensor [seq_len] (the last one
    shorter when the dataset was built with leftover "keep"). With return_docs=True an item is a
    dict: tokens, doc_ids (the documents of its pieces, in order), starts and lengths (where each
    piece sits in the sequence and how many tokens it holds, its separator included), separators
    (whether each piece ends with the separator). Token files are memory-mapped lazily, so the
    dataset is cheap to pickle into DataLoader workers."""

    def __init__(self, path: str, return_docs: bool = False):
        self.path, self.return_docs = path, return_docs
        self.index = read_index(path)
        self.seq_len = int(self.index["seq_len"])
        self.dtype = np.dtype(self.index["dtype"])
        self._shard_start = np.cumsum([0] + [s["count"] for s in self.index["shards"]])
        self._maps: Optional[list] = None
        self._pieces = None

    def __len__(self) -> int:
        return int(self.index["count"])

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_maps"], st["_pieces"] = None, None
        return st

    def _shard_maps(self):
        if self._maps is None:
            self._maps = [np.memmap(os.path.join(self.path, s["file"]), dtype=self.dtype, mode="r", shape=(s["tokens"],))
                          if s["tokens"] else np.zeros(0, self.dtype) for s in self.index["shards"]]
        return self._maps

    def pieces(self):
        if self._pieces is None:
            with np.load(os.path.join(self.path, "pieces.npz")) as z:
                self._pieces = {k: z[k] for k in z.files}
        return self._pieces

    def tokens(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} sequences")
        i %= n
        sh = int(np.searchsorted(self._shard_start, i, side="right") - 1)
        row = i - int(self._shard_start[sh])
        m = self._shard_maps()[sh]
        return m[row * self.seq_len: (row + 1) * self.seq_len]

    def __getitem__(self, i):
        t = torch.from_numpy(self.tokens(int(i)).astype(np.int64))
        if not self.return_docs:
            return t
        p = self.pieces()
        i = int(i) % len(self)
        r = p["ranges"][p["seq_offsets"][i]: p["seq_offsets"][i + 1]]
        lengths = r[:, 2] - r[:, 1] + r[:, 3]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return {"tokens": t, "doc_ids": torch.from_numpy(r[:, 0].copy()), "starts": torch.from_numpy(starts),
                "lengths": torch.from_numpy(lengths.astype(np.int64)), "separators": torch.from_numpy(r[:, 3] == 1)}
