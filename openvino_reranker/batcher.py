"""The cross-request batcher: the encoded pairs of concurrent requests in, their raw logits out, through shared
micro-batches on the engine's infer requests; `WorkLimits`, the per-request bounds it checks."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from .batching import length_order, plan_batches, slice_round
from .config import ShapeBucket
from .encoding import EncodedPairs, ModelHead
from .engine import InferenceEngine
from .errors import (
    DOCUMENTS,
    ClientGoneError,
    DeadlineExceededError,
    DocumentNames,
    InferenceError,
    NotReadyError,
    ServiceError,
    error_reason,
)

log = logging.getLogger("openvino_reranker")


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


class Job:
    """One request's pairs inside the Batcher (what `submit` returns): logits arrive batch by batch; the future
    completes at the last."""

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


def take_round(waiting: deque[Job], max_pairs: int, max_tokens: int) -> list[tuple[Job, list[int]]]:
    """This round's slices of the waiting jobs (`slice_round`: requests in turn, at most max_pairs pairs and about
    max_tokens tokens), each with the indices it gives, taken off the job's todo. Jobs the round does not reach keep
    their place at the front of `waiting`; the rest of a job that gave a slice goes behind them, so that a small
    request never waits behind the whole of a large one."""
    jobs = list(waiting)
    counts = slice_round([job.encoded.lengths[job.todo] for job in jobs], max_pairs, max_tokens)
    waiting.clear()
    waiting.extend(job for job, n in zip(jobs, counts, strict=True) if n == 0)
    taken = []
    for job, n in zip(jobs, counts, strict=True):
        if n:
            part, job.todo = job.todo[:n], job.todo[n:]
            taken.append((job, part))
            if job.todo:
                waiting.append(job)
    return taken


def micro_batches(taken: list[tuple[Job, list[int]]], head: ModelHead, buckets: tuple[ShapeBucket, ...] | None,
                  batch_size: int, pad_multiple: int = 8, parallel: int = 1
                  ) -> list[tuple[dict[str, np.ndarray], ShapeBucket, list[tuple[Job, int]]]]:
    """A round's pairs (`taken`: each job with the indices of its slice) merged across requests and planned into
    micro-batches (`plan_batches`, shared out evenly over `parallel` infer requests), each as (the head's feed, its
    shape, the (job, index) of each of its rows)."""
    owners = [(job, i) for job, part in taken for i in part]
    merged = EncodedPairs(ids=[job.encoded.ids[i] for job, i in owners],
                          type_ids=[job.encoded.type_ids[i] for job, i in owners],
                          lengths=np.array([job.encoded.lengths[i] for job, i in owners]),
                          truncated=np.zeros(len(owners), bool),
                          images=[job.encoded.images[i] if job.encoded.images is not None else None
                                  for job, i in owners])
    return [(head.feed(merged, batch.indices, batch.shape), batch.shape, [owners[k] for k in batch.indices])
            for batch in plan_batches(merged.lengths, buckets, batch_size, head.max_length, pad_multiple, parallel)]


class Batcher:
    """Cross-request dynamic batching. One owner thread takes a round of at most `round_pairs` pairs and about
    `round_tokens` tokens from the waiting requests in turn (`take_round`), plans its micro-batches by length, in the
    engine's static buckets when it has them (`micro_batches`), and hands them to one worker thread per infer
    request. Workers call the engine's blocking `infer`, which releases the GIL, so the device runs `workers` batches
    at once while the owner prepares the next. Each request waits on its own Future.

    No request can wedge it: an unexpected exception while planning a round or running a batch fails the requests
    involved (the HTTP layer answers 500) and the thread goes on. Should a thread end anyway, every waiting and
    later request fails at once with 503 and `stopped_reason` says which thread ended and why (/readyz shows it,
    and the process exits so that systemd restarts it)."""

    def __init__(self, engine: InferenceEngine, head: ModelHead, batch_size: int, round_pairs: int = 64,
                 round_tokens: int | None = None, pad_multiple: int = 8):
        self.engine, self.head = engine, head
        self.batch_size, self.round_pairs = batch_size, max(round_pairs, batch_size)
        self.pad_multiple = pad_multiple
        # long pairs cost more device time: a round also stops at about round_pairs pairs of 128 tokens, so that a
        # small request waits behind a round of 512-token pairs no longer than behind one of short pairs
        self.round_tokens = round_tokens or self.round_pairs * 128
        self.workers = engine.num_requests
        self.stopped_reason: str | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()  # submitted and not done: failed at once if a thread ends
        self._jobs_lock = threading.Lock()  # not self._lock: futures complete (and call _forget) under that one
        self._idle_changed = threading.Condition()
        self._idle_workers = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._guarded, args=(self._own,), daemon=True, name="batcher")]
        self._threads += [threading.Thread(target=self._guarded, args=(self._work_loop,), daemon=True,
                                           name=f"infer-{i}") for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, encoded: EncodedPairs, limits: WorkLimits) -> Job:
        job = Job(encoded, limits, self.head.contract.num_labels)
        with self._jobs_lock:
            if self._closed:
                job.future.set_exception(self._refusal())
                return job
            self._jobs.add(job)
        job.future.add_done_callback(lambda _, job=job: self._forget(job))
        self._inbox.put(job)
        return job

    def _forget(self, job: Job) -> None:
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
        waiting: deque[Job] = deque()
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
        """Fail the waiting requests that have died, take this round's slices (`take_round`) and plan them into
        micro-batches (`micro_batches`)."""
        for job in list(waiting):
            problem = job.dead()
            if problem is not None:
                waiting.remove(job)
                self._fail([job], problem)
        taken = take_round(waiting, self.round_pairs, self.round_tokens)
        if not taken:
            return []
        try:
            return micro_batches(taken, self.head, self.engine.buckets, self.batch_size, self.pad_multiple,
                                 self.workers)
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

    def cancel(self, job: Job) -> None:
        with self._lock:
            job.future.cancel()

    def _fail(self, jobs, error: BaseException) -> None:
        with self._lock:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
