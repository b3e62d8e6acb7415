"""The scoring call's terms, shared by the wire and the model heads: how a request wants its pairs cut
(`Truncation`), what a document is (text, or an `ImageDocument`), what scoring returns (`ScoredPairs`), logits to
float64 scores, and the result order."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InferenceError


@dataclass(frozen=True)
class Truncation:
    """How a request wants its pairs cut to max_length: from the end (`right`, the default) or the start (`left`,
    TEI's truncation_direction), each document first cut after its first `max_document_tokens` tokens (Cohere's
    max_tokens_per_doc), and whether cutting is allowed at all (TEI's truncate=false: a pair that does not fit is
    an error)."""

    side: str = "right"
    max_document_tokens: int | None = None
    allowed: bool = True
    max_chunks: int | None = None  # chunk instead: a long document is scored as its best of up to this many windows


TRUNCATE_RIGHT = Truncation()


@dataclass(frozen=True, eq=False)
class ImageDocument:
    """A document that holds a page image (a PDF page, a chart, a scanned table), with or without text: the image
    file's bytes as the client sent them (PNG or JPEG, not yet decoded) and its text ("" for none). `digest`, the
    SHA-256 of the bytes, stands for the image wherever a document is compared, hashed, cached or logged: two
    documents are equal when their digests and texts are, and an image's content never reaches a log."""

    image: bytes
    text: str = ""
    digest: str = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "digest", hashlib.sha256(self.image).hexdigest())

    def __eq__(self, other):
        return isinstance(other, ImageDocument) and (self.digest, self.text) == (other.digest, other.text)

    def __hash__(self):
        return hash((self.digest, self.text))

    def __repr__(self):
        return f"ImageDocument(image=<{len(self.image)} bytes sha256:{self.digest[:12]}>, text={self.text!r})"


Document = str | ImageDocument  # what a request's documents are, from the wire to the model head


def logits_to_scores(logits: np.ndarray) -> np.ndarray:
    """Scores in float64: sigmoid of one logit, or the positive-class softmax probability of two
    (softmax(l)[1] == sigmoid(l1 - l0)). A non-finite logit is an InferenceError."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] not in (1, 2):
        raise InferenceError(f"the model returned logits of shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise InferenceError("the model returned a non-finite score")
    z = x[:, 0] if x.shape[1] == 1 else x[:, 1] - x[:, 0]
    e = np.exp(-np.abs(z))  # stable for any magnitude
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def rank(scores: Sequence[float], top_k: int | None = None) -> list[int]:
    """Indices by descending score; equal scores keep ascending input index."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return order if top_k is None else order[:top_k]


@dataclass(frozen=True)
class ScoredPairs:
    scores: np.ndarray  # float64, request order
    raw_scores: np.ndarray  # float64, the logit each score comes from (TEI's raw_scores), request order
    lengths: np.ndarray  # tokens per pair
    truncated: np.ndarray  # bool per pair
    tokenize_ms: float
    infer_ms: float  # on the device
    batches: int
    npu_busy_delta_us: int | None
    queue_ms: float = 0.0  # waiting for a free infer request
    chunks: np.ndarray | None = None  # windows scored per document when chunking, else None
