"""The score cache: scores the model already gave, per (query, document) pair and truncation setting, so that a
repeated pair (a retry, the same question re-ranked over an overlapping candidate set) is neither tokenized nor
batched again.

One cache belongs to one compiled model in one process, so the model, its revision, the head and max_length are
fixed for its whole life; the key adds what a request can change: the truncation side, the per-document token cap,
the instruction (decoder rerankers), the query and the document (an image document: its image's SHA-256 digest and
its text, never the image's bytes). Keys are 16-byte BLAKE2b digests, never the texts, so an entry costs about the
same whatever the texts' length (ENTRY_BYTES); the cache is bounded by `max_entries` and evicts the least recently
used.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

from .scoring import Document, ImageDocument, Truncation

ENTRY_BYTES = 300  # key object, value tuple and OrderedDict links: 294 bytes measured with tracemalloc (50,000 entries)


class ScoreCache:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, tuple[float, float, int, bool]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(truncation: Truncation, query: str, document: Document, instruction: str | None = None) -> bytes:
        # JSON of the parts: unambiguous whatever the texts hold (a NUL, a quote, a lone surrogate); an image
        # document is an object, a text a string, so the two never share a key
        doc = {"image_sha256": document.digest, "text": document.text} if isinstance(document, ImageDocument) \
            else document
        material = json.dumps([truncation.side, truncation.max_document_tokens, instruction, query, doc])
        return hashlib.blake2b(material.encode("ascii"), digest_size=16).digest()

    def get(self, key: bytes) -> tuple[float, float, int, bool] | None:
        """(score, raw score, tokens, truncated) exactly as the model gave them, or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: bytes, value: tuple[float, float, int, bool]) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
