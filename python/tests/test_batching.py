"""Tests of the similarity-batching pipeline (lory_torch.batching): embedders, kNN engines,
tokenizers, the traversal / packing ops, the packed-shard format and the CLI, on a small real
corpus made of text installed on this machine (Python sources, C headers, licences, Perl modules)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lory_torch.batching import corpus as corpus_mod
from lory_torch.batching.embed import ContrieverEmbedder, HashedTfidfEmbedder, make_embedder
from lory_torch.batching.knn import faiss_available, ivfpq_params, knn, knn_faiss, knn_torch
from lory_torch.batching.tokenize import ByteTokenizer, HFTokenizer, storage_dtype

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install faiss-cpu)")


@pytest.fixture(scope="session")
def docs():
    """~480 documents from 4 domains (fewer where a domain is missing)."""
    d = corpus_mod.sample_corpus(480, seed=1, chunk_chars=1200)
    assert len({x["domain"] for x in d}) >= 2, "the sample corpus needs at least two domains"
    return d


@pytest.fixture(scope="session")
def texts(docs):
    return [x["text"] for x in docs]


@pytest.fixture(scope="session")
def tfidf_emb(texts):
    return HashedTfidfEmbedder().fit(texts).embed(texts)


def _exact_knn(emb, k):
    s = emb.astype(np.float64) @ emb.astype(np.float64).T
    np.fill_diagonal(s, -np.inf)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, 1)


def _untied(emb, k, tol=1e-5):
    """[N, k] mask of the ranks whose reference similarity is more than tol away from the ranks
    next to it (including rank k + 1): there, every correct engine returns the same id."""
    _, s = _exact_knn(emb, k + 1)
    gap = np.abs(np.diff(s, axis=1)) > tol  # [N, k]: rank j vs j + 1
    clear = gap.copy()
    clear[:, 1:] &= gap[:, :-1]
    return clear


# --------------------------------------------------------------------------- corpus


def test_sample_corpus_is_balanced_and_seeded(docs):
    doms = [x["domain"] for x in docs]
    counts = {d: doms.count(d) for d in set(doms)}
    assert max(counts.values()) - min(counts.values()) <= len(docs) // 4 + 1, counts
    assert all(len(x["text"].strip()) >= 200 for x in docs)
    again = corpus_mod.sample_corpus(480, seed=1, chunk_chars=1200)
    assert [x["text"] for x in again] == [x["text"] for x in docs]


def test_read_corpus_jsonl_and_folder(tmp_path, docs):
    p = tmp_path / "c.jsonl"
    corpus_mod.write_jsonl([{"body": x["text"], "id": i} for i, x in enumerate(docs[:20])], str(p))
    c = corpus_mod.read_corpus(str(p), text_field="body")
    assert c.texts == [x["text"] for x in docs[:20]]
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    for i, x in enumerate(docs[:5]):
        (folder / ("sub" if i % 2 else "") / f"{i}.txt").write_text(x["text"])
    (folder / "bin.dat").write_bytes(b"\0\1\2")  # binary: skipped
    c = corpus_mod.read_corpus(str(folder))
    assert len(c) == 5 and sorted(c.texts) == sorted(x["text"] for x in docs[:5])


def test_read_corpus_bad_inputs(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"text_field.*:2 has no field 'text'"):
        corpus_mod.read_corpus(str(p))
    p.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="text_field.*int"):
        corpus_mod.read_corpus(str(p))
    p.write_text('{"text": "a"\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        corpus_mod.read_corpus(str(p))
    p.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no document"):
        corpus_mod.read_corpus(str(p))
    with pytest.raises(ValueError, match="does not exist"):
        corpus_mod.read_corpus(str(tmp_path / "missing.jsonl"))


# --------------------------------------------------------------------------- embedders


def test_tfidf_unit_rows_deterministic_and_domain_aware(texts, docs, tfidf_emb):
    e = tfidf_emb
    assert e.dtype == np.float32 and e.shape == (len(texts), 256)
    np.testing.assert_allclose(np.linalg.norm(e.astype(np.float64), axis=1), 1.0, atol=1e-5)
    # Same bytes from a fresh embedder, with another batch size (batching does not change results).
    e2 = HashedTfidfEmbedder(batch_size=37).fit(texts).embed(texts)
    assert np.array_equal(e, e2)
    # The nearest neighbour of a document is from its own domain far more often than chance.
    ids, _ = _exact_knn(e, 1)
    dom = np.array([x["domain"] for x in docs])
    same = (dom[ids[:, 0]] == dom).mean()
    chance = sum((dom == d).mean() ** 2 for d in set(dom))
    assert same > 0.85 and same > chance + 0.4, (same, chance)


def test_tfidf_matches_dense_reference():
    """The count sketch of the normalised sparse tf-idf vectors, recomputed in float64 with plain
    Python n-gram counting, equals the vectorised embedding."""
    texts = ["Hello, world! héllo wörld", "int main(void) { return 0; }", "ab", "x" * 50]
    emb = HashedTfidfEmbedder(dim=64, log2_buckets=12, ngram_range=(2, 4), seed=3)
    got = emb.embed(texts)
    from lory_torch.batching.embed import _splitmix64

    m64 = (1 << 64) - 1

    def grams(t):
        b = " ".join(t.lower().split()).encode()
        out = {}
        for n in range(2, 5):
            for i in range(len(b) - n + 1):
                h = 0
                for c in b[i: i + n]:
                    h = (h * 0x100000001B3 + c + 1) & m64
                key = int(_splitmix64(np.array([h ^ n], dtype=np.uint64))[0]) >> (64 - 12)
                out[key] = out.get(key, 0) + 1
        return out

    g = [grams(t) for t in texts]
    df = {}
    for d in g:
        for key in d:
            df[key] = df.get(key, 0) + 1
    for t, d in enumerate(g):
        w = {key: (1 + np.log(c)) * (np.log((1 + len(texts)) / (1 + df[key])) + 1) for key, c in d.items()}
        nrm = np.sqrt(sum(v * v for v in w.values()))
        ref = np.zeros(64)
        for key, v in w.items():
            for j in range(4):
                ref[emb._proj_dim[key, j]] += v / nrm * emb._proj_sign[key, j]
        ref /= np.linalg.norm(ref)
        np.testing.assert_allclose(got[t], ref, rtol=0, atol=1e-6)


def test_tfidf_short_text_gets_unit_row():
    e = HashedTfidfEmbedder(dim=16).embed(["", "a", "some longer text here"])
    assert np.isfinite(e).all()
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)


def test_embedder_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        HashedTfidfEmbedder(dim=0)
    with pytest.raises(ValueError, match="ngram_range"):
        HashedTfidfEmbedder(ngram_range=(4, 2))
    with pytest.raises(ValueError, match="empty corpus"):
        HashedTfidfEmbedder().fit([])
    with pytest.raises(ValueError, match="embedder"):
        make_embedder("word2vec")
    with pytest.raises(ValueError, match="contriever:PATH"):
        make_embedder("contriever:")


def _tiny_bert(path):
    """A randomly initialised 2-layer BERT and a character-level WordPiece vocabulary saved to
    path: Contriever's architecture without its weights (nothing is downloaded)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,;:()=_#{}")
    vocab += ["def", "return", "the", "license", "int", "void", "include", "##s", "##e", "##t"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=512)
    model = BertModel(cfg).eval()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return model, tok


