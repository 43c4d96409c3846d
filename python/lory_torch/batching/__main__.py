"""python -m lory_torch.batching: build a packed dataset (similarity or random batching) from a
JSONL file or a folder of text files. Prints a per-stage timing summary at the end."""
from __future__ import annotations

import argparse
import json
import sys


def _float_or_none(v: str):
    return None if v.lower() in ("none", "off") else float(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lory_torch.batching", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="corpus.jsonl (one JSON object per line) or a folder of text files")
    p.add_argument("--text-field", default="text", help="JSONL field holding the document")
    p.add_argument("--out", required=True, help="output folder (index.json, tokens-*.bin, pieces.npz)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence")
    p.add_argument("--k", type=int, default=10, help="neighbours per document in the kNN graph")
    p.add_argument("--embedder", default="tfidf", help="tfidf | contriever:PATH (a local model folder)")
    p.add_argument("--knn", default="auto", choices=["auto", "faiss", "torch"])
    p.add_argument("--faiss-index", default="auto", choices=["auto", "flat", "ivfpq"],
                   help="FAISS index: exact flat up to 200k docs under auto, IVF-PQ above")
    p.add_argument("--order", default="similarity", choices=["similarity", "random"])
    p.add_argument("--tokenizer", default="bytes", help="bytes | hf:PATH | tokenizers:FILE.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the random order")
    p.add_argument("--neighbours-used", type=int, default=0, help="use the first m neighbours when stepping (0: all k)")
    p.add_argument("--max-chain-len", type=int, default=0, help="start a new chain after this many docs (0: no cap)")
    p.add_argument("--merge-short-chains", action="store_true", help="move short chains' docs into long chains")
    p.add_argument("--start", default="min_degree", choices=["min_degree", "first_unvisited"])
    p.add_argument("--dedup-threshold", type=_float_or_none, default=None,
                   help="drop near-duplicates with kNN similarity >= this (none: off)")
    p.add_argument("--boundary", default="split", choices=["split", "move"])
    p.add_argument("--leftover", default="pad", choices=["drop", "pad", "keep"])
    p.add_argument("--shard-seqs", type=int, default=65536, help="sequences per token shard")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from .pipeline import build_packed_dataset

    knn_options = None
    if a.faiss_index != "auto":
        from .knn import faiss_available

        if a.knn == "torch" or not faiss_available():
            print("error: --faiss-index needs the FAISS engine (--knn faiss or auto, with faiss installed)",
                  file=sys.stderr)
            return 2
        knn_options = {"index": a.faiss_index}
    try:
        res = build_packed_dataset(
            a.input, a.out, text_field=a.text_field, seq_len=a.seq_len, k=a.k, embedder=a.embedder, knn=a.knn,
            order=a.order, tokenizer=a.tokenizer, seed=a.seed, neighbours_used=a.neighbours_used,
            max_chain_len=a.max_chain_len, merge_short_chains=a.merge_short_chains, start=a.start,
            dedup_threshold=a.dedup_threshold, boundary=a.boundary, leftover=a.leftover, shard_seqs=a.shard_seqs,
            knn_options=knn_options, overwrite=a.overwrite, show_progress=not a.no_progress,
            verbose=not a.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    idx = res.index
    print(f"{idx['num_docs']} documents ({idx['num_dropped']} dropped as near-duplicates) -> {idx['count']} "
          f"sequences of {idx['seq_len']} tokens ({idx['dtype']}) in {a.out}")
    print(json.dumps(idx["tokens"]))
    print(res.timing_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
