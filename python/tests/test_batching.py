"""Tests of the similarity-batching pipeline (lory_torch.batching): embedders, kNN engines,
tokenizers, the traversal / packing ops, the packed-shard format and the CLI, on a small real
corpus made of text installed on this machine (Python sources, C headers, licences, Perl modules)."""
import os

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
                ref[emb._proj_dim[j, key]] += v / nrm * emb._proj_sign[j, key]
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


@pytest.fixture
def faiss_one_thread():
    """FAISS's k-means spin-waits across OpenMP threads: on a busy CI machine one thread is many
    times faster for these tiny trainings."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@needs_faiss
def test_faiss_ivfpq_recall_and_exact_rescoring(tfidf_emb, faiss_one_thread):
    k = 10
    p = ivfpq_params(len(tfidf_emb), tfidf_emb.shape[1])
    assert tfidf_emb.shape[1] % p["m"] == 0 and tfidf_emb.shape[1] // p["m"] >= 3
    # ICLM's settings at its shard size
    assert ivfpq_params(50_000_000, 768) == {"nlist": 32768, "m": 256, "nbits": 8, "nprobe": 64, "refine": 4}
    small = {"nlist": 8, "m": 32, "nbits": 5, "nprobe": 8}
    ref_ids, _ = _exact_knn(tfidf_emb, k)

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / k for a, b in zip(ids.tolist(), ref_ids.tolist())])

    plain, _ = knn_faiss(tfidf_emb, k, index="ivfpq", ivfpq={**small, "refine": 1})
    ids, sims = knn_faiss(tfidf_emb, k, index="ivfpq", ivfpq=small)  # refine 4
    assert recall(ids) > 0.8 and recall(ids) > recall(plain) + 0.1, (recall(ids), recall(plain))
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


# --------------------------------------------------------------------------- the ops (binding)

from lory_torch.batching import PackedSequenceDataset, build_packed_dataset, ops, reference  # noqa: E402
from lory_torch.batching.__main__ import main as cli_main  # noqa: E402


@pytest.fixture(scope="session")
def graph(tfidf_emb):
    return knn_torch(tfidf_emb, 10)


@pytest.mark.parametrize("max_chain_len", [0, 5])
def test_similarity_order_matches_python_walk(ext, graph, max_chain_len):
    ids, sims = graph
    order, dropped, chains = ops.similarity_order(ids, sims, max_chain_len=max_chain_len)
    ref, ref_chains = reference.similarity_order(ids, sims, max_chain_len)
    assert np.array_equal(order, ref) and np.array_equal(chains, ref_chains)
    assert dropped.size == 0 and np.array_equal(np.sort(order), np.arange(len(ids)))


def test_similarity_order_reads_strided_int32_and_memmapped_graphs(ext, graph, tmp_path):
    ids, sims = graph
    want = ops.similarity_order(ids, sims)[0]
    # a FAISS-style search that returns each doc as its own first neighbour: a view one column in
    with_self_ids = np.concatenate([np.arange(len(ids))[:, None], ids], 1)
    with_self_sims = np.concatenate([np.ones((len(ids), 1), np.float32), sims], 1)
    t_ids, t_sims = torch.from_numpy(with_self_ids)[:, 1:], torch.from_numpy(with_self_sims)[:, 1:]
    assert not t_ids.is_contiguous()
    assert np.array_equal(ops.similarity_order(t_ids, t_sims)[0], want)
    assert np.array_equal(ops.similarity_order(ids.astype(np.int32), sims)[0], want)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "sims.npy", sims)
    m_ids, m_sims = np.load(tmp_path / "ids.npy", mmap_mode="r"), np.load(tmp_path / "sims.npy", mmap_mode="r")
    assert isinstance(m_ids, np.memmap)
    assert np.array_equal(ops.similarity_order(m_ids, m_sims)[0], want)


def test_similarity_order_dedup_drops_near_duplicates(ext, texts):
    docs = texts[:60] + texts[:10]  # ten exact duplicates
    e = HashedTfidfEmbedder().embed(docs)
    ids, sims = knn_torch(e, 5)
    order, dropped, _ = ops.similarity_order(ids, sims, dedup_threshold=0.999)
    assert dropped.size == 10 and order.size == 60
    kept = sorted(order.tolist())
    for i in range(10):  # exactly one copy of each duplicated text survives
        assert (i in kept) != (60 + i in kept)


def test_ops_bad_arguments_name_the_argument(ext, graph):
    ids, sims = graph
    bad = ids.copy()
    bad[4, 0] = 4
    with pytest.raises(ValueError, match="graph.ids: self loop"):
        ops.similarity_order(bad, sims)
    with pytest.raises(ValueError, match="sims must be float32"):
        ops.similarity_order(ids, sims.astype(np.float64))
    with pytest.raises(ValueError, match="ids must be int64 or int32"):
        ops.similarity_order(ids.astype(np.float32), sims)
    s = sims.copy()
    s[7, 2] = np.nan
    with pytest.raises(ValueError, match="graph.sims: NaN"):
        ops.similarity_order(ids, s)
    with pytest.raises(ValueError, match="sims has shape"):
        ops.similarity_order(ids, sims[:, :3])
    with pytest.raises(ValueError, match="neighbours_used"):
        ops.similarity_order(ids, sims, neighbours_used=11)
    with pytest.raises(ValueError, match="start must be"):
        ops.similarity_order(ids, sims, start="random")
    with pytest.raises(ValueError, match="options.seq_len"):
        ops.pack_documents(np.arange(3), np.ones(3, np.int64), 0)
    with pytest.raises(ValueError, match="a doc appears twice"):
        ops.pack_documents(np.array([0, 0]), np.ones(3, np.int64), 4)
    with pytest.raises(ValueError, match="doc_token_counts must be int64"):
        ops.pack_documents(np.arange(3), np.ones(3, np.int32), 4)
    p = ops.pack_documents(np.arange(3), np.full(3, 5, np.int64), 4, separator=9)
    toks = np.arange(15, dtype=np.uint16)
    offs = np.arange(0, 16, 5, dtype=np.int64)
    with pytest.raises(ValueError, match="out has dtype"):
        ops.write_token_sequences(p.ranges, p.seq_offsets, toks, offs, 4, 9, "split", "pad", 0,
                                  np.zeros(p.output_tokens, np.uint32))
    with pytest.raises(ValueError, match="out_capacity"):
        ops.write_token_sequences(p.ranges, p.seq_offsets, toks, offs, 4, 9, "split", "pad", 0,
                                  np.zeros(p.output_tokens - 1, np.uint16))
    with pytest.raises(ValueError, match="doc_offsets ends at 15 but tokens holds 14"):
        ops.write_token_sequences(p.ranges, p.seq_offsets, toks[:14], offs, 4, 9, "split", "pad", 0,
                                  np.zeros(p.output_tokens, np.uint16))
    out = np.full(p.output_tokens, 7, np.uint16)
    with pytest.raises(ValueError, match="separator"):
        ops.write_token_sequences(p.ranges, p.seq_offsets, toks, offs, 4, 70000, "split", "pad", 0, out)
    assert (out == 7).all()  # nothing written on failure


# --------------------------------------------------------------------------- the pipeline


def _check_packed(path, texts, seq_len, leftover="pad", tokenizer=None):
    """Every kept token exactly once, in its document's order, one separator after each document,
    rows of seq_len tokens, the Dataset's items equal to the token files."""
    ds = PackedSequenceDataset(str(path), return_docs=True)
    idx = ds.index
    sep, pad = idx["separator_id"], idx["pad_id"]
    p = ds.pieces()
    toks = (tokenizer or ByteTokenizer()).encode_batch(texts)
    rows = [np.asarray(ds.tokens(i)) for i in range(len(ds))]
    assert all(r.size == seq_len for r in rows[:-1]) and (leftover == "keep" or rows[-1].size == seq_len)
    seen = {}
    for s, row in enumerate(rows):
        item = ds[s]
        assert item["tokens"].dtype == torch.int64 and np.array_equal(item["tokens"].numpy(), row)
        pos = 0
        for d, st, ln, has_sep in zip(item["doc_ids"].tolist(), item["starts"].tolist(), item["lengths"].tolist(),
                                      item["separators"].tolist()):
            assert st == pos
            nt = ln - has_sep
            begin = seen.get(d, 0)
            assert np.array_equal(row[pos: pos + nt], toks[d][begin: begin + nt])  # the doc's next tokens
            seen[d] = begin + nt
            if has_sep:
                assert row[pos + nt] == sep and seen[d] == len(toks[d])  # separator right after the doc's end
                seen[d] = -1 - seen[d]  # closed
            pos += ln
        assert (row[pos:] == pad).all()
        assert pad == sep or not (row[:pos] == pad).any()
    # Every placed document complete (its tokens, then one separator), except with leftover "drop":
    # there the documents cut short are the last ones of the order and their missing tokens are
    # exactly the dropped leftover.
    placed = p["order"].tolist()
    assert set(seen) <= set(placed)
    incomplete, missing = [], 0
    for i, d in enumerate(placed):
        if seen.get(d) == -1 - len(toks[d]):
            continue
        incomplete.append(i)
        missing += len(toks[d]) + 1 - seen.get(d, 0)
    if leftover == "drop":
        assert incomplete == list(range(len(placed) - len(incomplete), len(placed)))
        assert missing == idx["tokens"]["dropped_leftover"]
    else:
        assert not incomplete and idx["tokens"]["dropped_leftover"] == 0
    assert sum(len(toks[d]) for d in placed) + len(placed) == idx["tokens"]["packed"] + idx["tokens"]["dropped_leftover"]
    return ds


