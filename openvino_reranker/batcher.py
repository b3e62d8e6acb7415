"""The cross-request batcher, which moves raw logits, and the scoring call (`Reranker.score_pairs`): pairs in,
scores out."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass

import numpy as np

from .batching import length_order, plan_batches, slice_round
from .cache import ScoreCache
from .encoding import TRUNCATE_RIGHT, EncodedPairs, ModelHead, Truncation
from .engine import InferenceEngine, NpuBusyCounter
from .errors import (
    DOCUMENTS,
    ClientGoneError,
    DeadlineExceededError,
    DocumentNames,
    InferenceError,
    NotReadyError,
    PayloadTooLargeError,
    ServiceError,
    error_reason,
)
from .scoring import ScoredPairs

log = logging.getLogger("openvino_reranker")

ENCODE_SLICE = 64  # documents tokenized at a time between deadline and token-budget checks


@dataclass(frozen=True)
class WorkLimits:
    """Per-request bounds checked by the scoring path: a deadline (time.monotonic()), a token budget, a probe that
    says whether the client is still there, and how the 413s these checks raise name the request's documents (the
    field its body used: `texts` in a TEI body)."""

    deadline: float | None = None
    max_total_tokens: int | None = None
    client_gone: Callable[[], bool] = lambda: False
    names: DocumentNames = DOCUMENTS

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceededError("the request's deadline passed before its work ran")
        try:
            gone = self.client_gone()
        except Exception:  # a probe that breaks must not break scoring: the request keeps its answer
            log.debug("client-gone probe failed", exc_info=True)
            gone = False
        if gone:
            raise ClientGoneError("the client closed the connection")


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


class _Job:
    """One request's pairs inside the Batcher: logits arrive batch by batch; the future completes at the last."""

    def __init__(self, encoded: EncodedPairs, limits: WorkLimits, num_labels: int):
        self.encoded = encoded
        self.limits = limits
        self.future: Future = Future()
        self.logits = np.full((len(encoded.lengths), num_labels), np.nan)
        self.todo = length_order(encoded.lengths)  # indices not yet planned, longest first
        self.remaining = len(self.todo)  # indices not yet scored
        self.submitted = time.perf_counter()
        self.first_started: float | None = None
        self.batches = 0

    def dead(self) -> ServiceError | None:
        """Why this job should not run any more, or None."""
        if self.future.done():
            return DeadlineExceededError("cancelled")
        try:
            self.limits.check()
        except ServiceError as exc:
            return exc
        return None


