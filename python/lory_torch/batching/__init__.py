"""Similarity-based batching (In-Context Pretraining, as Lory trains with it): documents are
embedded, linked to their k nearest neighbours, ordered by a greedy max-similarity walk over that
graph (lory/batching.hpp, bound as torch.ops.lory.similarity_order) and packed into fixed-length
training sequences (torch.ops.lory.pack_documents / write_token_sequences) stored as memory-mapped
token shards. A seeded random order packed the same way is the ablation baseline.

    from lory_torch.batching import build_packed_dataset, PackedSequenceDataset
    build_packed_dataset("corpus.jsonl", "packed/", seq_len=4096, k=10)
    ds = PackedSequenceDataset("packed/")          # ds[i]: int64 tensor [4096]

Command line: python -m lory_torch.batching --help.
"""
from .corpus import Corpus, read_corpus, sample_corpus, write_jsonl
from .embed import ContrieverEmbedder, Embedder, HashedTfidfEmbedder, make_embedder
from .knn import knn, knn_faiss, knn_torch
from .ops import Packing, pack_documents, similarity_order, write_token_sequences
from .pipeline import BuildResult, build_packed_dataset
from .shards import PackedSequenceDataset, read_index
from .tokenize import ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = [
    "BuildResult", "ByteTokenizer", "ContrieverEmbedder", "Corpus", "Embedder", "HFTokenizer", "HashedTfidfEmbedder",
    "PackedSequenceDataset", "Packing", "build_packed_dataset", "knn", "knn_faiss", "knn_torch", "make_embedder",
    "make_tokenizer", "pack_documents", "read_corpus", "read_index", "sample_corpus", "similarity_order",
    "write_jsonl", "write_token_sequences",
]