@pytest.mark.parametrize("knn_backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_end_to_end_invariants(ext, texts, tmp_path, knn_backend):
    L = 512
    r = build_packed_dataset(texts, str(tmp_path / "p"), seq_len=L, k=8, knn=knn_backend, show_progress=False)
    assert r.index["knn"]["backend"] == knn_backend and r.index["count"] == len(PackedSequenceDataset(str(tmp_path / "p")))
    assert set(r.timings) == {"read", "embed", "knn", "order", "tokenize", "pack", "write"}
    _check_packed(tmp_path / "p", texts, L)
    assert r.index["num_placed"] == len(texts) and r.index["dtype"] == "uint16"


@pytest.mark.parametrize("boundary,leftover", [("move", "keep"), ("split", "drop"), ("move", "pad")])
def test_end_to_end_packing_options_and_shards(ext, texts, tmp_path, boundary, leftover):
    sub = texts[:120]
    r = build_packed_dataset(sub, str(tmp_path / "p"), seq_len=2000, k=5, knn="torch", boundary=boundary,
                             leftover=leftover, shard_seqs=17, max_chain_len=6, merge_short_chains=True,
                             show_progress=False)
    assert len(r.index["shards"]) == -(-r.index["count"] // 17) > 1
    _check_packed(tmp_path / "p", sub, 2000, leftover)


def test_dataset_in_a_dataloader(ext, texts, tmp_path):
    import pickle

    build_packed_dataset(texts[:50], str(tmp_path / "p"), seq_len=256, k=4, order="random", show_progress=False)
    ds = PackedSequenceDataset(str(tmp_path / "p"))
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))  # memmaps are reopened, not pickled
    batch = next(iter(torch.utils.data.DataLoader(clone, batch_size=4)))
    assert batch.shape == (4, 256) and batch.dtype == torch.int64
    assert torch.equal(batch[1], ds[1]) and torch.equal(ds[-1], ds[len(ds) - 1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def _same_domain_adjacent(index_path, domains):
    """Fraction of consecutive documents (in packing order) that share a domain."""
    with np.load(os.path.join(index_path, "pieces.npz")) as z:
        order = z["order"]
    d = np.asarray(domains)[order]
    return float((d[1:] == d[:-1]).mean())


def test_similarity_batching_groups_domains_more_than_random(ext, docs, texts, tmp_path):
    domains = [x["domain"] for x in docs]
    build_packed_dataset(texts, str(tmp_path / "sim"), seq_len=1024, k=10, knn="torch", show_progress=False)
    build_packed_dataset(texts, str(tmp_path / "rnd"), seq_len=1024, order="random", seed=3, show_progress=False)
    sim = _same_domain_adjacent(str(tmp_path / "sim"), domains)
    rnd = _same_domain_adjacent(str(tmp_path / "rnd"), domains)
    chance = sum((np.asarray(domains) == d).mean() ** 2 for d in set(domains))
    assert abs(rnd - chance) < 0.12, (rnd, chance)
    assert sim > 0.75 and sim > rnd + 0.4, (sim, rnd)  # here: ~0.87 vs ~0.25
    # ... and inside training sequences: the documents sharing a sequence share a domain far more often.
    def within(path):
        ds = PackedSequenceDataset(str(path), return_docs=True)
        pairs = same = 0
        for i in range(len(ds)):
            ids = ds[i]["doc_ids"].tolist()
            for a, b in zip(ids[:-1], ids[1:]):
                pairs += 1
                same += domains[a] == domains[b]
        return same / max(pairs, 1)
    assert within(tmp_path / "sim") > within(tmp_path / "rnd") + 0.4


def _files(path):
    return {f: (path / f).read_bytes() for f in sorted(os.listdir(path))}


def test_builds_are_deterministic(ext, texts, tmp_path, monkeypatch):
    import time

    for name in ("a", "b"):
        build_packed_dataset(texts[:200], str(tmp_path / name), seq_len=300, k=6, show_progress=False,
                             dedup_threshold=0.98)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600)  # the second build an hour later
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert list(a) == ["index.json", "pieces.npz", "tokens-00000.bin"] and a == b
    build_packed_dataset(texts[:200], str(tmp_path / "r1"), seq_len=300, order="random", seed=5, show_progress=False)
    build_packed_dataset(texts[:200], str(tmp_path / "r2"), seq_len=300, order="random", seed=5, show_progress=False)
    build_packed_dataset(texts[:200], str(tmp_path / "r3"), seq_len=300, order="random", seed=6, show_progress=False)
    assert _files(tmp_path / "r1") == _files(tmp_path / "r2") != _files(tmp_path / "r3")


def test_pipeline_bad_inputs(ext, texts, tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        build_packed_dataset(texts[:5], out, seq_len=0)
    with pytest.raises(ValueError, match="seq_len"):
        build_packed_dataset(texts[:5], out, seq_len=-4)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        build_packed_dataset(texts[:5], out, k=0)
    with pytest.raises(ValueError, match="corpus is empty"):
        build_packed_dataset([], out)
    p = tmp_path / "c.jsonl"
    p.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="has no field 'text'"):
        build_packed_dataset(str(p), out)
    p.write_text("")
    with pytest.raises(ValueError, match="holds no document"):
        build_packed_dataset(str(p), out)
    nan = np.ones((5, 4), np.float32)
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf in 1 row"):
        build_packed_dataset(texts[:5], out, embeddings=nan)
    with pytest.raises(ValueError, match="floating point"):
        build_packed_dataset(texts[:5], out, embeddings=np.ones((5, 4), np.int64))
    with pytest.raises(ValueError, match="5 documents"):
        build_packed_dataset(texts[:5], out, embeddings=np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="strings only"):
        build_packed_dataset([b"bytes"], out)
    with pytest.raises(ValueError, match="order must be"):
        build_packed_dataset(texts[:5], out, order="sorted")
    with pytest.raises(ValueError, match="merge_short_chains needs max_chain_len"):
        build_packed_dataset(texts[:5], out, merge_short_chains=True)
    with pytest.raises(ValueError, match="dedup_threshold"):
        build_packed_dataset(texts[:5], out, dedup_threshold=float("nan"))
    assert not os.path.exists(out)  # nothing was written by any of these
    build_packed_dataset(texts[:5], out, seq_len=64, k=2, show_progress=False)
    with pytest.raises(ValueError, match="already holds a packed dataset"):
        build_packed_dataset(texts[:5], out, seq_len=64, k=2, show_progress=False)
    with pytest.raises(ValueError, match="no index.json"):
        PackedSequenceDataset(str(tmp_path))


def test_single_document_and_empty_documents(ext, tmp_path):
    r = build_packed_dataset(["only one document"], str(tmp_path / "one"), seq_len=8, k=3, show_progress=False)
    assert r.index["count"] == 3  # 17 bytes + separator = 18 tokens -> 3 rows of 8 (last padded)
    _check_packed(tmp_path / "one", ["only one document"], 8)
    t = ["", "abc", "", "defgh"]
    build_packed_dataset(t, str(tmp_path / "e"), seq_len=4, k=2, knn="torch", show_progress=False)
    _check_packed(tmp_path / "e", t, 4)


def test_cli(ext, docs, tmp_path, capsys):
    p = tmp_path / "c.jsonl"
    corpus_mod.write_jsonl([{"content": x["text"]} for x in docs[:80]], str(p))
    rc = cli_main(["--input", str(p), "--text-field", "content", "--out", str(tmp_path / "o"), "--seq-len", "600",
                   "--k", "5", "--knn", "torch", "--max-chain-len", "8", "--dedup-threshold", "0.99", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "80 documents" in out and "total" in out and "embed" in out
    ds = PackedSequenceDataset(str(tmp_path / "o"))
    assert ds.index["options"]["max_chain_len"] == 8 and ds.index["options"]["dedup_threshold"] == 0.99
    folder = tmp_path / "f"
    folder.mkdir()
    for i, x in enumerate(docs[:10]):
        (folder / f"{i:02d}.txt").write_text(x["text"])
    rc = cli_main(["--input", str(folder), "--out", str(tmp_path / "o2"), "--seq-len", "128", "--order", "random",
                   "--no-progress"])
    assert rc == 0
    _check_packed(tmp_path / "o2", [docs[i]["text"] for i in range(10)], 128)
    rc = cli_main(["--input", str(p), "--out", str(tmp_path / "o3"), "--no-progress"])  # no "text" field
    assert rc == 2 and "has no field 'text'" in capsys.readouterr().err
    rc = cli_main(["--input", str(p), "--text-field", "content", "--out", str(tmp_path / "o3"), "--k", "0",
                   "--no-progress"])
    assert rc == 2 and "k must be a positive integer" in capsys.readouterr().err
    rc = cli_main(["--input", str(p), "--text-field", "content", "--out", str(tmp_path / "o3"), "--knn", "torch",
                   "--faiss-index", "flat", "--no-progress"])
    assert rc == 2 and "--faiss-index needs the FAISS engine" in capsys.readouterr().err


class _WideTokenizer(ByteTokenizer):
    """Bytes shifted past 65536: a vocabulary that needs uint32 storage."""
    vocab_size = 70_000
    separator_id = 69_998
    pad_id = 69_999

    def encode_batch(self, texts):
        return [a + 69_000 for a in super().encode_batch(texts)]


def test_wide_vocabulary_is_stored_as_uint32(ext, texts, tmp_path):
    t = _WideTokenizer()
    r = build_packed_dataset(texts[:30], str(tmp_path / "w"), seq_len=333, tokenizer=t, order="random",
                             show_progress=False)
    assert r.index["dtype"] == "uint32" and r.index["separator_id"] == 69_998
    ds = _check_packed(tmp_path / "w", texts[:30], 333, tokenizer=t)
    assert int(ds[0]["tokens"].min()) >= 69_000

    class Bad(_WideTokenizer):
        def encode_batch(self, texts):
            out = super().encode_batch(texts)
            out[3][5] = 70_000
            return out

    with pytest.raises(ValueError, match=r"tokenizer: document 3 has token ids outside \[0, 70000\)"):
        build_packed_dataset(texts[:30], str(tmp_path / "b"), tokenizer=Bad(), order="random", show_progress=False)


def test_contriever_and_hf_tokenizer_through_the_pipeline(ext, docs, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    _, tok = _tiny_bert(model_dir)
    sub = [x["text"] for x in docs[:40]]
    r = build_packed_dataset(sub, str(tmp_path / "o"), seq_len=256, k=5, knn="torch",
                             embedder=f"contriever:{model_dir}", tokenizer=f"hf:{model_dir}", show_progress=False)
    assert r.index["embedder"]["name"] == "contriever" and r.index["embedder"]["dim"] == 32
    assert r.index["separator_id"] == tok.sep_token_id and r.index["vocab_size"] == len(tok)
    _check_packed(tmp_path / "o", sub, 256, tokenizer=HFTokenizer(tok))
