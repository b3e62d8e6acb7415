"""The RAG side: rerank vector-search candidates with openvino-reranker, falling back to vector order on any failure.
Standard library only; copy this file into your pipeline or import it.

    from client import rerank_candidates
    result = rerank_candidates(query, candidates)   # candidates: [{"id": ..., "text": ..., "score": ...}, ...]
    for c in result.candidates: ...                 # the top TOP_K, each with "rerank_score" (None on fallback)

Settings come from the environment (or a RerankSettings passed in):
RAG_RERANK_ENABLED (default false), RAG_RERANK_URL (http://127.0.0.1:18818), RAG_RERANK_INITIAL_K (20),
RAG_RERANK_TOP_K (5), RAG_RERANK_TIMEOUT_MS (3000).

RAG_RERANK_URL is the service's base URL or the route itself (see `rerank_endpoint`): a path ending in /rerank is
used as is, any other path (none, or a reverse proxy's prefix such as /reranker) gets /rerank appended; trailing
slashes are ignored. http and https.

`rerank_candidates` never raises for a service failure and returns within the timeout: disabled, refused, timed
out, non-2xx, malformed JSON, or results that do not match the candidates all give the first TOP_K candidates in
vector order with `rerank_error` set. A 404 means the URL names no route, a configuration error rather than a
service failure: its `rerank_error` starts with "configuration: " and names the URL called, and it is also logged
once per URL at WARNING on the "openvino_reranker.client" logger.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("openvino_reranker.client")

ROUTE = "/rerank"  # the native route; the client speaks its protocol
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class RerankSettings:
    enabled: bool = False
    url: str = "http://127.0.0.1:18818"
    initial_k: int = 20
    top_k: int = 5
    timeout_ms: int = 3000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RerankSettings:
        """Read RAG_RERANK_*; a malformed value raises ValueError naming the variable (a configuration error,
        found at startup, not a service failure)."""
        env = os.environ if environ is None else environ

        def integer(name: str, default: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not an integer") from None
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
            return value

        enabled_raw = env.get("RAG_RERANK_ENABLED", "").strip().lower()
        if enabled_raw not in _TRUE | _FALSE:
            raise ValueError(f"RAG_RERANK_ENABLED={enabled_raw!r} is not true or false")
        url = env.get("RAG_RERANK_URL", "").strip() or cls.url
        try:
            rerank_endpoint(url)
        except ValueError as exc:
            raise ValueError(f"RAG_RERANK_URL={url!r} {exc} (expected http://HOST:PORT, a path prefix such as "
                             f"http://HOST/reranker, or the route itself, http://HOST:PORT/rerank)") from None
        return cls(enabled_raw in _TRUE, url.rstrip("/"), integer("RAG_RERANK_INITIAL_K", cls.initial_k),
                   integer("RAG_RERANK_TOP_K", cls.top_k), integer("RAG_RERANK_TIMEOUT_MS", cls.timeout_ms))


@dataclass(frozen=True)
class RerankResult:
    candidates: list[dict]  # top_k candidates (copies), each with "rerank_score": float or None
    reranked: bool
    rerank_error: str | None
    latency_ms: float


class RerankFailed(Exception):
    """Internal: any way the service call can fail; turned into the vector-order fallback."""


class RerankMisconfigured(RerankFailed):
    """Internal: a failure that retrying will not fix (the URL names no route); also logged once at WARNING."""


def rerank_endpoint(url: str) -> str:
    """The URL `rerank_candidates` posts to, given RAG_RERANK_URL: trailing slashes are dropped, then a path that
    ends with /rerank is used as is and any other path (none, or a proxy's prefix) gets /rerank appended.
    ValueError (the reason, without the variable's name) for what is clearly a misconfiguration."""
    if not url or not url.isascii() or any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError("must not be empty or contain spaces, control or non-ASCII characters")
    if "?" in url or "#" in url:
        raise ValueError("must not carry a query string or a fragment")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("has no host")
    if port == 0:
        raise ValueError("has port 0")
    if "@" in parts.netloc:
        raise ValueError("must not carry credentials (user:password@): the client does not send them")
    path = parts.path.rstrip("/")
    if path.endswith("/v1" + ROUTE):
        raise ValueError("names the Cohere-compatible route /v1/rerank; this client speaks the native protocol")
    if not path.endswith(ROUTE):
        path += ROUTE
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, error: str) -> None:
    """Log a configuration error at WARNING the first time it is seen for `key` (the URL), not on every call."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning("reranking falls back to vector order: %s", error)


def rerank_candidates(query: str, candidates: Sequence[Mapping[str, Any]],
                      settings: RerankSettings | None = None) -> RerankResult:
    """Rerank the first INITIAL_K candidates (each a mapping with "id" and "text", in vector order) and return the
    best TOP_K. Any service failure returns the first TOP_K in vector order with rerank_error set."""
    started = time.monotonic()
    settings = settings or RerankSettings.from_env()
    pool = [dict(c) for c in list(candidates)[:settings.initial_k]]

    def fallback(error: str) -> RerankResult:
        top = pool[:settings.top_k]
        for c in top:
            c["rerank_score"] = None
        return RerankResult(top, False, error, (time.monotonic() - started) * 1000)

    if not settings.enabled:
        return fallback("disabled")
    try:
        endpoint = rerank_endpoint(settings.url)
    except ValueError as exc:  # a RerankSettings built by hand; from_env() rejects these at startup
        error = f"configuration: url {settings.url!r} {exc}"
        _warn_once(settings.url, error)
        return fallback(error)
    if not pool:
        return RerankResult([], False, None, 0.0)
    try:
        texts = [_text_of(c, i) for i, c in enumerate(pool)]
        want = min(settings.top_k, len(pool))
        payload = {"query": query, "documents": texts, "top_k": want}
        body = _post_json(endpoint, payload, started + settings.timeout_ms / 1000)
        order = _check_results(body, len(pool), want)
    except RerankMisconfigured as exc:
        _warn_once(endpoint, str(exc))
        return fallback(str(exc))
    except RerankFailed as exc:
        return fallback(str(exc))
    ranked = []
    for index, score in order:
        c = pool[index]
        c["rerank_score"] = score
        ranked.append(c)
    return RerankResult(ranked, True, None, (time.monotonic() - started) * 1000)


def _text_of(candidate: Mapping[str, Any], i: int) -> str:
    text = candidate.get("text")
    if not isinstance(text, str) or not text.strip():
        raise RerankFailed(f"candidate {i} has no text")
    return text


def _post_json(url: str, payload: dict, deadline: float) -> Any:
    """POST JSON and parse the answer, all within `deadline` (time.monotonic()). The exchange runs on a helper
    thread so that a server trickling bytes cannot stretch it: at the deadline the socket is shut down."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    connection = http.client.HTTPSConnection if https else http.client.HTTPConnection
    # The port is always given: without it http.client would read the end of an IPv6 address ("::1") as one.
    conn = connection(parts.hostname, parts.port or (443 if https else 80),
                      timeout=max(0.001, deadline - time.monotonic()))
    outcome: dict[str, Any] = {}

    def exchange():
        try:
            conn.request("POST", parts.path, body=json.dumps(payload).encode(),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            outcome["status"], outcome["body"] = resp.status, resp.read()
        except Exception as exc:  # reported to the caller below as a failure of the service
            outcome["error"] = exc

    worker = threading.Thread(target=exchange, daemon=True, name="rerank-call")
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
        if conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        conn.close()
        raise RerankFailed("timeout")
    conn.close()
    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, TimeoutError):
            raise RerankFailed("timeout")
        raise RerankFailed(f"{type(exc).__name__}: {exc}")
    snippet = outcome["body"][:200].decode("utf-8", "replace")
    if outcome["status"] == 404:  # no route at this URL: RAG_RERANK_URL is wrong, retrying will not help
        raise RerankMisconfigured(f"configuration: HTTP 404 from POST {url} (check RAG_RERANK_URL): {snippet}")
    if not 200 <= outcome["status"] < 300:
        raise RerankFailed(f"HTTP {outcome['status']}: {snippet}")
    try:
        return json.loads(outcome["body"])
    except ValueError:
        raise RerankFailed("malformed JSON from the reranker") from None


def _check_results(body: Any, n: int, want: int) -> list[tuple[int, float]]:
    """(index, score) pairs in served order, or RerankFailed when they do not match the candidates."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        raise RerankFailed("the reranker's answer has no results list")
    if len(results) != want:
        raise RerankFailed(f"the reranker returned {len(results)} results for {want} requested")
    order, seen = [], set()
    for r in results:
        index = r.get("index") if isinstance(r, dict) else None
        score = r.get("score") if isinstance(r, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n or index in seen:
            raise RerankFailed(f"the reranker returned an index that matches no candidate: {index!r}")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise RerankFailed(f"the reranker returned a score that is not a finite number: {score!r}")
        seen.add(index)
        order.append((index, float(score)))
    return order
