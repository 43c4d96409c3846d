"""The pre-training corpus: real text that Debian packages install, in seven domains.

  fortunes-en / -de / -es / -it   fortune cookies (packages fortunes, fortunes-de, fortunes-es,
                                  fortunes-it), one document per fortune
  python                          the Python standard library's sources (python3.11)
  c-headers                       C headers under /usr/include (libc6-dev, linux-libc-dev)
  python-docs                     Python's documentation sources (python3.11-doc, reST)

Code and documentation files are cut into documents at blank lines (whole paragraphs, functions
or declarations merged up to `max_chars`), so a training sequence of a few hundred bytes holds
several documents and the order of the documents (similarity or random batching) decides what a
sequence mixes. The domain of each document is a label for evaluation only: the batching and the
model see the text alone.
"""
from __future__ import annotations

import glob
import os
import random
import sysconfig
from typing import Iterator

FORTUNES = "/usr/share/games/fortunes"


def _files(folder: str, keep, recursive: bool = True) -> list[str]:
    out = []
    if not os.path.isdir(folder):
        return out
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if recursive and not d.startswith(".")
                         and d not in ("site-packages", "dist-packages"))
        for n in sorted(names):
            p = os.path.join(root, n)
            # Symbolic links only repeat other files (fortunes' *.u8, the Italian links at the top).
            if os.path.isfile(p) and not os.path.islink(p) and keep(n):
                out.append(p)
    return out


def _fortune_file(n: str) -> bool:
    return not n.endswith((".dat", ".u8")) and "." not in n.replace(".fortunes", "")


def domain_files() -> dict[str, list[str]]:
    """domain -> the installed files it reads (an empty list when its package is missing)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    # python3-doc installs the default Python's documentation, e.g. /usr/share/doc/python3.11/html.
    py_docs = sorted(glob.glob("/usr/share/doc/python3*/html/_sources"))
    return {
        "fortunes-en": _files(FORTUNES, _fortune_file, recursive=False),
        "fortunes-de": _files(os.path.join(FORTUNES, "de"), _fortune_file),
        "fortunes-es": _files(os.path.join(FORTUNES, "es"), _fortune_file),
        "fortunes-it": _files(os.path.join(FORTUNES, "it"), _fortune_file),
        "python": _files(stdlib, lambda n: n.endswith(".py")),
        "c-headers": _files("/usr/include", lambda n: n.endswith(".h")),
        "python-docs": _files(py_docs[0], lambda n: n.endswith(".rst.txt")) if py_docs else [],
    }


def _read(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw[:8192]:
        return ""
    return raw.decode("utf-8", errors="replace")


def _cut_lines(text: str, max_chars: int) -> Iterator[str]:
    """Pieces of at most ~max_chars characters, cut at line ends (a longer single line is cut)."""
    buf = ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if buf:
                yield buf
                buf = ""
            yield line[:max_chars]
            line = line[max_chars:]
        if len(buf) + len(line) > max_chars and buf:
            yield buf
            buf = ""
        buf += line
    if buf:
        yield buf


def split_fortunes(text: str, max_chars: int) -> Iterator[str]:
    """One document per fortune (fortune files separate them with lines holding only '%')."""
    buf = []
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == "%":
            if buf:
                yield from _cut_lines("".join(buf), max_chars)
            buf = []
        else:
            buf.append(line)
    if buf:
        yield from _cut_lines("".join(buf), max_chars)


def split_paragraphs(text: str, max_chars: int) -> Iterator[str]:
    """Consecutive blank-line-separated paragraphs merged into documents of up to max_chars."""
    paras, cur = [], []
    for line in text.splitlines(keepends=True):
        cur.append(line)
        if not line.strip():
            paras.append("".join(cur))
            cur = []
    if cur:
        paras.append("".join(cur))
    buf = ""
    for p in paras:
        if len(buf) + len(p) > max_chars and buf.strip():
            yield buf
            buf = ""
        if len(p) > max_chars:
            yield from _cut_lines(p, max_chars)
            continue
        buf += p
    if buf.strip():
        yield buf


def build_corpus(max_bytes_per_domain: int, max_chars: int = 768, min_chars: int = 48,
                 seed: int = 0) -> list[dict]:
    """Records {"text", "domain", "source"}: each domain's files in a seeded order, split into
    documents, until the domain holds max_bytes_per_domain bytes of UTF-8 (or runs out). Raises
    RuntimeError when fewer than 4 domains are installed."""
    rng = random.Random(seed)
    docs = []
    found = {d: f for d, f in domain_files().items() if f}
    if len(found) < 4:
        raise RuntimeError(f"only {len(found)} text domains are installed ({', '.join(found) or 'none'}); "
                           "scripts/pretrain.sh installs the Debian packages they come from")
    for dom, files in found.items():
        files = list(files)
        rng.shuffle(files)
        split = split_fortunes if dom.startswith("fortunes") else split_paragraphs
        size = 0
        for p in files:
            for t in split(_read(p), max_chars):
                if len(t.strip()) < min_chars:
                    continue
                docs.append({"text": t, "domain": dom, "source": p})
                size += len(t.encode("utf-8"))
                if size >= max_bytes_per_domain:
                    break
            if size >= max_bytes_per_domain:
                break
    return docs
