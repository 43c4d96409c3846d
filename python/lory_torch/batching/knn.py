"""k nearest neighbours of every document by inner product (cosine on unit rows), self excluded.

Both engines return (ids int64 [N, k], sims float32 [N, k]), each row sorted by descending
similarity, with id -1 (and similarity -inf) where a document has fewer than k other documents.

* "faiss" (faiss-cpu, or faiss-gpu when it sees GPUs): exact IndexFlatIP up to
  FLAT_MAX_DOCS documents; above, IVF{nlist},PQ{m} by inner product as In-Context Pretraining did
  (IVF32768,PQ256, nprobe 64 for 50M-vector shards of 768 dims), scaled to the corpus: nlist the
  power of two nearest 4 sqrt(N), m the largest divisor of dim with at least 3 dims per
  sub-quantiser (256 for 768 dims), nprobe 64 (at most nlist); refine * (k + 1) candidates (refine 4)
  are then re-scored exactly from the embeddings and the best k kept, so the returned similarities
  are exact inner products and the PQ error costs little recall.
* "torch": exact, block-wise matmul + topk in PyTorch with memory bounded by `memory_budget_bytes`
  (query and database blocks; the running top-k is merged block by block).
* "auto": faiss when importable, else torch.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .embed import progress

FLAT_MAX_DOCS = 200_000  # above this, exact search (O(N^2 dim)) gives way to IVF-PQ
DEFAULT_MEMORY_BUDGET = 256 << 20


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def check_embeddings(emb) -> np.ndarray:
    """float32 C-contiguous [N, dim] numpy array of finite values, or ValueError naming the problem."""
    if isinstance(emb, torch.Tensor):
        emb = emb.detach().cpu().numpy()
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, dim], got shape {emb.shape}")
    if emb.dtype not in (np.float32, np.float16, np.float64):
        raise ValueError(f"embeddings must be floating point (float32, float16 or float64), got {emb.dtype}")
    if emb.shape[0] == 0 or emb.shape[1] == 0:
        raise ValueError(f"embeddings are empty (shape {emb.shape})")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise ValueError(f"embeddings hold NaN/Inf in {int(bad.sum())} row(s), first at row {int(np.argmax(bad))}")
    return emb


def positive_int(v, name: str) -> int:
    """v as an int, or ValueError naming the argument unless it is a positive integer (bools refused)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def knn_torch(emb, k: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, device: Optional[str] = None,
              show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN by block-wise matmul + topk. The similarity block [bq, bd] and the running top-k
    stay within memory_budget_bytes."""
    emb = check_embeddings(emb)
    n, dim = emb.shape
    k = positive_int(k, "k")
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
    dev = torch.device(device or "cpu")
    x = torch.from_numpy(emb).to(dev)
    kk = min(k, n - 1)
    ids = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), -np.inf, dtype=np.float32)
    if kk == 0:
        return ids, sims
    # Per query row: a block of bd similarities (+ topk temporaries ~2x) and 2 (kk + bd) merge slots.
    bd = int(min(n, max(kk + 1, memory_budget_bytes // (4 * 4 * 64))))
    bq = int(max(1, min(n, memory_budget_bytes // (4 * 4 * (bd + kk)))))
    steps = range(0, n, bq)
    for q0 in progress(steps, total=len(steps), desc="knn (torch)", enabled=show_progress, unit="block"):
        q = x[q0: q0 + bq]
        rows = torch.arange(q0, q0 + q.shape[0], device=dev)
        best_s = torch.full((q.shape[0], kk), -math.inf, device=dev)
        best_i = torch.full((q.shape[0], kk), -1, dtype=torch.int64, device=dev)
        for d0 in range(0, n, bd):
            s = q @ x[d0: d0 + bd].T
            cols = torch.arange(d0, d0 + s.shape[1], device=dev)
            s.masked_fill_(rows[:, None] == cols[None, :], -math.inf)  # self is never a neighbour
            t = min(kk, s.shape[1])
            bs, bi = torch.topk(s, t, dim=1)
            # Merge with the running best.
            cs, ci = torch.cat([best_s, bs], 1), torch.cat([best_i, bi + d0], 1)
            best_s, pos = torch.topk(cs, kk, dim=1)
            best_i = torch.gather(ci, 1, pos)
        i, sv = _sort_rows(best_i.cpu().numpy(), best_s.cpu().numpy(), kk)
        ids[q0: q0 + q.shape[0], :kk], sims[q0: q0 + q.shape[0], :kk] = i, sv
    return ids, sims


def _sort_rows(i: np.ndarray, s: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """The best kk of each row by descending similarity, equal similarities by ascending id, missing
    (-1 / -inf) last: one canonical order for every engine."""
    i = np.where(np.isneginf(s), -1, i)
    order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), -s), axis=1)[:, :kk]
    return np.take_along_axis(i, order, 1), np.take_along_axis(s, order, 1)


def ivfpq_params(n: int, dim: int) -> dict:
    """IVF-PQ settings scaled from ICLM's (IVF32768,PQ256, nprobe 64 for 50M x 768)."""
    nlist = 1 << max(4, round(math.log2(4 * math.sqrt(n))))
    nlist = min(nlist, 65536, max(16, n // 39))  # k-means wants >= 39 training points per list
    m = max(d for d in range(1, dim + 1) if dim % d == 0 and dim // d >= 3) if dim >= 3 else dim
    return {"nlist": int(nlist), "m": int(m), "nbits": 8, "nprobe": int(min(64, nlist)), "refine": 4}


def knn_faiss(emb, k: int, index: str = "auto", flat_max_docs: int = FLAT_MAX_DOCS,
              ivfpq: Optional[dict] = None, batch_size: int = 16384, use_gpu: bool = True, seed: int = 0,
              show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """kNN with FAISS. index: "flat" (exact), "ivfpq", or "auto" (flat up to flat_max_docs).
    ivfpq: overrides of ivfpq_params(N, dim) (nlist, m, nbits, nprobe, refine)."""
    import faiss

    emb = check_embeddings(emb)
    n, dim = emb.shape
    k = positive_int(k, "k")
    if index not in ("auto", "flat", "ivfpq"):
        raise ValueError(f"index must be 'auto', 'flat' or 'ivfpq', got {index!r}")
    kind = index if index != "auto" else ("flat" if n <= flat_max_docs else "ivfpq")
    if kind == "flat":
        idx = faiss.IndexFlatIP(dim)
    else:
        p = {**ivfpq_params(n, dim), **(ivfpq or {})}
        if p["refine"] < 1:
            raise ValueError(f"ivfpq: refine must be >= 1, got {p['refine']}")
        if dim % p["m"]:
            raise ValueError(f"ivfpq: m = {p['m']} must divide the embedding dim {dim}")
        # "np": no polysemous training (it only serves Hamming pre-filtering, unused here, and
        # dominates the training time).
        idx = faiss.index_factory(dim, f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']}np", faiss.METRIC_INNER_PRODUCT)
    if use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        idx = faiss.index_cpu_to_all_gpus(idx)  # shards / replicates over every visible GPU
    if kind == "ivfpq":
        rng = np.random.default_rng(seed)
        n_train = min(n, max(64 * p["nlist"], 40 << p["nbits"]))
        train = emb[np.sort(rng.choice(n, n_train, replace=False))] if n_train < n else emb
        idx.train(train)
        faiss.ParameterSpace().set_index_parameter(idx, "nprobe", int(p["nprobe"]))
    idx.add(emb)
    kk = min(k, n - 1)
    ids = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), -np.inf, dtype=np.float32)
    if kk == 0:
        return ids, sims
    steps = range(0, n, batch_size)
    for q0 in progress(steps, total=len(steps), desc=f"knn (faiss {kind})", enabled=show_progress, unit="batch"):
        q = emb[q0: q0 + batch_size]
        s, i = idx.search(q, min(n, (kk + 1) * (p["refine"] if kind == "ivfpq" else 1)))
        rows = np.arange(q0, q0 + q.shape[0])[:, None]
        if kind == "ivfpq":
            # PQ scores are approximate: re-score the candidates exactly and re-sort.
            valid = i >= 0
            s = np.where(valid, np.einsum("bd,bkd->bk", q, emb[np.where(valid, i, 0)]), -np.inf).astype(np.float32)
        # Drop self (wherever it landed; an approximate search may miss it), keep the best kk others.
        s = np.where((i == rows) | (i < 0), -np.inf, s)
        ids[q0: q0 + q.shape[0], :kk], sims[q0: q0 + q.shape[0], :kk] = _sort_rows(i, s, kk)
    return ids, sims


def knn(emb, k: int, backend: str = "auto", show_progress: bool = False, **kw) -> tuple[np.ndarray, np.ndarray]:
    """backend: "auto" (faiss when importable, else torch), "faiss" or "torch"."""
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
    if backend == "faiss":
        if not faiss_available():
            raise ValueError("knn: backend 'faiss' requested but faiss is not installed (pip install faiss-cpu)")
        return knn_faiss(emb, k, show_progress=show_progress, **kw)
    if backend == "torch":
        return knn_torch(emb, k, show_progress=show_progress, **kw)
    raise ValueError(f"knn backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
