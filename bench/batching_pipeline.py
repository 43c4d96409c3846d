#!/usr/bin/env python3
"""Times each stage of the similarity-batching pipeline (lory_torch.batching) on a corpus of text
installed on this machine (Python sources, C headers, licences, Perl modules; the tests' builder,
bigger), with baselines in the same run:
  * the whole pipeline with similarity order, then with random order (the ablation);
  * kNN: exact torch (block-wise matmul + topk) vs FAISS flat vs FAISS IVF-PQ (recall vs exact);
  * order: the library's traversal (torch.ops.lory.similarity_order) vs the same walk in plain Python;
  * quality: fraction of consecutive documents from the same domain, similarity vs random order.
usage: python3 bench/batching_pipeline.py [--docs 12000] [--seq-len 4096] [--k 10] [--out DIR]
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from lory_torch.batching import build_packed_dataset, ops, reference, sample_corpus, write_jsonl  # noqa: E402
from lory_torch.batching.embed import HashedTfidfEmbedder  # noqa: E402
from lory_torch.batching.knn import faiss_available, ivfpq_params, knn_faiss, knn_torch  # noqa: E402


def timed(fn, *a, **kw):
    t = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t


def same_domain_adjacent(order, domains):
    d = np.asarray(domains)[order]
    return float((d[1:] == d[:-1]).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=12000)
    ap.add_argument("--chunk-chars", type=int, default=600)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch and FAISS (0: their defaults). On a shared machine, 1 avoids "
                         "OpenMP spin-waiting against other jobs (FAISS training slows several-fold)")
    a = ap.parse_args()
    work = a.out or tempfile.mkdtemp(prefix="lory_batching_bench_")
    os.makedirs(work, exist_ok=True)
    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
        if faiss_available():
            import faiss

            faiss.omp_set_num_threads(a.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), faiss {'yes' if faiss_available() else 'no'}")
    docs, t_corpus = timed(sample_corpus, a.docs, seed=0, chunk_chars=a.chunk_chars)
    domains = [d["domain"] for d in docs]
    path = os.path.join(work, "corpus.jsonl")
    write_jsonl(docs, path)
    mb = os.path.getsize(path) / 1e6
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB JSONL, domains "
          f"{ {d: domains.count(d) for d in sorted(set(domains))} } (built in {t_corpus:.1f} s)")
    ops.load()
    results = {"docs": len(docs), "jsonl_mb": mb}

    # --- the pipeline, stage by stage (CLI defaults: tf-idf, FAISS when installed)
    rows = []
    for order in ("similarity", "random"):
        r = build_packed_dataset(path, os.path.join(work, order), seq_len=a.seq_len, k=a.k, order=order,
                                 overwrite=True, show_progress=False)
        rows.append((order, r))
        results[f"pipeline_{order}"] = r.timings
    stages = ["read", "embed", "knn", "order", "tokenize", "pack", "write"]
    print(f"\npipeline stages (seconds), seq_len {a.seq_len}, k {a.k}, knn "
          f"{rows[0][1].index['knn']['backend']}:")
    print(f"{'stage':<10}" + "".join(f"{o:>12}" for o, _ in rows))
    for s in stages:
        print(f"{s:<10}" + "".join(f"{r.timings[s]:12.3f}" if s in r.timings else f"{'-':>12}" for _, r in rows))
    print(f"{'total':<10}" + "".join(f"{sum(r.timings.values()):12.3f}" for _, r in rows))
    idx = rows[0][1].index
    print(f"-> {idx['count']} sequences, {idx['tokens']['packed']} tokens packed")

    # --- kNN engines on the same embeddings
    emb = HashedTfidfEmbedder().embed([d["text"] for d in docs])
    (ids_t, sims_t), t_torch = timed(knn_torch, emb, a.k)
    print(f"\nkNN of {len(emb)} x {emb.shape[1]} embeddings, k = {a.k} (seconds; recall@{a.k} vs exact):")
    print(f"  torch exact (block matmul + topk) {t_torch:8.3f}   1.000")
    results["knn"] = {"torch_exact": t_torch}
    if faiss_available():
        (ids_f, _), t_flat = timed(knn_faiss, emb, a.k, index="flat")
        rec = np.mean([len(set(x) & set(y)) / a.k for x, y in zip(ids_f.tolist(), ids_t.tolist())])
        print(f"  faiss IndexFlatIP                 {t_flat:8.3f}   {rec:.3f}   (exact too: below 1 only where "
              "equal similarities tie at rank k)")
        p = ivfpq_params(len(emb), emb.shape[1])
        (ids_q, _), t_q = timed(knn_faiss, emb, a.k, index="ivfpq")
        rec_q = np.mean([len(set(x) & set(y)) / a.k for x, y in zip(ids_q.tolist(), ids_t.tolist())])
        print(f"  faiss IVF{p['nlist']},PQ{p['m']} nprobe {p['nprobe']:<4}      {t_q:8.3f}   {rec_q:.3f}"
              "   (train + add + search + exact re-scoring)")
        results["knn"].update({"faiss_flat": t_flat, "faiss_flat_recall": rec, "faiss_ivfpq": t_q,
                               "faiss_ivfpq_recall": rec_q, "ivfpq": p})

    # --- the traversal: library vs plain Python
    (order_lib, _, _), t_lib = timed(ops.similarity_order, ids_t, sims_t)
    (order_py, _), t_py = timed(reference.similarity_order, ids_t, sims_t)
    same = np.array_equal(order_lib, order_py)
    print(f"\norder of {len(emb)} docs (k = {a.k}): lory similarity_order {t_lib * 1e3:.1f} ms, plain Python "
          f"{t_py * 1e3:.1f} ms ({t_py / t_lib:.0f}x); same order: {same}")
    results["order"] = {"lory": t_lib, "python": t_py, "same": bool(same)}

    # --- quality: same-domain neighbours in packing order
    q = {}
    for o, r in rows:
        with np.load(os.path.join(r.path, "pieces.npz")) as z:
            q[o] = same_domain_adjacent(z["order"], domains)
    chance = sum((np.asarray(domains) == d).mean() ** 2 for d in set(domains))
    print(f"\nconsecutive documents from the same domain: similarity {q['similarity']:.3f}, random "
          f"{q['random']:.3f} (chance {chance:.3f})")
    results["same_domain_adjacent"] = {**q, "chance": chance}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
