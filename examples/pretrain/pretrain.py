"""Pre-trains small byte-level language models on real text and compares, on the same training
tokens and seed:
  dense         a transformer with a SwiGLU FFN;
  lory-random   the same transformer with Lory's segment-level MoE FFN, documents packed in a
                random order (the usual way);
  lory-sim      the same Lory model, documents packed by similarity (lory_torch.batching:
                embeddings -> kNN graph -> greedy max-similarity walk -> packing), as Lory trains.

Writes to --out: results.md / results.json (held-out perplexity per run and domain, routing
statistics, timings), loss.png, routing_<run>.png, generations.md, <run>/model.pt and data/ (the
packed token shards). Run it through scripts/pretrain.sh, which installs what it needs.

    python examples/pretrain/pretrain.py                      # the CPU comparison (~10 min, 2 cores)
    python examples/pretrain/pretrain.py --smoke              # CI: a tiny configuration (~1 min)
    python examples/pretrain/pretrain.py --preset large --device cuda
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, replace

# Threads that wait passively: on a CPU shared with other work, spinning OpenMP threads wait for a
# descheduled sibling at every parallel region (measured: 10x slower steps at load 4 on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus import build_corpus  # noqa: E402
from model import LM, ModelConfig  # noqa: E402

from lory_torch.batching import PackedSequenceDataset, build_packed_dataset  # noqa: E402
from lory_torch.batching.tokenize import ByteTokenizer  # noqa: E402


@dataclass
class Preset:
    domain_bytes: int          # corpus: UTF-8 bytes per domain (before the held-out split)
    max_doc_chars: int         # code / docs are cut into documents of at most this many characters
    train_tokens: int          # training token budget (0: every training document)
    eval_seqs: int             # held-out sequences per domain
    model: ModelConfig
    batch: int                 # sequences per step
    lr: float
    k: int = 10                # kNN neighbours for similarity batching
    evals: int = 4             # held-out evaluations during training (plus the final one)
    gen_prompt: int = 64
    gen_tokens: int = 160


PRESETS = {
    # ~1 minute on 2 cores: checks the pipeline end to end, measures nothing.
    "smoke": Preset(domain_bytes=40_000, max_doc_chars=384, train_tokens=50_000, eval_seqs=2, batch=8, lr=3e-3,
                    model=ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=172, num_experts=4,
                                      segment_len=32, max_len=128), evals=1, gen_prompt=32, gen_tokens=48),
    # The README's comparison: ~10 minutes on a 2-core CPU.
    # lr 1e-3: at 3e-3 the dense model did worse and every run's result hung on its unstable start.
    "cpu": Preset(domain_bytes=1_100_000, max_doc_chars=768, train_tokens=1_500_000, eval_seqs=16, batch=8,
                  lr=1e-3, model=ModelConfig(d_model=128, n_layers=4, n_heads=4, d_ff=344, num_experts=8,
                                             segment_len=64, max_len=512)),
    # A GPU: the whole corpus, a larger model, L = 1024, T = 128.
    "large": Preset(domain_bytes=3_000_000, max_doc_chars=1024, train_tokens=0, eval_seqs=32, batch=32, lr=1e-3,
                    model=ModelConfig(d_model=512, n_layers=8, n_heads=8, d_ff=1376, num_experts=8,
                                      segment_len=128, max_len=1024)),
}
RUNS = ("dense", "lory-random", "lory-sim")


def log(msg: str) -> None:
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data

def split_corpus(docs: list[dict], p: Preset, seed: int):
    """Held-out documents per domain (about eval_seqs sequences' worth each) and the training
    documents (a seeded sample of the rest up to the token budget). Split by document."""
    L1 = p.model.max_len + 1
    perm = np.random.default_rng(seed).permutation(len(docs))
    need = p.eval_seqs * L1
    held: dict[str, list[dict]] = {}
    size: dict[str, int] = {}
    pool = []
    for i in perm:
        d = docs[i]
        dom = d["domain"]
        if size.get(dom, 0) < need:
            held.setdefault(dom, []).append(d)
            size[dom] = size.get(dom, 0) + len(d["text"].encode("utf-8")) + 1
        else:
            pool.append(d)
    train, tokens = [], 0
    for d in pool:
        if p.train_tokens and tokens >= p.train_tokens:
            break
        train.append(d)
        tokens += len(d["text"].encode("utf-8")) + 1  # + the separator
    return held, train


def sequence_purity(path: str, domains: list[str]) -> float:
    """Mean over training sequences of the share of its document tokens from its most common
    domain (1.0: every sequence holds one domain). Uses the labels for measurement only."""
    with np.load(os.path.join(path, "pieces.npz")) as z:
        r, so = z["ranges"], z["seq_offsets"]
    dom_ids = {d: i for i, d in enumerate(sorted(set(domains)))}
    dom = np.array([dom_ids[d] for d in domains])
    n = r[:, 2] - r[:, 1]
    seq = np.repeat(np.arange(so.size - 1), np.diff(so))
    counts = np.zeros((so.size - 1, len(dom_ids)))
    np.add.at(counts, (seq, dom[r[:, 0]]), n)
    tot = counts.sum(1)
    ok = tot > 0
    return float((counts.max(1)[ok] / tot[ok]).mean())


def build_data(out: str, p: Preset, seed: int, embedder: str, knn: str):
    log("corpus: reading the installed text")
    t0 = time.perf_counter()
    docs = build_corpus(p.domain_bytes, max_chars=p.max_doc_chars, seed=seed)
    held, train = split_corpus(docs, p, seed)
    corpus_stats = {
        "documents": len(docs), "bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
        "per_domain": {dom: {"documents": sum(d["domain"] == dom for d in docs),
                             "bytes": sum(len(d["text"].encode("utf-8")) for d in docs if d["domain"] == dom)}
                       for dom in sorted({d["domain"] for d in docs})},
        "heldout_documents": sum(len(v) for v in held.values()), "train_documents": len(train),
    }
    log(f"corpus: {corpus_stats['documents']} documents, {corpus_stats['bytes'] / 1e6:.2f} MB, "
        f"{len(corpus_stats['per_domain'])} domains; {len(train)} training documents, "
        f"{corpus_stats['heldout_documents']} held out")
    timings = {"corpus": time.perf_counter() - t0}
    data = os.path.join(out, "data")
    L1 = p.model.max_len + 1  # L inputs + the next token of the last one
    texts = [d["text"] for d in train]  # the batching sees the text only, never the domain
    built = {}
    for order in ("random", "similarity"):
        t0 = time.perf_counter()
        log(f"batching: {order} order over the training documents")
        res = build_packed_dataset(texts, os.path.join(data, order), seq_len=L1, k=p.k, embedder=embedder,
                                   knn=knn, order=order, seed=seed, boundary="split", leftover="pad",
                                   overwrite=True, show_progress=False)
        timings[f"batching ({order})"] = time.perf_counter() - t0
        built[order] = res
    ri, si = built["random"].index, built["similarity"].index
    # Same training tokens: the same documents, every token placed once (boundary "split" never
    # drops one, leftover "pad" keeps the last partial sequence), only the order differs.
    if ri["tokens"]["packed"] != si["tokens"]["packed"] or ri["count"] != si["count"] or si["num_dropped"]:
        raise RuntimeError(f"the two packings differ in tokens: random {ri['tokens']} vs similarity {si['tokens']}")
    doms = [d["domain"] for d in train]
    batching = {
        "sequences": ri["count"], "tokens": ri["tokens"]["packed"], "chains": si["num_chains"],
        "purity": {o: sequence_purity(os.path.join(data, o), doms) for o in ("random", "similarity")},
        "stages_similarity": built["similarity"].timings,
    }
    log(f"batching: {ri['count']} sequences of {L1} tokens each way; domain purity of a sequence "
        f"random {batching['purity']['random']:.3f}, similarity {batching['purity']['similarity']:.3f}")
    evals = {}
    for dom, ds in sorted(held.items()):
        path = os.path.join(data, "eval", dom)
        build_packed_dataset([d["text"] for d in ds], path, seq_len=L1, order="random", seed=seed,
                             boundary="split", leftover="pad", overwrite=True, show_progress=False)
        evals[dom] = PackedSequenceDataset(path, return_docs=True)
    prompts = {dom: next((d["text"] for d in ds if len(d["text"].encode("utf-8")) >= p.gen_prompt + 16), ds[0]["text"])
               for dom, ds in sorted(held.items())}
    return corpus_stats, batching, evals, prompts, timings


# --------------------------------------------------------------------------- training / evaluation

def loss_fn(logits, targets, pad_id):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=pad_id)


@torch.no_grad()
def evaluate(model: LM, evals: dict, device, pad_id: int, batch: int, record: bool = False):
    """Per-domain mean NLL (nats per byte) on the held-out sequences. With record: the routing
    weights of every Lory layer per domain, and the document of each full segment."""
    model.eval()
    layers = model.lory_layers()
    for f in layers:
        f.record = record
    out, routing = {}, {}
    T = model.cfg.segment_len
    for dom, ds in evals.items():
        nll, cnt = 0.0, 0
        ws, seg_docs = [[] for _ in layers], []
        for s in range(0, len(ds), batch):
            items = [ds[i] for i in range(s, min(len(ds), s + batch))]
            x = torch.stack([it["tokens"] for it in items]).to(device)
            logits = model(x[:, :-1])
            t = x[:, 1:]
            l = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), t.reshape(-1), ignore_index=pad_id,
                                reduction="sum")
            nll += float(l)
            cnt += int((t != pad_id).sum())
            if record:
                for j, f in enumerate(layers):
                    ws[j].append(f.last_weights.float().cpu())
                L = x.shape[1] - 1
                for it in items:  # document of each segment of the inputs (-1: spans a boundary / pad)
                    doc = np.full(L, -1, np.int64)
                    for d, st, ln in zip(it["doc_ids"].tolist(), it["starts"].tolist(), it["lengths"].tolist()):
                        doc[st:min(L, st + ln)] = d
                    doc[(it["tokens"][:L] == pad_id).numpy()] = -1
                    nseg = math.ceil(L / T)
                    sd = np.array([doc[k * T] if (doc[k * T:(k + 1) * T] == doc[k * T]).all() else -1
                                   for k in range(nseg)])
                    seg_docs.append(sd)
        out[dom] = nll / max(cnt, 1)
        if record:
            routing[dom] = {"weights": [torch.cat(w).numpy() for w in ws], "seg_docs": np.stack(seg_docs)}
    for f in layers:
        f.record = False
    model.train()
    return out, routing


def routing_stats(routing: dict, E: int, seed: int = 0, pairs: int = 4000) -> list[dict]:
    """Per MoE layer: the heatmap (mean routing weight per domain and expert), how peaked routing
    is, and how consistent it is: the total variation distance between the router outputs of two
    segments and how often their top expert agrees, for consecutive segments of one document,
    for random pairs of segments of different documents of one domain, and for random pairs of
    segments of different domains. Only segments lying wholly inside one document count. The
    router output for segment j is the weight segment j + 1 uses (causal routing)."""
    doms = sorted(routing)
    rng = np.random.default_rng(seed)
    res = []
    for j in range(len(routing[doms[0]]["weights"])):
        heat = np.stack([routing[d]["weights"][j].reshape(-1, E).mean(0) for d in doms])
        maxw = np.concatenate([routing[d]["weights"][j].max(-1).reshape(-1) for d in doms])
        seg_p, seg_doc, seg_dom, nxt = [], [], [], []
        base = 0
        for di, d in enumerate(doms):
            p = routing[d]["weights"][j][:, 1:]                  # router outputs of segments 0 .. N-2
            sd = routing[d]["seg_docs"][:, : p.shape[1]]
            ok = sd >= 0
            # consecutive pairs inside one document, as flat indices into the kept segments
            idx = np.full(sd.shape, -1)
            idx[ok] = base + np.arange(int(ok.sum()))
            same = ok[:, :-1] & ok[:, 1:] & (sd[:, :-1] == sd[:, 1:])
            nxt.append(np.stack([idx[:, :-1][same], idx[:, 1:][same]], 1))
            seg_p.append(p[ok]); seg_doc.append(sd[ok]); seg_dom.append(np.full(int(ok.sum()), di))
            base += int(ok.sum())
        P, D, M = np.concatenate(seg_p), np.concatenate(seg_doc), np.concatenate(seg_dom)
        within = np.concatenate(nxt)
        a, b = rng.integers(0, len(P), pairs * 4), rng.integers(0, len(P), pairs * 4)
        same_dom = (M[a] == M[b]) & (D[a] != D[b])
        cross = M[a] != M[b]

        def pair_stats(ia, ib):
            if len(ia) == 0:
                return float("nan"), float("nan"), 0
            tv = 0.5 * np.abs(P[ia] - P[ib]).sum(-1)
            return float(tv.mean()), float((P[ia].argmax(-1) == P[ib].argmax(-1)).mean()), int(len(ia))

        res.append({"heatmap": heat.tolist(), "domains": doms, "mean_max_weight": float(maxw.mean()),
                    "within_doc": pair_stats(within[:, 0], within[:, 1]),
                    "same_domain": pair_stats(a[same_dom][:pairs], b[same_dom][:pairs]),
                    "cross_domain": pair_stats(a[cross][:pairs], b[cross][:pairs])})
    return res


def train_run(name: str, cfg: ModelConfig, ds: PackedSequenceDataset, evals: dict, p: Preset, args, device,
              pad_id: int) -> dict:
    torch.manual_seed(args.seed)
    model = LM(cfg).to(device)
    total, active = model.param_counts()
    n = len(ds)
    steps = n // p.batch
    order = np.random.default_rng(args.seed).permutation(n)  # the same sequence shuffle for every run
    decay = [q for nme, q in model.named_parameters() if q.dim() >= 2 and "emb" not in nme]
    other = [q for nme, q in model.named_parameters() if not (q.dim() >= 2 and "emb" not in nme)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=p.lr, betas=(0.9, 0.95), fused=True)
    warm = max(1, steps // 20)

    def lr_at(s):
        if s < warm:
            return p.lr * (s + 1) / warm
        q = (s - warm) / max(1, steps - warm)
        return p.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * q)))

    log(f"{name}: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token), {steps} steps of "
        f"{p.batch} x {cfg.max_len} tokens")
    eval_at = sorted({max(1, round(steps * (i + 1) / (p.evals + 1))) for i in range(p.evals)})
    hist = {"step": [], "tokens": [], "loss": [], "eval": []}
    t0 = time.perf_counter()
    train_time = 0.0
    tok_per_step = p.batch * cfg.max_len
    for s in range(steps):
        ts = time.perf_counter()
        idx = order[s * p.batch:(s + 1) * p.batch]
        x = torch.stack([ds[int(i)] for i in idx]).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[:, :-1])
        loss = loss_fn(logits, x[:, 1:], pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = float(loss.detach())
        train_time += time.perf_counter() - ts
        hist["step"].append(s + 1)
        hist["tokens"].append((s + 1) * tok_per_step)
        hist["loss"].append(lv)
        if (s + 1) in eval_at:
            ev, _ = evaluate(model, evals, device, pad_id, p.batch)
            hist["eval"].append({"step": s + 1, "tokens": (s + 1) * tok_per_step, "nll": float(np.mean(list(ev.values())))})
        if (s + 1) % max(1, steps // 10) == 0 or s + 1 == steps:
            rate = (s + 1) * tok_per_step / train_time
            log(f"{name}: step {s + 1}/{steps} loss {lv:.3f} ({rate:,.0f} tokens/s, "
                f"{(steps - s - 1) * tok_per_step / rate:.0f} s left)")
    ev, routing = evaluate(model, evals, device, pad_id, p.batch, record=bool(model.lory_layers()))
    hist["eval"].append({"step": steps, "tokens": steps * tok_per_step, "nll": float(np.mean(list(ev.values())))})
    run_dir = os.path.join(args.out, name)
    os.makedirs(run_dir, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "model": model.state_dict(), "steps": steps, "seed": args.seed},
               os.path.join(run_dir, "model.pt"))
    res = {"name": name, "params": total, "active_params": active, "steps": steps,
           "tokens": steps * tok_per_step, "train_seconds": train_time, "wall_seconds": time.perf_counter() - t0,
           "tokens_per_second": steps * tok_per_step / train_time, "eval_nll": ev, "history": hist}
    if routing:
        res["routing"] = routing_stats(routing, cfg.num_experts, args.seed)
    res["_model"] = model
    return res


# --------------------------------------------------------------------------- outputs

def plot_loss(runs: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        h = r["history"]
        tok = np.array(h["tokens"]) / 1e6
        loss = np.array(h["loss"])
        w = max(1, len(loss) // 25)
        sm = np.convolve(loss, np.ones(w) / w, mode="valid")
        line, = axes[0].plot(tok[w - 1:], sm, label=r["name"])
        axes[1].plot([e["tokens"] / 1e6 for e in h["eval"]], [e["nll"] for e in h["eval"]], "o-",
                     color=line.get_color(), label=r["name"])
    axes[0].set_title(f"training loss (moving mean of {w} steps)")
    axes[1].set_title("held-out loss (mean over domains)")
    for ax in axes:
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("nats per byte")
        ax.grid(alpha=0.3)
        ax.legend()
    lo = min(min(e["nll"] for e in r["history"]["eval"]) for r in runs)
    hi = max(max(e["nll"] for e in r["history"]["eval"]) for r in runs)
    axes[1].set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_routing(run: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = run["routing"]
    n = len(layers)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1.2, 3.6), squeeze=False)
    vmax = max(float(np.max(l["heatmap"])) for l in layers)
    for j, (ax, l) in enumerate(zip(axes[0], layers)):
        h = np.array(l["heatmap"])
        im = ax.imshow(h, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(h.shape[1]))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(l["domains"])))
        ax.set_yticklabels(l["domains"] if j == 0 else [])
        ax.set_title(f"MoE layer {j + 1}")
    fig.colorbar(im, ax=axes[0].tolist(), label="mean routing weight")
    fig.suptitle(f"{run['name']}: mean routing weight per held-out domain and expert")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def generations(runs: list[dict], prompts: dict, p: Preset, device, seed: int) -> str:
    tok = ByteTokenizer()
    doms = sorted(prompts)
    enc = [np.frombuffer(prompts[d].encode("utf-8"), np.uint8)[: p.gen_prompt] for d in doms]
    P = min(len(e) for e in enc)
    x = torch.tensor(np.stack([e[:P] for e in enc]).astype(np.int64), device=device)
    lines = [f"Prompt: the first {P} bytes of a held-out document of each domain. Sampling: temperature 0.7, "
             f"top-k 20, {p.gen_tokens} bytes, seed {seed}. Lory models route once per sequence and layer "
             "on the prompt and decode with the merged experts (prompt-level routing).", ""]
    outs = {}
    for r in runs:
        g = torch.Generator(device=device).manual_seed(seed)
        outs[r["name"]] = r["_model"].generate(x, p.gen_tokens, generator=g).cpu().numpy()
    for i, d in enumerate(doms):
        lines.append(f"## {d}")
        lines.append("")
        lines.append("prompt:")
        lines.append("```")
        lines.append(tok.decode(x[i].cpu().numpy()))
        lines.append("```")
        for r in runs:
            ids = outs[r["name"]][i]
            if (ids == tok.separator_id).any():
                ids = ids[: int(np.argmax(ids == tok.separator_id))]
            lines.append(f"{r['name']}:")
            lines.append("```")
            lines.append(tok.decode(ids).replace("```", "'''"))
            lines.append("```")
        lines.append("")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def write_results(out, args, p: Preset, corpus_stats, batching, runs, timings, load, device) -> None:
    doms = sorted(runs[0]["eval_nll"])
    names = [r["name"] for r in runs]
    ppl = {r["name"]: {d: math.exp(r["eval_nll"][d]) for d in doms} for r in runs}
    mean_nll = {r["name"]: float(np.mean([r["eval_nll"][d] for d in doms])) for r in runs}
    L = [f"# Lory pre-training comparison ({args.preset})", "",
         f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}; device: {device}; "
         f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average at start / end: "
         f"{load[0]:.1f} / {load[1]:.1f}",
         f"- command: `{' '.join(['python', 'examples/pretrain/pretrain.py'] + sys.argv[1:])}`",
         f"- corpus: {corpus_stats['documents']} documents, {corpus_stats['bytes'] / 1e6:.2f} MB, "
         f"{len(corpus_stats['per_domain'])} domains; {corpus_stats['train_documents']} training documents, "
         f"{corpus_stats['heldout_documents']} held out",
         f"- training tokens: {batching['tokens']:,} in {batching['sequences']} sequences of "
         f"{p.model.max_len + 1} bytes, the same documents for every run (random and similarity packing "
         f"place every token once); similarity chains: {batching['chains']}",
         f"- domain purity of a training sequence (share of its tokens from its main domain): random "
         f"{batching['purity']['random']:.3f}, similarity {batching['purity']['similarity']:.3f}",
         f"- model: d={p.model.d_model}, {p.model.n_layers} layers, {p.model.n_heads} heads, SwiGLU f={p.model.d_ff}, "
         f"byte vocabulary; Lory: E={p.model.num_experts} experts in every "
         f"{'' if p.model.moe_every == 1 else str(p.model.moe_every) + 'nd '}layer, L={p.model.max_len}, "
         f"T={p.model.segment_len}; batch {p.batch} sequences, AdamW lr {p.lr}, seed {args.seed}", "",
         "## Held-out perplexity (per byte; lower is better)", "",
         "| domain | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for d in doms:
        L.append(f"| {d} | " + " | ".join(f"{ppl[n][d]:.3f}" for n in names) + " |")
    L.append("| **mean NLL (nats/byte)** | " + " | ".join(f"**{mean_nll[n]:.4f}**" for n in names) + " |")
    if "dense" in names:
        L.append("| vs dense (perplexity of the mean NLL) | " + " | ".join(
            f"{100 * (math.exp(mean_nll[n] - mean_nll['dense']) - 1):+.2f}%" for n in names) + " |")
    L += ["", "## Runs", "", "| run | parameters | active | steps | tokens | train s | tokens/s |",
          "|---|---|---|---|---|---|---|"]
    for r in runs:
        L.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | {r['steps']} | "
                 f"{r['tokens']:,} | {r['train_seconds']:.0f} | {r['tokens_per_second']:,.0f} |")
    lory = [r for r in runs if "routing" in r]
    if lory:
        L += ["", "## Routing", "",
              "Per MoE layer, on the held-out sequences: the mean largest routing weight (1/E when uniform), "
              "and for pairs of segments the total variation distance (TV, 0 to 1) between their router "
              "outputs and how often their top expert agrees: consecutive segments of one document, random "
              "segments of different documents of one domain, random segments of different domains "
              "(segments lying wholly inside one document).", "",
              "| run | layer | mean max weight | TV within a document | TV same domain | TV across domains | "
              "top-1 agreement within / same domain / across |", "|---|---|---|---|---|---|---|"]
        for r in lory:
            for j, s in enumerate(r["routing"]):
                w, sd, cd = s["within_doc"], s["same_domain"], s["cross_domain"]
                L.append(f"| {r['name']} | {j + 1} | {s['mean_max_weight']:.3f} | {w[0]:.3f} | {sd[0]:.3f} | "
                         f"{cd[0]:.3f} | {w[1]:.2f} / {sd[1]:.2f} / {cd[1]:.2f} |")
        L.append(f"\n({lory[0]['routing'][0]['within_doc'][2]} consecutive pairs within documents, "
                 f"{lory[0]['routing'][0]['same_domain'][2]} and {lory[0]['routing'][0]['cross_domain'][2]} "
                 "random pairs.)")
        L += [""] + [f"![routing {r['name']}](routing_{r['name']}.png)" for r in lory]
    L += ["", "![loss curves](loss.png)", "", "## Time (seconds)", ""]
    L += [f"- {k}: {v:.1f}" for k, v in timings.items()]
    L += ["", "Generations: [generations.md](generations.md); checkpoints: `<run>/model.pt`."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    slim = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"preset": args.preset, "machine": machine(), "device": str(device), "load": load,
                   "corpus": corpus_stats, "batching": batching, "runs": slim, "timings": timings,
                   "perplexity": ppl, "mean_nll": mean_nll}, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pretrain", help="output folder")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--smoke", action="store_true", help="the tiny CI configuration (same as --preset smoke)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    ap.add_argument("--experts", type=int, default=0, help="experts per Lory layer (0: the preset's)")
    ap.add_argument("--moe-every", type=int, default=0, help="MoE FFN in every n-th layer (0: the preset's)")
    ap.add_argument("--train-tokens", type=int, default=-1, help="training token budget (-1: the preset's, 0: all)")
    ap.add_argument("--segment-len", type=int, default=0, help="Lory's T (0: the preset's)")
    ap.add_argument("--lr", type=float, default=0.0, help="peak learning rate (0: the preset's)")
    ap.add_argument("--embedder", default="tfidf", help="similarity batching's embedder: tfidf | contriever:PATH")
    ap.add_argument("--knn", default="auto", choices=["auto", "faiss", "torch"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset = "smoke"
    p = PRESETS[args.preset]
    m = p.model
    if args.experts:
        m = replace(m, num_experts=args.experts)
    if args.moe_every:
        m = replace(m, moe_every=args.moe_every)
    if args.segment_len:
        m = replace(m, segment_len=args.segment_len)
    p = replace(p, model=m, lr=args.lr or p.lr, train_tokens=p.train_tokens if args.train_tokens < 0 else args.train_tokens)
    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in names if r not in RUNS]
    if bad or not names:
        ap.error(f"--runs: unknown run(s) {bad}; choose from {', '.join(RUNS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    load0 = os.getloadavg()[0]
    start = time.perf_counter()

    corpus_stats, batching, evals, prompts, timings = build_data(args.out, p, args.seed, args.embedder, args.knn)
    pad_id = ByteTokenizer.pad_id
    datasets = {"random": PackedSequenceDataset(os.path.join(args.out, "data", "random")),
                "similarity": PackedSequenceDataset(os.path.join(args.out, "data", "similarity"))}
    runs = []
    for name in names:
        cfg = replace(p.model, num_experts=0) if name == "dense" else p.model
        ds = datasets["similarity" if name == "lory-sim" else "random"]
        r = train_run(name, cfg, ds, evals, p, args, device, pad_id)
        timings[f"train + eval {name}"] = r["wall_seconds"]
        runs.append(r)
        log(f"{name}: held-out NLL {np.mean(list(r['eval_nll'].values())):.4f} nats/byte")
    t0 = time.perf_counter()
    plot_loss(runs, os.path.join(args.out, "loss.png"))
    for r in runs:
        if "routing" in r:
            plot_routing(r, os.path.join(args.out, f"routing_{r['name']}.png"))
    timings["plots"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with open(os.path.join(args.out, "generations.md"), "w") as f:
        f.write(generations(runs, prompts, p, device, args.seed) + "\n")
    timings["generation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    write_results(args.out, args, p, corpus_stats, batching, runs, timings, (load0, os.getloadavg()[0]), device)
    log(f"done in {timings['total']:.0f} s: {os.path.join(args.out, 'results.md')}")
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
