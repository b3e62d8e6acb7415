"""The scoring front, `Reranker.score_pairs`: pairs in, scores out. Identical pairs are scored once, the score cache
answers repeats, a chunked document is scored as its best window, and the token budget (max_total_tokens) is counted
while the pairs are tokenized; the Batcher takes the encoded pairs to the engine and brings back their logits."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass

import numpy as np

from .batcher import Batcher, WorkLimits
from .cache import ScoreCache
from .encoding import DocumentError, EncodedPairs, ModelHead
from .engine import InferenceEngine, NpuBusyCounter
from .errors import BadRequestError, DeadlineExceededError, DocumentNames, PayloadTooLargeError
from .scoring import TRUNCATE_RIGHT, Document, ScoredPairs, Truncation

ENCODE_SLICE = 64  # documents tokenized at a time between deadline and token-budget checks
NO_LIMITS = WorkLimits()  # no deadline and no token budget (the startup checks' calls)


@dataclass(frozen=True)
class Tally:
    """What the score cache's hits already hold for a request: their tokens (each pair counted as often as it stands
    in the request) and the request positions of those that truncation cut."""

    tokens: int
    truncated_origins: list[int]


class TokenBudget:
    """One scoring call's running count of tokens after truncation against max_total_tokens: every document of the
    request counts, duplicates and cache hits included, and a chunked document as the sum of its windows. This is
    the number `usage` reports and `tokens_scored_total` adds up."""

    def __init__(self, limit: int | None, names: DocumentNames):
        self.limit, self.names, self.tokens = limit, names, 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        if self.limit is not None and self.tokens > self.limit:
            raise PayloadTooLargeError(f"the request's {self.names.array} come to more than {self.limit} tokens after "
                                       f"truncation; the limit (max_total_tokens) is {self.limit}", self.names.array)


class Reranker:
    """Pairs in, scores out: the head encodes (on the caller's thread), the Batcher plans micro-batches across
    concurrent requests and collects their logits, and the head turns those into scores. `score_pairs` is the one
    scoring API the service calls."""

    def __init__(self, head: ModelHead, engine: InferenceEngine, batch_size: int,
                 busy_counter: NpuBusyCounter | None = None, round_pairs: int = 64, cache: ScoreCache | None = None,
                 pad_multiple: int = 8):
        self.head = head
        self.engine = engine
        self.busy_counter = busy_counter
        self.cache = cache
        self.batcher = Batcher(engine, head, batch_size, round_pairs, pad_multiple=pad_multiple)

    @property
    def stopped_reason(self) -> str | None:
        """Why scoring has stopped for good (a batcher thread ended), or None."""
        return self.batcher.stopped_reason

    def score_pairs(self, query: str | Sequence[str], texts: Sequence[Document], limits: WorkLimits = NO_LIMITS,
                    truncation: Truncation = TRUNCATE_RIGHT, use_cache: bool = True,
                    instruction: str | None = None) -> ScoredPairs:
        """Scores of (query, text) pairs in request order; `query` is one query for all texts or one per text.
        Identical pairs are tokenized and scored once and their results fanned out. With `truncation.max_chunks`
        a long text is scored as its best window (head.windows). `instruction` replaces the prompt template's
        default instruction (decoder heads that take one)."""
        queries = [query] * len(texts) if isinstance(query, str) else list(query)
        if truncation.max_chunks is None:
            return self._score(queries, list(texts), limits, truncation, use_cache, instruction)
        owners, window_queries, window_texts, left_over = [], [], [], []
        for i, (q, text) in enumerate(zip(queries, texts, strict=True)):
            limits.check()
            windows, rest = self.head.windows(q, text, truncation.max_chunks, instruction)
            owners += [i] * len(windows)
            window_queries += [q] * len(windows)
            window_texts += windows
            left_over.append(rest)
        scored = self._score(window_queries, window_texts, limits, TRUNCATE_RIGHT, use_cache, instruction)
        owners_array = np.array(owners, dtype=np.int64)
        best = np.empty(len(texts), dtype=np.int64)  # each text's best window; ties keep the first
        for i in range(len(texts)):
            mine = np.flatnonzero(owners_array == i)
            best[i] = mine[int(np.argmax(scored.scores[mine]))]
        lengths = np.bincount(owners_array, weights=scored.lengths, minlength=len(texts)).astype(np.int64)
        truncated = np.array(left_over, dtype=bool) | np.bincount(owners_array, weights=scored.truncated,
                                                                  minlength=len(texts)).astype(bool)
        return ScoredPairs(scored.scores[best], scored.raw_scores[best], lengths, truncated, scored.tokenize_ms,
                           scored.infer_ms, scored.batches, scored.npu_busy_delta_us, scored.queue_ms,
                           chunks=np.bincount(owners_array, minlength=len(texts)))

    def _score(self, queries: list[str], texts: list[str], limits: WorkLimits, truncation: Truncation,
               use_cache: bool = True, instruction: str | None = None) -> ScoredPairs:
        """Distinct pairs once each; those in the score cache are neither tokenized nor batched. A cache hit answers
        exactly as scoring would: its tokens count towards max_total_tokens and its truncation towards
        truncate=false, so the same request gets the same status with or without the cache."""
        distinct: dict[tuple[str, str], int] = {}
        inverse = np.array([distinct.setdefault(pair, len(distinct)) for pair in zip(queries, texts, strict=True)],
                           dtype=np.int64)
        pairs = list(distinct)
        first_index = np.unique(inverse, return_index=True)[1]  # where each distinct pair first stands
        copies = np.bincount(inverse, minlength=len(pairs))  # how often each distinct pair stands in the request
        scores, raw = np.zeros(len(pairs)), np.zeros(len(pairs))
        lengths, truncated = np.zeros(len(pairs), dtype=np.int64), np.zeros(len(pairs), dtype=bool)
        cache = self.cache if use_cache else None
        keys = [cache.key(truncation, q, t, instruction) for q, t in pairs] if cache is not None else []
        todo, hits = [], []
        for i in range(len(pairs)):
            hit = cache.get(keys[i]) if cache is not None else None
            if hit is None:
                todo.append(i)
            else:
                hits.append(i)
                scores[i], raw[i], lengths[i], truncated[i] = hit
        known = Tally(int((lengths[hits] * copies[hits]).sum()), [int(first_index[i]) for i in hits if truncated[i]])
        budget = TokenBudget(limits.max_total_tokens, limits.names)
        budget.add(known.tokens)
        run = ScoredPairs(scores[:0], raw[:0], lengths[:0], truncated[:0], 0.0, 0.0, 0, None)
        if todo:
            run = self._run([pairs[i] for i in todo], first_index[todo], copies[todo], limits, budget, truncation,
                            instruction, known)
            scores[todo], raw[todo], lengths[todo], truncated[todo] = run.scores, run.raw_scores, run.lengths, \
                run.truncated
            for i in todo if cache is not None else ():
                cache.put(keys[i], (float(scores[i]), float(raw[i]), int(lengths[i]), bool(truncated[i])))
        else:
            self._refuse_truncated(truncation, known.truncated_origins, limits)
        return ScoredPairs(scores[inverse], raw[inverse], lengths[inverse], truncated[inverse], run.tokenize_ms,
                           run.infer_ms, run.batches, run.npu_busy_delta_us, run.queue_ms)

    def _refuse_truncated(self, truncation: Truncation, origins, limits: WorkLimits) -> None:
        """With truncate=false, a 413 naming the first document (in request order) that truncation cut."""
        if not truncation.allowed and len(origins):
            first = limits.names.entry(int(min(origins)))
            raise PayloadTooLargeError(f"{first} with the query is longer than max_length ({self.head.max_length} "
                                       f"tokens) and truncation was not allowed", first)

    def _run(self, pairs: list[tuple[str, str]], origins: np.ndarray, copies: np.ndarray, limits: WorkLimits,
             budget: TokenBudget, truncation: Truncation, instruction: str | None = None,
             known: Tally | None = None) -> ScoredPairs:
        """Tokenize, batch and infer `pairs`; `origins` are their documents' positions in the request (for errors),
        `copies` how often each stands in it (for the token budget); `known` what the cache hits already hold."""
        t0 = time.perf_counter()
        encoded = self._encode([q for q, _ in pairs], [t for _, t in pairs], copies, limits, budget, truncation,
                               instruction, origins)
        self._refuse_truncated(truncation, [*origins[encoded.truncated].tolist(),
                                            *(known.truncated_origins if known else [])], limits)
        t1 = time.perf_counter()
        limits.check()
        busy_before = self.busy_counter.read() if self.busy_counter else None
        job = self.batcher.submit(encoded, limits)
        timeout = None if limits.deadline is None else max(0.0, limits.deadline - time.monotonic())
        try:
            logits = job.future.result(timeout)
        except FutureTimeoutError:
            self.batcher.cancel(job)  # its remaining batches are dropped
            raise DeadlineExceededError("the request's deadline passed before its work finished") from None
        except BaseException:
            self.batcher.cancel(job)  # whatever went wrong, no batch of this request may run any more
            raise
        scores = self.head.scores(logits)
        raw_scores = self.head.raw_scores(logits)
        t2 = time.perf_counter()
        busy_after = self.busy_counter.read() if self.busy_counter else None
        delta = busy_after - busy_before if busy_before is not None and busy_after is not None else None
        queued = (job.first_started or t2) - job.submitted
        return ScoredPairs(scores, raw_scores, encoded.lengths, encoded.truncated, (t1 - t0) * 1000,
                           (t2 - t1 - queued) * 1000, job.batches, delta, queued * 1000)

    def _encode(self, queries: list[str], texts: list[Document], copies: np.ndarray, limits: WorkLimits,
                budget: TokenBudget, truncation: Truncation, instruction: str | None = None,
                origins: np.ndarray | None = None) -> EncodedPairs:
        """Tokenize in slices, checking the deadline and the client before each and the token budget after each
        (each pair counted as often as it stands in the request), so that a request over max_total_tokens costs
        about the budget, not its whole body. A document the head cannot encode (a broken image: DocumentError) is
        a 400, or a 413 when it is over a limit, naming the document as the request named it (`documents[3]`)."""
        parts = []
        for start in range(0, len(texts), ENCODE_SLICE):
            limits.check()
            end = start + ENCODE_SLICE
            try:
                part = self.head.encode(queries[start:end], texts[start:end], truncation, instruction)
            except DocumentError as exc:
                origin = int(origins[start + exc.index]) if origins is not None else start + exc.index
                name = limits.names.entry(origin)
                error = PayloadTooLargeError if exc.too_large else BadRequestError
                raise error(f"{name}: {exc.reason}", name) from None
            budget.add(int((part.lengths * copies[start:end]).sum()))
            parts.append(part)
        return EncodedPairs.concat(parts)

    def close(self) -> None:
        self.batcher.close()
