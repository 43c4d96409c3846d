"""Document embedders: a protocol and two implementations.

Embedder protocol: ``embed(texts: list[str]) -> np.ndarray`` float32 [len(texts), dim] with unit
L2-norm rows (similarity = inner product), an attribute ``dim``, optionally ``fit(texts)`` (the
pipeline calls it once over the whole corpus before embedding) and ``describe() -> dict`` (recorded
in the output's index).

* HashedTfidfEmbedder: no download, deterministic across machines. Character (UTF-8 byte) n-grams
  hashed into 2**18 buckets, sublinear tf, idf fitted on the corpus, then a fixed sparse random
  projection to `dim` dimensions.
* ContrieverEmbedder: facebook/contriever-msmarco (ICLM's embedder) through `transformers`, from a
  local folder: mean of the last hidden layer over the non-padding tokens, documents truncated to
  510 tokens.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol, runtime_checkable

import numpy as np

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


@runtime_checkable
class Embedder(Protocol):
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


def progress(it, total=None, desc="", enabled=True, unit="it"):
    if enabled and tqdm is not None:
        return tqdm(it, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return it


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a fixed, seedable, portable
    hash, so the buckets and the projection are the same on every machine."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class HashedTfidfEmbedder:
    """Hashed character n-gram TF-IDF with a seeded sparse random projection.

    Each text is lower-cased, its whitespace runs collapsed to one space, and its first
    `max_chars` characters encoded as UTF-8; every byte n-gram (n in `ngram_range`) is hashed to
    one of 2**`log2_buckets` buckets. The weight of a bucket in a document is (1 + log tf) * idf,
    idf = log((1 + N) / (1 + df)) + 1 fitted on the corpus; the sparse vector is L2-normalised and
    projected with a count sketch (each bucket adds +-1/sqrt(nnz_per_bucket) to `nnz_per_bucket`
    seeded output dimensions), which preserves inner products in expectation; the result is
    L2-normalised again. Everything is vectorised numpy over batches of documents and uses a fixed
    integer hash (no Python hash(), no RNG streams), so results are bit-identical across runs and
    machines with the same numpy."""

    def __init__(self, dim: int = 256, ngram_range: tuple[int, int] = (3, 5), log2_buckets: int = 18,
                 max_chars: int = 4096, nnz_per_bucket: int = 4, seed: int = 0, batch_size: int = 1024,
                 show_progress: bool = False):
        if dim <= 0:
            raise ValueError(f"dim must be > 0, got {dim}")
        lo, hi = ngram_range
        if not 1 <= lo <= hi <= 8:
            raise ValueError(f"ngram_range must satisfy 1 <= lo <= hi <= 8, got {ngram_range}")
        if not 8 <= log2_buckets <= 30:
            raise ValueError(f"log2_buckets must be in [8, 30], got {log2_buckets}")
        if max_chars <= 0 or nnz_per_bucket <= 0 or batch_size <= 0:
            raise ValueError("max_chars, nnz_per_bucket and batch_size must be > 0")
        self.dim, self.ngram_range, self.log2_buckets = dim, (lo, hi), log2_buckets
        self.max_chars, self.nnz_per_bucket, self.seed = max_chars, nnz_per_bucket, seed
        self.batch_size, self.show_progress = batch_size, show_progress
        self.idf: Optional[np.ndarray] = None
        # Count sketch of the buckets: output dimension and sign of each of the nnz entries.
        b = np.arange(1 << log2_buckets, dtype=np.uint64)[:, None] * np.uint64(nnz_per_bucket)
        h = _splitmix64(b + np.arange(nnz_per_bucket, dtype=np.uint64)[None, :] + np.uint64(seed) * np.uint64(1 << 40))
        self._proj_dim = np.ascontiguousarray((h % np.uint64(dim)).astype(np.int64).T)  # [nnz, buckets]
        self._proj_sign = np.ascontiguousarray(np.where((h >> np.uint64(63)) == 1, -1.0, 1.0).T) / math.sqrt(nnz_per_bucket)

    def describe(self) -> dict:
        return {"name": "tfidf", "dim": self.dim, "ngram_range": list(self.ngram_range),
                "log2_buckets": self.log2_buckets, "max_chars": self.max_chars,
                "nnz_per_bucket": self.nnz_per_bucket, "seed": self.seed}

    # ------------------------------------------------------------------ hashing
    def _bucket_counts(self, texts: list[str]):
        """(doc, bucket, count) of the bucket occurrences in a batch, sorted by (doc, bucket)."""
        encoded = [" ".join(t.lower().split())[: self.max_chars].encode("utf-8") for t in texts]
        lens = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        starts = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lens, out=starts[1:])
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint64)
        total = data.size
        doc_of = np.repeat(np.arange(len(encoded), dtype=np.int64), lens)
        end_of = starts[1:][doc_of] if total else np.zeros(0, np.int64)
        pos = np.arange(total, dtype=np.int64)
        shift = np.uint64(64 - self.log2_buckets)
        keys = []
        h = np.zeros(total, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for n in range(1, self.ngram_range[1] + 1):
                # h[i] = polynomial hash of bytes i .. i+n-1 (bytes past the end read as 0, masked below)
                nxt = np.zeros(total, dtype=np.uint64)
                nxt[: total - (n - 1)] = data[n - 1:]
                h = h * np.uint64(0x100000001B3) + nxt + np.uint64(1)
                if n < self.ngram_range[0]:
                    continue
                ok = pos + n <= end_of
                bucket = (_splitmix64(h[ok] ^ np.uint64(n)) >> shift).astype(np.int64)
                keys.append(doc_of[ok] * (1 << self.log2_buckets) + bucket)
        keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        uniq, counts = np.unique(keys, return_counts=True)
        return uniq >> self.log2_buckets, uniq & ((1 << self.log2_buckets) - 1), counts

    def _batches(self, texts, desc):
        rng = range(0, len(texts), self.batch_size)
        return progress(rng, total=len(rng), desc=desc, enabled=self.show_progress, unit="batch")

    # ------------------------------------------------------------------ protocol
    def fit(self, texts: list[str]) -> "HashedTfidfEmbedder":
        """Fits idf on texts (document frequencies of the buckets)."""
        if len(texts) == 0:
            raise ValueError("texts: cannot fit idf on an empty corpus")
        df = np.zeros(1 << self.log2_buckets, dtype=np.int64)
        for s in self._batches(texts, "tfidf fit"):
            _, bucket, _ = self._bucket_counts(texts[s: s + self.batch_size])
            df += np.bincount(bucket, minlength=df.size)
        n = len(texts)
        self.idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
        return self

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), dim], unit rows. Fits idf on `texts` first when fit() was not
        called."""
        if self.idf is None:
            self.fit(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for s in self._batches(texts, "tfidf embed"):
            batch = texts[s: s + self.batch_size]
            doc, bucket, count = self._bucket_counts(batch)
            w = (1.0 + np.log(count)) * self.idf[bucket]
            norm = np.sqrt(np.bincount(doc, weights=w * w, minlength=len(batch)))
            w = w / np.maximum(norm, 1e-30)[doc]
            # count sketch: each bucket adds sign * w to nnz_per_bucket output dims of its doc's row
            # (one bincount per sketch column: contiguous tables, no [nnz, s] temporaries)
            base = doc * self.dim
            dense = np.zeros(len(batch) * self.dim)
            for j in range(self.nnz_per_bucket):
                dense += np.bincount(base + self._proj_dim[j][bucket], weights=w * self._proj_sign[j][bucket],
                                     minlength=dense.size)
            out[s: s + len(batch)] = dense.reshape(len(batch), self.dim)
        return _normalise_rows(out, fallback_seed=self.seed)


def _normalise_rows(x: np.ndarray, fallback_seed: int = 0) -> np.ndarray:
    """L2-normalises rows in place. A zero row (a text too short for any n-gram) becomes a fixed
    unit vector, so every document stays searchable and the kNN sees no NaN."""
    norm = np.linalg.norm(x.astype(np.float64), axis=1)
    zero = norm == 0
    if zero.any():
        x[zero] = 0.0
        x[zero, fallback_seed % x.shape[1]] = 1.0
        norm[zero] = 1.0
    x /= norm[:, None].astype(x.dtype)
    return x


class ContrieverEmbedder:
    """Contriever (ICLM used facebook/contriever-msmarco) through `transformers`, loaded from a
    local folder or a model name already in the local cache: the mean of the last hidden layer over
    the non-padding tokens (special tokens included, as Contriever's own pooling does), documents
    truncated to `max_length` (510) tokens plus the special tokens, batched. Rows are
    L2-normalised so that inner product = cosine (ICLM searched by inner product)."""

    def __init__(self, path: str, device: Optional[str] = None, batch_size: int = 64, max_length: int = 510,
                 dtype=None, show_progress: bool = False, local_files_only: bool = True):
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError("the contriever embedder needs `transformers` (pip install transformers)") from e
        if max_length <= 0 or batch_size <= 0:
            raise ValueError("max_length and batch_size must be > 0")
        self.path, self.batch_size, self.max_length, self.show_progress = path, batch_size, max_length, show_progress
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
        self.model = AutoModel.from_pretrained(path, local_files_only=local_files_only)
        self.model.to(self.device, dtype=dtype).eval()
        self.dim = int(self.model.config.hidden_size)
        # max_length counts the document's tokens; [CLS] / [SEP] come on top (510 + 2 = BERT's 512).
        self._max_total = max_length + self.tokenizer.num_special_tokens_to_add(pair=False)

    def describe(self) -> dict:
        return {"name": "contriever", "path": self.path, "dim": self.dim, "max_length": self.max_length}

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Longest first: batches of similar lengths waste less padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        rng = range(0, len(texts), self.batch_size)
        with torch.inference_mode():
            for s in progress(rng, total=len(rng), desc="contriever", enabled=self.show_progress, unit="batch"):
                idx = order[s: s + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self._max_total, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state                     # [b, t, dim]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
                out[idx] = mean.float().cpu().numpy()
        return _normalise_rows(out)


def make_embedder(spec: str, **kw) -> Embedder:
    """"tfidf" or "contriever:PATH" (a local folder with the model's weights and tokenizer)."""
    if spec == "tfidf":
        return HashedTfidfEmbedder(**{k: v for k, v in kw.items() if k in ("dim", "seed", "show_progress")})
    if spec.startswith("contriever:"):
        path = spec.split(":", 1)[1]
        if not path:
            raise ValueError("embedder: contriever needs a path, as contriever:PATH")
        return ContrieverEmbedder(path, **{k: v for k, v in kw.items() if k in ("device", "show_progress")})
    raise ValueError(f"embedder must be 'tfidf' or 'contriever:PATH', got {spec!r}")