class Batcher:
    """Cross-request dynamic batching. One owner thread takes the waiting requests in arrival order, gives each a
    slice of a round of at most `round_pairs` pairs and about `round_tokens` tokens (round-robin, so a small request
    never waits behind the whole of a large one), sorts the round's pairs by length, plans micro-batches (per static
    bucket when the engine has them) and hands them to one worker thread per infer request. Workers call the
    engine's blocking `infer`, which releases the GIL, so the device runs `workers` batches at once while the owner
    prepares the next. Each request waits on its own Future.

    No request can wedge it: an unexpected exception while planning a round or running a batch fails the requests
    involved (the HTTP layer answers 500) and the thread goes on. Should a thread end anyway, every waiting and
    later request fails at once with 503 and `stopped_reason` says which thread ended and why (/readyz shows it,
    and the process exits so that systemd restarts it)."""

    def __init__(self, engine: InferenceEngine, head: ModelHead, batch_size: int, round_pairs: int = 64,
                 round_tokens: int | None = None):
        self.engine, self.head = engine, head
        self.batch_size, self.round_pairs = batch_size, max(round_pairs, batch_size)
        # long pairs cost more device time: a round also stops at about round_pairs pairs of 128 tokens, so that a
        # small request waits behind a round of 512-token pairs no longer than behind one of short pairs
        self.round_tokens = round_tokens or self.round_pairs * 128
        self.workers = engine.num_requests
        self.stopped_reason: str | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._jobs: set[_Job] = set()  # submitted and not done: failed at once if a thread ends
        self._jobs_lock = threading.Lock()  # not self._lock: futures complete (and call _forget) under that one
        self._idle_changed = threading.Condition()
        self._idle_workers = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._guarded, args=(self._own,), daemon=True, name="batcher")]
        self._threads += [threading.Thread(target=self._guarded, args=(self._work_loop,), daemon=True,
                                           name=f"infer-{i}") for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, encoded: EncodedPairs, limits: WorkLimits) -> _Job:
        job = _Job(encoded, limits, self.head.contract.num_labels)
        with self._jobs_lock:
            if self._closed:
                job.future.set_exception(self._refusal())
                return job
            self._jobs.add(job)
        job.future.add_done_callback(lambda _, job=job: self._forget(job))
        self._inbox.put(job)
        return job

    def _forget(self, job: _Job) -> None:
        with self._jobs_lock:
            self._jobs.discard(job)

    def _refusal(self) -> NotReadyError:
        if self.stopped_reason:
            return NotReadyError(f"scoring has stopped ({self.stopped_reason}); the server must be restarted",
                                 headers={"Retry-After": "1"})
        return NotReadyError("the server is shutting down")

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the owner and the workers and wait for them, so that nothing holds the engine afterwards."""
        self._closed = True
        self._inbox.put(None)
        for _ in range(self.workers):
            self._work.put(None)
        with self._idle_changed:
            self._idle_changed.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _guarded(self, loop: Callable[[], None]) -> None:
        """Run a thread's loop; if it ends by an exception, stop the batcher loudly instead of silently."""
        try:
            loop()
        except BaseException as exc:
            name = threading.current_thread().name
            self.stopped_reason = f"thread {name} ended: {type(exc).__name__}: {error_reason(exc)}"
            log.critical("scoring stopped: %s", self.stopped_reason, exc_info=True)
            with self._jobs_lock:
                self._closed = True
                jobs = list(self._jobs)
            self._fail(jobs, self._refusal())
            self.close(timeout_s=1.0)

    # ---- owner: rounds of micro-batches

    def _own(self) -> None:
        waiting: deque[_Job] = deque()
        while True:
            if not waiting:
                item = self._inbox.get()
                if item is None:
                    return
                waiting.append(item)
            # plan only when a worker is idle and nothing is queued: requests that arrive while the device is
            # busy join the next round, and so share its batches
            with self._idle_changed:
                self._idle_changed.wait_for(lambda: self._closed or (self._idle_workers > 0 and self._work.empty()))
            if not self._take_arrivals(waiting):
                return
            try:
                batches = self._plan_round(waiting)
            except Exception as exc:  # a bug while planning: fail this round's requests, keep the owner alive
                log.exception("planning a round failed")
                self._fail(list(waiting), exc)
                waiting.clear()
                continue
            for batch in batches:
                self._work.put(batch)

    def _take_arrivals(self, waiting: deque) -> bool:
        """Move every submitted job into `waiting`; False once the batcher is closed."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            waiting.append(item)

    def _plan_round(self, waiting: deque) -> list:
        """Fail the waiting requests that have died, take this round's slices (`slice_round`: at most round_pairs
        pairs and about round_tokens tokens, requests in turn), send the rest of a request that gave a slice behind
        the others, and return the micro-batches: [(feed, shape, [(job, index), ...])]."""
        for job in list(waiting):
            problem = job.dead()
            if problem is not None:
                waiting.remove(job)
                self._fail([job], problem)
        jobs = list(waiting)
        counts = slice_round([job.encoded.lengths[job.todo] for job in jobs], self.round_pairs, self.round_tokens)
        waiting.clear()
        waiting.extend(job for job, n in zip(jobs, counts, strict=True) if n == 0)
        taken: list[tuple[_Job, list[int]]] = []
        for job, n in zip(jobs, counts, strict=True):
            if n:
                part, job.todo = job.todo[:n], job.todo[n:]
                taken.append((job, part))
                if job.todo:
                    waiting.append(job)  # the rest of a large request goes behind the others
        if not taken:
            return []
        owners = [(job, i) for job, part in taken for i in part]
        try:
            merged = EncodedPairs(ids=[job.encoded.ids[i] for job, i in owners],
                                  type_ids=[job.encoded.type_ids[i] for job, i in owners],
                                  lengths=np.array([job.encoded.lengths[i] for job, i in owners]),
                                  truncated=np.zeros(len(owners), bool))
            batches = []
            for batch in plan_batches(merged.lengths, self.engine.buckets, self.batch_size, self.head.max_length):
                feed = self.head.feed(merged, batch.indices, batch.shape)
                batches.append((feed, batch.shape, [owners[k] for k in batch.indices]))
            return batches
        except Exception as exc:  # fail the requests whose pairs were taken; the others stay queued
            log.exception("planning micro-batches failed")
            self._fail([job for job, _ in taken], exc)
            return []

    # ---- workers: run batches, hand out logits

    def _work_loop(self) -> None:
        while True:
            with self._idle_changed:
                self._idle_workers += 1
                self._idle_changed.notify_all()
            item = self._work.get()
            with self._idle_changed:
                self._idle_workers -= 1
            if item is None:
                return
            feed, shape, rows = item
            try:
                self._run_batch(feed, shape, rows)
            except Exception as exc:  # a bug here fails this batch's requests (a logged 500), not the worker
                log.exception("running a batch failed")
                self._fail({id(job): job for job, _ in rows}.values(), exc)

    def _run_batch(self, feed, shape, rows) -> None:
        live = []
        for job in {id(job): job for job, _ in rows}.values():
            problem = job.dead()
            if problem is None:
                live.append(job)
            else:
                self._fail([job], problem)
        if not live:
            return
        started = time.perf_counter()
        for job in live:
            job.first_started = job.first_started or started
        try:
            logits = self.engine.infer(feed, shape, min((j.limits.deadline for j in live
                                                            if j.limits.deadline is not None), default=None))
            if logits.ndim != 2 or logits.shape[0] != shape.rows:
                raise InferenceError(f"the model returned logits of shape {list(logits.shape)} for a batch of "
                                     f"{shape.rows}")
        except Exception as exc:  # handed to the waiting requests (a bug there becomes a logged 500)
            self._fail(live, exc)
            return
        with self._lock:
            for (job, i), row in zip(rows, logits[:len(rows)], strict=True):
                if job.future.done():
                    continue
                job.logits[i] = row
                job.remaining -= 1
            for job in live:
                job.batches += 1
                if job.remaining == 0 and not job.future.done():
                    job.future.set_result(job.logits)

    def cancel(self, job: _Job) -> None:
        with self._lock:
            job.future.cancel()

    def _fail(self, jobs, error: BaseException) -> None:
        with self._lock:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)


class Reranker:
    """Pairs in, scores out: the head encodes (on the caller's thread), the Batcher plans micro-batches across
    concurrent requests and collects their logits, and the head turns those into scores. `score_pairs` is the one
    scoring API the service calls."""

    def __init__(self, head: ModelHead, engine: InferenceEngine, batch_size: int,
                 busy_counter: NpuBusyCounter | None = None, round_pairs: int = 64, cache: ScoreCache | None = None):
        self.head = head
        self.engine = engine
        self.busy_counter = busy_counter
        self.cache = cache
        self.batcher = Batcher(engine, head, batch_size, round_pairs)

    @property
    def stopped_reason(self) -> str | None:
        """Why scoring has stopped for good (a batcher thread ended), or None."""
        return self.batcher.stopped_reason

    def score_pairs(self, query: str | Sequence[str], texts: Sequence[str], limits: WorkLimits = WorkLimits(),
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
                               instruction)
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

    def _encode(self, queries: list[str], texts: list[str], copies: np.ndarray, limits: WorkLimits,
                budget: TokenBudget, truncation: Truncation, instruction: str | None = None) -> EncodedPairs:
        """Tokenize in slices, checking the deadline and the client before each and the token budget after each
        (each pair counted as often as it stands in the request), so that a request over max_total_tokens costs
        about the budget, not its whole body."""
        parts = []
        for start in range(0, len(texts), ENCODE_SLICE):
            limits.check()
            end = start + ENCODE_SLICE
            part = self.head.encode(queries[start:end], texts[start:end], truncation, instruction)
            budget.add(int((part.lengths * copies[start:end]).sum()))
            parts.append(part)
        return EncodedPairs.concat(parts)

    def close(self) -> None:
        self.batcher.close()
