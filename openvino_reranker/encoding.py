"""Tokenization: how a (query, document) pair becomes token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of (query, document) pairs, unpadded, in request order."""

    ids: list[np.ndarray]
    type_ids: list[np.ndarray]
    lengths: np.ndarray  # tokens per pair, special tokens included
    truncated: np.ndarray  # bool per pair: longest-first truncation removed tokens


class PairEncoder:
    """The model's own tokenizer.json through `tokenizers`: its pair template supplies the special tokens and
    the type ids; truncation is longest-first at max_length (sentence-transformers' CrossEncoder behaviour)."""

    def __init__(self, tokenizer, max_length: int):
        self.max_length = max_length
        self.tokenizer = tokenizer
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length, strategy="longest_first")
        self.pad_id = self._pad_id(tokenizer)

    @staticmethod
    def _pad_id(tokenizer) -> int:
        if tokenizer.padding and tokenizer.padding.get("pad_id") is not None:
            return int(tokenizer.padding["pad_id"])
        for token in ("[PAD]", "<pad>", "<|pad|>"):
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return 0

    @classmethod
    def from_file(cls, path: Path, max_length: int) -> "PairEncoder":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), max_length)

    def encode(self, query: str, texts: Sequence[str]) -> EncodedPairs:
        encodings = self.tokenizer.encode_batch([(query, text) for text in texts])
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        return EncodedPairs(
            ids=ids,
            type_ids=[np.asarray(e.type_ids, dtype=np.int64) for e in encodings],
            lengths=np.array([len(x) for x in ids], dtype=np.int64),
            truncated=np.array([bool(e.overflowing) for e in encodings], dtype=bool),
        )
