"""Reading a corpus (JSONL or a folder of text files) and a sample corpus built from text installed
on any Debian-like machine with Python (several domains, for tests, benchmarks and examples)."""
from __future__ import annotations

import json
import os
import random
import sysconfig
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional


@dataclass
class Corpus:
    """Documents in input order: texts[i] is document i; names[i] says where it came from
    (file path, or "path:line" for JSONL)."""
    texts: list[str]
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


def _is_text_file(path: str) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def _iter_folder(folder: str, suffixes: Optional[tuple[str, ...]]) -> Iterator[str]:
    """Regular files under folder, sorted (the order is the document order), skipping hidden ones."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or (suffixes and not name.endswith(suffixes)):
                continue
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                yield path


def read_corpus(path: str, text_field: str = "text", suffixes: Optional[Iterable[str]] = None) -> Corpus:
    """Reads a JSONL file (one JSON object per line, the document in `text_field`) or a folder of
    text files (one document per file; binary files are skipped; `suffixes` filters by name).
    Raises ValueError naming the input when it is missing, malformed or holds no document."""
    if not os.path.exists(path):
        raise ValueError(f"input: {path!r} does not exist")
    texts, names = [], []
    if os.path.isdir(path):
        sfx = tuple(suffixes) if suffixes else None
        for p in _iter_folder(path, sfx):
            if not _is_text_file(p):
                continue
            with open(p, "r", encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
            names.append(os.path.relpath(p, path))
    else:
        with open(path, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"input: {path}:{lineno} is not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or text_field not in rec:
                    raise ValueError(f"text_field: {path}:{lineno} has no field {text_field!r}")
                text = rec[text_field]
                if not isinstance(text, str):
                    raise ValueError(f"text_field: {path}:{lineno} field {text_field!r} is "
                                     f"{type(text).__name__}, expected a string")
                texts.append(text)
                names.append(f"{path}:{lineno}")
    if not texts:
        raise ValueError(f"input: {path!r} holds no document")
    return Corpus(texts, names)


def write_jsonl(records: Iterable[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- sample corpus

def _domain_roots() -> dict[str, tuple[list[str], tuple[str, ...], tuple[str, ...]]]:
    """domain -> (folders, file suffixes ("" = any), path parts to skip)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return {
        "python": ([stdlib], (".py",), ("site-packages", "dist-packages")),
        "c-header": (["/usr/include"], (".h",), ()),
        "license": (["/usr/share/common-licenses", "/usr/share/doc"], ("",), ()),
        "perl": (["/usr/share/perl", "/usr/share/perl5", "/usr/lib/x86_64-linux-gnu/perl-base",
                  "/usr/lib/x86_64-linux-gnu/perl", "/usr/lib/x86_64-linux-gnu/perl5"], (".pm",), ()),
    }


def _domain_files(folders, suffixes, skip) -> list[str]:
    out = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for p in _iter_folder(folder, None):
            if any(part in skip for part in p.split(os.sep)):
                continue
            name = os.path.basename(p)
            if suffixes == ("",):
                # /usr/share/doc holds many formats: its licence files are named "copyright".
                if folder.endswith("/doc") and name != "copyright":
                    continue
            elif not name.endswith(suffixes):
                continue
            out.append(p)
    return sorted(set(out))


def _chunks(text: str, chunk_chars: int, min_chars: int) -> Iterator[str]:
    """Cuts text at line boundaries into pieces of at most ~chunk_chars characters."""
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
        buf.append(line)
        size += len(line)
        if size >= chunk_chars:
            piece = "".join(buf)
            if len(piece.strip()) >= min_chars:
                yield piece
            buf, size = [], 0
    piece = "".join(buf)
    if len(piece.strip()) >= min_chars:
        yield piece


def sample_corpus(n_docs: int, seed: int = 0, chunk_chars: int = 1500, min_chars: int = 200,
                  domains: Optional[Iterable[str]] = None) -> list[dict]:
    """A corpus of about n_docs documents from text installed on this machine: Python standard
    library sources, C headers from /usr/include, software licences (/usr/share/common-licenses,
    Debian copyright files) and Perl modules. Each file is cut at line boundaries into documents of
    ~chunk_chars characters; files are visited in a seeded order and the domains are balanced
    (a domain that runs out leaves its share to the others). Returns records
    {"text", "domain", "source"} in a seeded shuffled order. Domains absent from the machine are
    skipped; ValueError when none is found."""
    if n_docs <= 0:
        raise ValueError(f"n_docs must be > 0, got {n_docs}")
    roots = _domain_roots()
    wanted = list(domains) if domains is not None else list(roots)
    rng = random.Random(seed)
    readers = []
    for dom in wanted:
        if dom not in roots:
            raise ValueError(f"domains: unknown domain {dom!r} (known: {', '.join(roots)})")
        files = _domain_files(*roots[dom])
        rng.shuffle(files)
        if files:
            readers.append(_DomainReader(dom, files, chunk_chars, min_chars))
    if not readers:
        raise ValueError("sample_corpus: none of the domains " + ", ".join(wanted) + " exists on this machine")
    docs: list[dict] = []
    active = list(readers)
    while len(docs) < n_docs and active:
        for r in list(active):  # round robin keeps the domains balanced
            d = r.next()
            if d is None:
                active.remove(r)
                continue
            docs.append(d)
            if len(docs) >= n_docs:
                break
    rng.shuffle(docs)
    return docs


class _DomainReader:
    def __init__(self, domain, files, chunk_chars, min_chars):
        self.domain, self.files, self.chunk_chars, self.min_chars = domain, files, chunk_chars, min_chars
        self._it = self._gen()

    def _gen(self):
        for p in self.files:
            try:
                if not _is_text_file(p):
                    continue
                with open(p, "r", encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            for piece in _chunks(text, self.chunk_chars, self.min_chars):
                yield {"text": piece, "domain": self.domain, "source": p}

    def next(self):
        return next(self._it, None)
