"""build_packed_dataset: corpus -> embeddings -> kNN graph -> similarity order -> packed token shards
(or, for ablations, a seeded random order packed the same way)."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from . import ops
from .corpus import Corpus, read_corpus
from .embed import make_embedder, progress
from .knn import check_embeddings, faiss_available, knn as knn_search, positive_int
from .shards import FORMAT
from .tokenize import make_tokenizer, storage_dtype

ORDERS = ("similarity", "random")
KNN_BACKENDS = ("auto", "faiss", "torch")


@dataclass
class BuildResult:
    path: str
    index: dict
    timings: dict = field(default_factory=dict)  # stage -> seconds

    def timing_table(self) -> str:
        total = sum(self.timings.values())
        lines = [f"{'stage':<10} {'seconds':>9} {'share':>7}"]
        for k, v in self.timings.items():
            lines.append(f"{k:<10} {v:9.3f} {100 * v / max(total, 1e-12):6.1f}%")
        lines.append(f"{'total':<10} {total:9.3f}")
        return "\n".join(lines)


class _Timer:
    def __init__(self, timings: dict, stage: str, verbose: bool):
        self.t, self.stage, self.verbose = timings, stage, verbose

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        self.t[self.stage] = self.t.get(self.stage, 0.0) + dt
        if self.verbose and exc[0] is None:
            print(f"[lory.batching] {self.stage}: {dt:.2f} s", flush=True)


def build_packed_dataset(input: Union[str, Sequence[str], Corpus], out_dir: str, *, text_field: str = "text",
                         seq_len: int = 4096, k: int = 10, embedder="tfidf", knn: str = "auto",
                         order: str = "similarity", tokenizer=None, seed: int = 0, neighbours_used: int = 0,
                         max_chain_len: int = 0, merge_short_chains: bool = False, start: str = "min_degree",
                         dedup_threshold: Optional[float] = None, boundary: str = "split", leftover: str = "pad",
                         shard_seqs: int = 65536, knn_options: Optional[dict] = None, embeddings=None,
                         overwrite: bool = False, show_progress: bool = True, verbose: bool = False) -> BuildResult:
    """Builds a packed dataset in out_dir (format: lory_torch.batching.shards) and returns its index
    and the time of each stage.

    input: a JSONL file (documents in `text_field`), a folder of text files, a list of texts or a
    Corpus. embedder: "tfidf", "contriever:PATH" or an object with embed(texts) (and optionally fit).
    knn: "auto" (FAISS when installed, else exact torch), "faiss" or "torch"; knn_options go to it.
    order: "similarity" (kNN graph + greedy max-similarity traversal) or "random" (seeded shuffle,
    no embedding; the ablation). tokenizer: None / "bytes" (UTF-8 bytes), "hf:PATH",
    "tokenizers:FILE" or an object (see tokenize.py). The traversal options (neighbours_used,
    max_chain_len, merge_short_chains, start, dedup_threshold) and the packing ones (boundary
    "split" | "move", leftover "drop" | "pad" | "keep") are lory/batching.hpp's. embeddings: a
    precomputed float [N, dim] array (skips the embedder)."""
    # Every argument is checked before any work starts.
    seq_len = positive_int(seq_len, "seq_len")
    k = positive_int(k, "k")
    shard_seqs = positive_int(shard_seqs, "shard_seqs")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if knn not in KNN_BACKENDS:
        raise ValueError(f"knn must be one of {KNN_BACKENDS}, got {knn!r}")
    if knn == "faiss" and not faiss_available():
        raise ValueError("knn: 'faiss' requested but faiss is not installed (pip install faiss-cpu)")
    if start not in ops.STARTS:
        raise ValueError(f"start must be one of {ops.STARTS}, got {start!r}")
    if boundary not in ops.BOUNDARIES:
        raise ValueError(f"boundary must be one of {ops.BOUNDARIES}, got {boundary!r}")
    if leftover not in ops.LEFTOVERS:
        raise ValueError(f"leftover must be one of {ops.LEFTOVERS}, got {leftover!r}")
    if not 0 <= neighbours_used <= k:
        raise ValueError(f"neighbours_used must be in [0, k = {k}], got {neighbours_used}")
    if max_chain_len < 0:
        raise ValueError(f"max_chain_len must be >= 0, got {max_chain_len}")
    if merge_short_chains and max_chain_len == 0:
        raise ValueError("merge_short_chains needs max_chain_len > 0")
    if dedup_threshold is not None and not (isinstance(dedup_threshold, (int, float)) and math.isfinite(dedup_threshold)):
        raise ValueError(f"dedup_threshold must be a finite number or None, got {dedup_threshold!r}")
    if os.path.exists(os.path.join(out_dir, "index.json")) and not overwrite:
        raise ValueError(f"out_dir: {out_dir!r} already holds a packed dataset (pass overwrite=True)")
    tok = make_tokenizer(tokenizer)
    ops.load()  # builds the extension on first use: not part of any stage's time
    timings: dict = {}
    pbar = show_progress

    with _Timer(timings, "read", verbose):
        if isinstance(input, Corpus):
            corpus = input
        elif isinstance(input, str):
            corpus = read_corpus(input, text_field=text_field)
        else:
            texts = list(input)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("input: a list of documents must hold strings only")
            corpus = Corpus(texts, [str(i) for i in range(len(texts))])
        if len(corpus) == 0:
            raise ValueError("input: the corpus is empty")
    n = len(corpus)
    texts = corpus.texts
    emb_desc = knn_desc = None
    graph = None
    if order == "similarity":
        with _Timer(timings, "embed", verbose):
            if embeddings is not None:
                emb = check_embeddings(embeddings)
                emb_desc = {"name": "given", "dim": int(emb.shape[1])}
            else:
                e = make_embedder(embedder, show_progress=pbar) if isinstance(embedder, str) else embedder
                if hasattr(e, "fit"):
                    e.fit(texts)
                emb = check_embeddings(e.embed(texts))
                emb_desc = e.describe() if hasattr(e, "describe") else {"name": type(e).__name__}
            if emb.shape[0] != n:
                raise ValueError(f"embeddings: {emb.shape[0]} rows for {n} documents")
        with _Timer(timings, "knn", verbose):
            backend = knn if knn != "auto" else ("faiss" if faiss_available() else "torch")
            ids, sims = knn_search(emb, k, backend=backend, show_progress=pbar, **(knn_options or {}))
            knn_desc = {"backend": backend, "k": k, **{kk: v for kk, v in (knn_options or {}).items()}}
        with _Timer(timings, "order", verbose):
            if n == 1:
                doc_order, dropped, chains = np.zeros(1, np.int64), np.zeros(0, np.int64), np.array([0, 1], np.int64)
            else:
                doc_order, dropped, chains = ops.similarity_order(
                    ids, sims, neighbours_used=neighbours_used, max_chain_len=max_chain_len,
                    merge_short_chains=merge_short_chains, start=start, dedup_threshold=dedup_threshold)
        graph = (ids, sims)
    else:
        with _Timer(timings, "order", verbose):
            doc_order = np.random.default_rng(seed).permutation(n).astype(np.int64)
            dropped, chains = np.zeros(0, np.int64), np.array([0, n], np.int64)

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "index.json")):
        os.remove(os.path.join(out_dir, "index.json"))  # overwrite: the folder is unfinished from here on
    dtype = storage_dtype(tok.vocab_size)
    tmp_tokens = os.path.join(out_dir, "doc_tokens.tmp")
    with _Timer(timings, "tokenize", verbose):
        counts = np.zeros(n, dtype=np.int64)
        batch = 4096
        with open(tmp_tokens, "wb") as f:
            steps = range(0, n, batch)
            for s in progress(steps, total=len(steps), desc="tokenize", enabled=pbar, unit="batch"):
                enc = tok.encode_batch(texts[s: s + batch])
                for j, a in enumerate(enc):
                    if a.size and (a.min() < 0 or a.max() >= tok.vocab_size):
                        raise ValueError(f"tokenizer: document {s + j} has token ids outside [0, {tok.vocab_size})")
                    counts[s + j] = a.size
                if enc:
                    f.write(np.concatenate(enc).astype(dtype).tobytes())
        doc_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=doc_offsets[1:])
    with _Timer(timings, "pack", verbose):
        packing = ops.pack_documents(doc_order, counts, seq_len, separator=tok.separator_id, boundary=boundary,
                                     leftover=leftover, pad_token=tok.pad_id)
    with _Timer(timings, "write", verbose):
        for old in os.listdir(out_dir):
            if old.startswith("tokens-") and old.endswith(".bin"):
                os.remove(os.path.join(out_dir, old))
        total_tokens = int(doc_offsets[-1])
        doc_tokens = (np.memmap(tmp_tokens, dtype=dtype, mode="r", shape=(total_tokens,)) if total_tokens
                      else np.zeros(1, dtype))
        shards = []
        S = packing.num_seqs
        so = packing.seq_offsets
        steps = range(0, S, shard_seqs)
        for i, s0 in enumerate(progress(steps, total=len(steps), desc="write", enabled=pbar, unit="shard")):
            s1 = min(S, s0 + shard_seqs)
            last = s1 == S
            rows = (s1 - s0) * seq_len
            if last and leftover == "keep" and S:
                r = packing.ranges[so[S - 1]: so[S]]
                rows -= seq_len - int((r[:, 2] - r[:, 1] + r[:, 3]).sum())
            name = f"tokens-{i:05d}.bin"
            out = np.memmap(os.path.join(out_dir, name), dtype=dtype, mode="w+", shape=(rows,)) if rows else None
            if out is not None:
                # Only the dataset's very last row may be short: earlier shards are written as "pad".
                ops.write_token_sequences(packing.ranges[so[s0]: so[s1]], so[s0: s1 + 1] - so[s0], doc_tokens,
                                          doc_offsets, seq_len, tok.separator_id, boundary,
                                          leftover if last else "pad", tok.pad_id, out)
                out.flush()
                del out
            else:
                open(os.path.join(out_dir, name), "wb").close()
            shards.append({"file": name, "count": s1 - s0, "tokens": rows})
        del doc_tokens
        os.remove(tmp_tokens)
        np.savez(os.path.join(out_dir, "pieces.npz"), ranges=packing.ranges, seq_offsets=packing.seq_offsets,
                 order=doc_order, dropped=dropped, chain_offsets=chains, doc_token_counts=counts)
        index = {
            "format": FORMAT, "seq_len": seq_len, "count": S, "dtype": dtype.name,
            "vocab_size": tok.vocab_size, "separator_id": tok.separator_id, "pad_id": tok.pad_id,
            "num_docs": n, "num_placed": int(doc_order.size), "num_dropped": int(dropped.size),
            "num_chains": int(chains.size - 1), "shards": shards,
            "tokens": {"documents": total_tokens, "packed": packing.packed_tokens, "output": packing.output_tokens,
                       "dropped_leftover": packing.dropped_tokens},
            "options": {"order": order, "k": k, "seed": seed, "neighbours_used": neighbours_used,
                        "max_chain_len": max_chain_len, "merge_short_chains": merge_short_chains, "start": start,
                        "dedup_threshold": dedup_threshold, "boundary": boundary, "leftover": leftover,
                        "shard_seqs": shard_seqs},
            "embedder": emb_desc, "knn": knn_desc, "tokenizer": tok.describe(),
        }
        tmp = os.path.join(out_dir, "index.json.tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(out_dir, "index.json"))
    res = BuildResult(out_dir, index, timings)
    res.graph = graph  # the kNN graph (ids, sims) of a similarity build, for inspection; not saved
    return res