def test_contriever_pooling_on_a_tiny_local_bert(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = _tiny_bert(tmp_path)
    texts = ["def f(x): return x", "the license", "int main(void);", "a b c " * 400, "z"]
    e = ContrieverEmbedder(str(tmp_path), device="cpu", batch_size=2)
    assert e.dim == 32
    got = e.embed(texts)
    assert got.dtype == np.float32 and got.shape == (5, 32)
    # Reference: one document at a time (no padding), float64, mean over all of its tokens.
    m64 = model.double()
    for i, t in enumerate(texts):
        enc = tok(t, truncation=True, max_length=512, return_tensors="pt")
        assert enc["input_ids"].shape[1] <= 512
        with torch.no_grad():
            h = m64(**enc).last_hidden_state[0].mean(0)
        ref = (h / h.norm()).numpy()
        np.testing.assert_allclose(got[i], ref, rtol=0, atol=2e-5)
    # The long document is truncated to 510 tokens + [CLS] + [SEP].
    assert len(tok(texts[3])["input_ids"]) > 512
    long_cut = tok.decode(tok(texts[3], add_special_tokens=False)["input_ids"][:510])
    np.testing.assert_allclose(e.embed([long_cut])[0], got[3], atol=2e-5)


# --------------------------------------------------------------------------- kNN


def test_knn_torch_matches_exact_reference(tfidf_emb):
    k = 7
    ids, sims = knn_torch(tfidf_emb, k, memory_budget_bytes=64 << 10)  # many small blocks
    ref_ids, ref_sims = _exact_knn(tfidf_emb, k)
    assert ids.dtype == np.int64 and sims.dtype == np.float32 and ids.shape == (len(tfidf_emb), k)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (ids != np.arange(len(ids))[:, None]).all()
    assert (np.diff(sims, axis=1) <= 0).all()
    # ids agree wherever the reference has no near-tie around that rank
    clear = _untied(tfidf_emb, k)
    assert (ids[clear] == ref_ids[clear]).all()
    assert clear.mean() > 0.9


def test_knn_missing_neighbours_are_minus_one():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((4, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    for fn in [knn_torch] + ([knn_faiss] if faiss_available() else []):
        ids, sims = fn(e, 6)
        assert (ids[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()
        assert (ids[:, :3] >= 0).all() and np.isfinite(sims[:, :3]).all()
        assert [sorted(r) for r in ids[:, :3].tolist()] == [[j for j in range(4) if j != i] for i in range(4)]
        ids, sims = fn(e[:1], 2)  # one document: no neighbour at all
        assert (ids == -1).all()


@needs_faiss
def test_faiss_flat_agrees_with_torch(tfidf_emb):
    a_ids, a_sims = knn_torch(tfidf_emb, 10)
    b_ids, b_sims = knn_faiss(tfidf_emb, 10, index="flat")
    np.testing.assert_allclose(a_sims, b_sims, atol=1e-5)
    clear = _untied(tfidf_emb, 10)
    assert clear.mean() > 0.9
    assert (a_ids[clear] == b_ids[clear]).all()


@needs_faiss
def test_faiss_ivfpq_recall_and_exact_rescoring(tfidf_emb):
    k = 10
    p = ivfpq_params(len(tfidf_emb), tfidf_emb.shape[1])
    assert tfidf_emb.shape[1] % p["m"] == 0 and tfidf_emb.shape[1] // p["m"] >= 3
    assert ivfpq_params(50_000_000, 768) == {"nlist": 32768, "m": 256, "nbits": 8, "nprobe": 64}  # ICLM's
    ids, sims = knn_faiss(tfidf_emb, k, index="ivfpq", ivfpq={"nlist": 8, "m": 32, "nbits": 5, "nprobe": 8})
    ref_ids, _ = _exact_knn(tfidf_emb, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids.tolist(), ref_ids.tolist())])
    assert recall > 0.6, recall
    ok = ids >= 0
    exact = np.einsum("nd,nkd->nk", tfidf_emb, tfidf_emb[np.where(ok, ids, 0)])
    np.testing.assert_allclose(sims[ok], exact[ok], atol=1e-5)  # re-scored exactly
    assert (np.diff(np.where(ok, sims, -9), axis=1) <= 0).all()
    assert (ids != np.arange(len(ids))[:, None]).all()
    with pytest.raises(ValueError, match="m = 7 must divide"):
        knn_faiss(tfidf_emb, k, index="ivfpq", ivfpq={"m": 7})


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_knn_bad_inputs(backend):
    e = np.eye(5, dtype=np.float32)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        knn(e, 0, backend=backend)
    bad = e.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN/Inf in 1 row\(s\), first at row 3"):
        knn(bad, 2, backend=backend)
    with pytest.raises(ValueError, match="floating point"):
        knn(e.astype(np.int32), 2, backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        knn(e[0], 2, backend=backend)
    with pytest.raises(ValueError, match="empty"):
        knn(e[:0], 2, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        knn(e, 2, backend="annoy")


# --------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_roundtrip():
    t = ByteTokenizer()
    (a, b) = t.encode_batch(["héllo", ""])
    assert a.tolist() == list("héllo".encode()) and b.size == 0
    assert t.decode(np.append(a, t.separator_id)) == "héllo"
    assert storage_dtype(t.vocab_size) == np.uint16 and storage_dtype(70000) == np.uint32


def test_hf_tokenizer_wrapper(tmp_path):
    pytest.importorskip("transformers")
    _, tok = _tiny_bert(tmp_path)
    h = HFTokenizer(tok)
    assert h.separator_id == tok.sep_token_id and h.pad_id == tok.pad_token_id
    (ids,) = h.encode_batch(["def the"])
    assert ids.tolist() == tok("def the", add_special_tokens=False)["input_ids"]
    h2 = HFTokenizer(tok.backend_tokenizer, separator_id=3)  # a tokenizers.Tokenizer
    assert h2.encode_batch(["def the"])[0].tolist() == ids.tolist() and h2.vocab_size == len(tok)
    with pytest.raises(ValueError, match="separator_id = 999"):
        HFTokenizer(tok, separator_id=999)
