"""Tokenizers for packing, pluggable: ``encode_batch(list[str]) -> list[np.ndarray]`` of token ids,
plus ``vocab_size``, ``separator_id`` (written after every document), ``pad_id`` and ``describe()``.

ByteTokenizer (the default, no download): the UTF-8 bytes of the text, ids 0..255; id 256 is the
document separator (end of document), id 257 the padding; vocab_size 258 (stored as uint16).
HFTokenizer wraps a `tokenizers.Tokenizer` or a `transformers` tokenizer (fast or slow); its
separator is the tokenizer's EOS token (or SEP) unless given."""
from __future__ import annotations

from typing import Optional

import numpy as np


class ByteTokenizer:
    vocab_size = 258
    separator_id = 256
    pad_id = 257

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"name": "bytes", "vocab_size": self.vocab_size, "separator_id": self.separator_id,
                "pad_id": self.pad_id}


class HFTokenizer:
    """A `tokenizers.Tokenizer` or a `transformers` tokenizer. Special tokens are not added per
    document (the separator is written between documents instead)."""

    def __init__(self, tok, separator_id: Optional[int] = None, pad_id: Optional[int] = None, name: str = ""):
        self.tok, self.name = tok, name
        self._fast = hasattr(tok, "encode_batch") and not hasattr(tok, "batch_decode")  # tokenizers.Tokenizer
        if self._fast:
            self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        else:
            self.vocab_size = int(len(tok))
        if separator_id is None:
            separator_id = self._special("eos_token_id", "sep_token_id", ("</s>", "[SEP]", "<|endoftext|>", "<eos>"))
        if separator_id is None:
            raise ValueError("separator_id: the tokenizer has no EOS/SEP token; pass separator_id")
        if pad_id is None:
            pad_id = self._special("pad_token_id", None, ("<pad>", "[PAD]"))
        self.separator_id = int(separator_id)
        self.pad_id = int(pad_id) if pad_id is not None else self.separator_id
        for name_, v in (("separator_id", self.separator_id), ("pad_id", self.pad_id)):
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"{name_} = {v} is outside the vocabulary [0, {self.vocab_size})")

    def _special(self, attr, attr2, names):
        for a in (attr, attr2):
            if a and getattr(self.tok, a, None) is not None:
                return getattr(self.tok, a)
        if self._fast:
            for n in names:
                i = self.tok.token_to_id(n)
                if i is not None:
                    return i
        return None

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self._fast:
            encs = self.tok.encode_batch(texts, add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.int64) for e in encs]
        out = self.tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return [np.asarray(x, dtype=np.int64) for x in out]

    def describe(self) -> dict:
        return {"name": self.name or type(self.tok).__name__, "vocab_size": self.vocab_size,
                "separator_id": self.separator_id, "pad_id": self.pad_id}


def make_tokenizer(spec) -> "ByteTokenizer | HFTokenizer":
    """None / "bytes", a tokenizer object, "tokenizers:FILE.json" or "hf:PATH" (a local
    transformers tokenizer folder)."""
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    if not isinstance(spec, str):
        return spec if hasattr(spec, "encode_batch") and hasattr(spec, "separator_id") else HFTokenizer(spec)
    if spec.startswith("tokenizers:"):
        from tokenizers import Tokenizer

        return HFTokenizer(Tokenizer.from_file(spec.split(":", 1)[1]), name=spec)
    if spec.startswith("hf:"):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(spec.split(":", 1)[1], local_files_only=True), name=spec)
    raise ValueError(f"tokenizer must be 'bytes', 'tokenizers:FILE.json' or 'hf:PATH', got {spec!r}")


def storage_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
