"""What each API dialect answers, and the dialect table: the response body and the error body of each dialect,
`/healthz`'s body, and `DIALECTS`, which joins each dialect's paths to its parser (api.py) and its renderers. The
field names of scoring answers appear only here. It depends on errors, scoring and api alone.

`DIALECTS` is the table the HTTP layer routes from: each entry names its paths, its parser, its renderer, its
error shape and whether it needs the API key. Adding an API is one entry plus its parse function in api.py and its
render functions here (ARCHITECTURE.md, "Adding an API dialect").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .api import (
    INFINITY_KEYS,
    Document,
    RequestLimits,
    RerankRequest,
    parse_cohere,
    parse_infinity,
    parse_native,
    parse_nim,
    parse_pairs,
    parse_tei,
)
from .errors import ServiceError
from .scoring import ScoredPairs, rank


@dataclass(frozen=True)
class ResponseContext:
    """What a response says besides the scores."""

    request_id: str
    model_name: str
    device: str
    total_ms: float


def render_native(request: RerankRequest, scored: ScoredPairs, ctx: ResponseContext) -> dict:
    results = []
    for i in rank(scored.scores, request.top_k):
        doc = request.documents[i]
        item: dict[str, Any] = {"index": i}
        if doc.id is not None:
            item["id"] = doc.id
        item["score"] = float(scored.scores[i])
        item["truncated"] = bool(scored.truncated[i])
        item["tokens"] = int(scored.lengths[i])
        if scored.chunks is not None:
            item["chunks"] = int(scored.chunks[i])
        if request.return_documents:
            if doc.is_image:  # never the image itself: its digest, and its text when it has one
                item["image_sha256"] = doc.image.digest if doc.image is not None else None
            if doc.text or not doc.is_image:
                item["text"] = doc.text
        results.append(item)
    return {
        "ok": True,
        "results": results,
        "model": ctx.model_name,
        "device": ctx.device,
        "usage": {"documents": len(request.documents), "tokens": int(scored.lengths.sum())},
        "timings_ms": {"tokenize": round(scored.tokenize_ms, 3), "infer": round(scored.infer_ms, 3),
                       "total": round(ctx.total_ms, 3)},
        "npu_busy_delta_us": scored.npu_busy_delta_us,
    }


def render_native_error(error: ServiceError) -> dict:
    return {"ok": False, "error": {"type": error.error_type, "message": error.message, "field": error.field}}


def echo(doc: Document) -> Any:
    """What `return_documents` gives back of a document: the object (or infinity's string) as sent, but never an
    image's data: an image document is echoed as the object sent without its `image` or `content`, plus its `text`
    (when it has one) and `image_sha256`, the SHA-256 of the image file (infinity's string form: its text)."""
    if not doc.is_image:
        return doc.original
    if not isinstance(doc.original, dict):
        return doc.text
    echoed = {key: value for key, value in doc.original.items() if key not in ("image", "content", "text")}
    if doc.text:
        echoed["text"] = doc.text
    echoed["image_sha256"] = doc.image.digest if doc.image is not None else None
    return echoed


def _cohere_results(request: RerankRequest, scored: ScoredPairs, values=None) -> list[dict]:
    """Cohere-shaped results, best first: `relevance_score` is `values` (the scores unless given, e.g. the logits
    infinity's raw_scores asks for), `document` the object as sent (`echo`)."""
    values = scored.scores if values is None else values
    results = []
    for i in rank(scored.scores, request.top_k):
        item: dict[str, Any] = {"index": i, "relevance_score": float(values[i])}
        if request.return_documents:
            item["document"] = echo(request.documents[i])
        results.append(item)
    return results


def render_cohere(request: RerankRequest, scored: ScoredPairs, ctx: ResponseContext) -> dict:
    """Cohere v1, plus Jina's top-level `model` and `usage` (Jina's clients read them; Cohere's ignore them)."""
    tokens = int(scored.lengths.sum())
    return {
        "id": ctx.request_id,
        "results": _cohere_results(request, scored),
        "meta": {"api_version": {"version": "1"}, "model": ctx.model_name, "billed_units": {"search_units": 1},
                 "tokens": {"input_tokens": tokens, "output_tokens": 0}},
        "model": ctx.model_name,
        "usage": {"total_tokens": tokens},
    }


def render_cohere_v2(request: RerankRequest, scored: ScoredPairs, ctx: ResponseContext) -> dict:
    return {
        "id": ctx.request_id,
        "results": _cohere_results(request, scored),
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                 "tokens": {"input_tokens": int(scored.lengths.sum()), "output_tokens": 0}},
    }


def render_cohere_error(error: ServiceError) -> dict:
    return {"message": error.message, "type": error.error_type, "field": error.field}  # Cohere's SDKs read message


def render_tei(request: RerankRequest, scored: ScoredPairs, ctx: ResponseContext) -> list:
    """TEI's bare list, best first: `score` is the 0..1 score, or with raw_scores the logit it comes from."""
    values = scored.raw_scores if request.raw_scores else scored.scores
    results = []
    for i in rank(scored.scores, request.top_k):
        item: dict[str, Any] = {"index": i, "score": float(values[i])}
        if request.return_documents:
            item["text"] = request.documents[i].text
        results.append(item)
    return results


TEI_ERROR_TYPES = {"invalid_request": "Validation", "too_large": "Validation", "overloaded": "Overloaded",
                   "not_ready": "Unhealthy", "inference_failed": "Backend"}


def render_tei_error(error: ServiceError) -> dict:
    return {"error": error.message, "error_type": TEI_ERROR_TYPES.get(error.error_type, error.error_type),
            "field": error.field}


def render_infinity(request: RerankRequest, scored: ScoredPairs, ctx: ResponseContext) -> dict:
    """infinity's answer, which vLLM's clients parse too: infinity_client requires model and usage with both
    prompt_tokens and total_tokens, and object, when present, to be "rerank"."""
    results = _cohere_results(request, scored, scored.raw_scores if request.raw_scores else scored.scores)
    tokens = int(scored.lengths.sum())
    return {"object": "rerank", "id": ctx.request_id, "created": int(time.time()), "model": ctx.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results}


def render_nim(request: RerankRequest, scored: ScoredPairs, ctx: ResponseContext) -> dict:
    """NIM's rankings, best first: `logit` is the model's logit (the score is its sigmoid), which NVIDIARerank
    reports as the relevance score."""
    return {"rankings": [{"index": i, "logit": float(scored.raw_scores[i])} for i in rank(scored.scores)],
            "model": ctx.model_name, "usage": {"total_tokens": int(scored.lengths.sum())}}


def render_nim_error(error: ServiceError) -> dict:
    return {"detail": error.message, "type": error.error_type, "field": error.field}  # NVIDIARerank shows detail


def render_pairs(request: RerankRequest, scored: ScoredPairs, ctx: ResponseContext) -> dict:
    return {"scores": [float(s) for s in scored.scores]}


# ---- the dialect table


@dataclass(frozen=True)
class Dialect:
    name: str
    paths: tuple[str, ...]  # POST routes
    parse: Callable[[Any, RequestLimits], RerankRequest]
    render: Callable[[RerankRequest, ScoredPairs, ResponseContext], dict]
    render_error: Callable[[ServiceError], dict]
    needs_key: bool = True  # with an API key set, the key is required
    # Several dialects may share a path: the first in DIALECTS whose `matches` accepts the decoded body serves it,
    # and the path's last dialect is the default (its error shape answers before a body is decoded).
    matches: Callable[[Any], bool] | None = None  # None: any body (the path's default)


TEI = Dialect("tei", ("/rerank",), parse_tei, render_tei, render_tei_error,
              matches=lambda body: isinstance(body, dict) and "texts" in body)
PAIRS = Dialect("pairs", ("/rerank",), parse_pairs, render_pairs, render_native_error,
                matches=lambda body: isinstance(body, list))
INFINITY = Dialect("infinity", ("/rerank",), parse_infinity, render_infinity, render_cohere_error,
                   matches=lambda body: isinstance(body, dict) and any(key in body for key in INFINITY_KEYS))
NATIVE = Dialect("native", ("/rerank",), parse_native, render_native, render_native_error)
COHERE = Dialect("cohere", ("/v1/rerank", "/api/v1/rerank"), parse_cohere, render_cohere, render_cohere_error)
COHERE_V2 = Dialect("cohere_v2", ("/v2/rerank",), parse_cohere, render_cohere_v2, render_cohere_error)
NIM = Dialect("nim", ("/v1/ranking",), parse_nim, render_nim, render_nim_error)
DIALECTS = (TEI, PAIRS, INFINITY, NATIVE, COHERE, COHERE_V2, NIM)


def dialect_for(dialects: tuple[Dialect, ...], body: Any) -> Dialect:
    """The dialect of one path that serves this body (see Dialect.matches)."""
    return next((d for d in dialects if d.matches is not None and d.matches(body)), dialects[-1])


# ---- liveness


def render_healthz(version: str) -> dict:
    return {"ok": True, "status": "alive", "version": version}
