"""Cross-request batching: pairs of concurrent requests share micro-batches, large requests do not starve small
ones, and scores stay right under concurrency (real engine, dynamic and static shapes)."""

import threading
import time
from collections import deque

import numpy as np
import pytest
from support.engines import FakeEngine, close_reranker, fake_head, real_reranker
from support.models import SCORE_TOLERANCE
from support.waiting import wait_until

from openvino_reranker.batcher import Job, WorkLimits, take_round
from openvino_reranker.config import ShapeBucket
from openvino_reranker.encoding import EncodedPairs
from openvino_reranker.errors import NotReadyError
from openvino_reranker.reranker import Reranker
from openvino_reranker.scoring import logits_to_scores


class RecordingEngine(FakeEngine):
    """Records each batch's real rows and shape. Gated: the first batch stays on the device until the test opens
    the gate, so that the requests sent meanwhile pile up; `delay_s` (optional) slows every batch after that."""

    def __init__(self, delay_s=0.0, buckets=None):
        super().__init__("slow" if delay_s else "ok", delay_s, gate=threading.Event())
        self.buckets = buckets
        self.rows: list[int] = []
        self.shapes: list = []
        self.order: list[int] = []

    def infer(self, feed, shape, deadline=None):
        self.rows.append(int((feed["attention_mask"].sum(axis=1) > 0).sum()))
        self.shapes.append(shape)
        return super().infer(feed, shape, deadline)


@pytest.fixture
def reranker_for(tiny_model):
    """Rerankers over a fake engine, closed (their gates opened first) after the test."""
    made = []

    def make(engine, batch_size=8, round_pairs=64, pad_multiple=8):
        made.append(Reranker(fake_head(tiny_model.path / "tokenizer.json", 64), engine, batch_size,
                             round_pairs=round_pairs, pad_multiple=pad_multiple))
        return made[-1]

    yield make
    for reranker in made:
        close_reranker(reranker)


def count_submissions(reranker) -> threading.Semaphore:
    """A semaphore released each time a request reaches the reranker's batcher."""
    submitted = threading.Semaphore(0)
    submit = reranker.batcher.submit

    def counted(*args, **kwargs):
        job = submit(*args, **kwargs)
        submitted.release()
        return job

    reranker.batcher.submit = counted
    return submitted


def run_all(reranker, first, then=(), engine=None):
    """Score each (query, texts) on its own thread; returns [(ScoredPairs, time.perf_counter() at its end)] in the
    order given, `first` then `then`. With a gated `engine`: the `first` requests are sent, the test waits until
    one of their batches is on the device (held there), sends `then`, waits until every one of those has reached
    the batcher, and only then opens the gate."""
    requests = [*first, *then]
    results = [None] * len(requests)
    submitted = count_submissions(reranker)

    def one(i, query, texts):
        results[i] = (reranker.score_pairs(query, texts), time.perf_counter())

    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads[:len(first)]:
        t.start()
    if engine is not None:
        engine.wait_entered()
    for t in threads[len(first):]:
        t.start()
    for n in range(len(requests)):
        assert submitted.acquire(timeout=10), f"only {n} of {len(requests)} requests reached the batcher"
    if engine is not None:
        engine.release()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_small_requests_share_batches(reranker_for):
    engine = RecordingEngine()
    reranker = reranker_for(engine)
    # the first request occupies the device; six 2-document requests arrive meanwhile
    results = run_all(reranker, [("first", ["a"])], [(f"q{i}", ["solar power", "the cat"]) for i in range(6)],
                      engine)
    assert all(r is not None for r in results)
    assert max(engine.rows) == 8  # 12 waiting pairs went out as 8 + 4, not as six batches of 2
    assert len(engine.rows) <= 3


def test_scores_land_with_their_own_request(reranker_for):
    engine = RecordingEngine()
    reranker = reranker_for(engine)
    texts = {f"q{i}": ["solar power " * (i + 1), "cat", "bread " * (3 * i + 1)] for i in range(5)}
    # q0 occupies the device while the other four pile up and share batches
    items = list(texts.items())
    results = run_all(reranker, items[:1], items[1:], engine)
    for (q, t), (scored, _) in zip(texts.items(), results, strict=True):
        # FakeEngine's logit is the row's token count / 10: recompute it from this request's own encoding
        enc = reranker.head.encode(q, t)
        assert np.allclose(scored.scores, logits_to_scores(enc.lengths[:, None] / 10))


def test_a_small_request_is_not_stuck_behind_a_large_one(reranker_for):
    # after the held first batch, 0.1 s a batch: the large request's later rounds take far longer than the
    # small request's thread needs to record its end
    engine = RecordingEngine(delay_s=0.1)
    reranker = reranker_for(engine, batch_size=8, round_pairs=16)
    large_texts = [f"solar power and wind {i}" for i in range(96)]  # distinct: identical pairs may be scored once
    results = run_all(reranker, [("large", large_texts)], [("small", ["cat", "dog"])], engine)
    (large, large_done), (small, small_done) = results
    assert small_done < large_done  # round-robin: the small one got the next round
    assert large.scores.shape == (96,) and small.scores.shape == (2,)


def test_static_buckets_are_filled_across_requests(reranker_for):
    buckets = (ShapeBucket(8, 32), ShapeBucket(8, 64))
    engine = RecordingEngine(buckets=buckets)
    reranker = reranker_for(engine)
    run_all(reranker, [("first", ["a"])], [(f"q{i}", ["solar", "cat"]) for i in range(4)], engine)
    assert set(engine.shapes) <= set(buckets) and max(engine.rows) == 8


@pytest.mark.parametrize("buckets", [None, (ShapeBucket(4, 32), ShapeBucket(4, 128))])
def test_real_engine_scores_under_concurrency(tiny_model, buckets):
    # two infer requests on one stream: the batcher's two workers run batches at once (multi-stream compiles are
    # left to the parity guard, see test_parity.py)
    reranker = real_reranker(tiny_model, buckets, 128, batch_size=4, infer_requests=2)
    try:
        requests = [(f"{w} power", [f"{w} energy from the sun", "the cat", f"a {w} train on a bridge " * (k + 1)])
                    for k, w in enumerate(["solar", "wind", "water", "city", "rocket", "engine", "music", "ocean"])]
        results = run_all(reranker, requests)
        for (query, texts), (scored, _) in zip(requests, results, strict=True):
            assert abs(scored.scores - tiny_model.reference_scores(query, texts)).max() < SCORE_TOLERANCE
    finally:
        reranker.close()


def test_a_closed_batcher_refuses_new_work(reranker_for):
    reranker = reranker_for(FakeEngine())
    reranker.close()
    with pytest.raises(NotReadyError):
        reranker.score_pairs("q", ["a"])


def test_a_round_also_stops_at_its_token_budget(tiny_model):
    """Long pairs cost more device time: with a budget of 300 tokens a round takes three ~100-token pairs, so a
    small request that arrives meanwhile goes out in a following round, not after the whole large one."""
    engine = RecordingEngine()
    assert engine.num_requests == 1
    head = fake_head(tiny_model.path / "tokenizer.json", 128)
    reranker = Reranker(head, engine, 8)
    reranker.batcher.round_tokens = 300
    completed = []  # in the order the worker completed them (callbacks run on the worker thread)
    submit = reranker.batcher.submit

    def recording_submit(encoded, limits):
        job = submit(encoded, limits)
        name = "large" if len(encoded.lengths) > 1 else "small"
        job.future.add_done_callback(lambda _: completed.append(name))
        return job

    reranker.batcher.submit = recording_submit
    try:
        long_docs = [f"{i} " + "solar power and wind energy from the sun " * 12 for i in range(30)]
        assert all(n > 90 for n in head.encode("large", long_docs).lengths)
        large = threading.Thread(target=reranker.score_pairs, args=("large", long_docs))
        large.start()
        engine.wait_entered()  # the first round is on the device
        small = threading.Thread(target=reranker.score_pairs, args=("small", ["cat"]))
        small.start()
        # one worker, held at the gate: the owner waits for it, so the small request stays in the inbox
        wait_until(lambda: reranker.batcher._inbox.qsize() == 1, what="the small request reached the batcher")
        engine.gate.set()
        large.join(30)
        small.join(30)
        assert engine.rows[0] == 3  # 3 pairs of ~100 tokens reached the 300-token budget
        assert completed == ["small", "large"]  # the small one rode in an early round
    finally:
        reranker.close()


def waiting_job(lengths: list[int]) -> Job:
    ids = [np.zeros(n, dtype=np.int64) for n in lengths]
    return Job(EncodedPairs(ids, ids, np.array(lengths), np.zeros(len(lengths), bool)), WorkLimits(), 1)


def test_take_round_sends_the_rest_of_a_large_request_behind_the_others():
    large, small, later = waiting_job([10] * 6), waiting_job([10]), waiting_job([10, 10])
    waiting = deque([large, small, later])
    taken = take_round(waiting, max_pairs=4, max_tokens=1000)
    assert [(job, part) for job, part in taken] == [(large, [0, 1, 2, 3])]
    assert list(waiting) == [small, later, large]  # not reached: their places; the rest of the large one behind
    taken = take_round(waiting, max_pairs=4, max_tokens=1000)
    assert taken == [(small, [0]), (later, [0, 1]), (large, [4])]
    assert list(waiting) == [large] and large.todo == [5]
    assert take_round(waiting, 4, 1000) == [(large, [5])] and not waiting


def test_take_round_gives_each_request_its_longest_pairs_first():
    job = waiting_job([3, 9, 5])
    assert take_round(deque([job]), max_pairs=2, max_tokens=1000) == [(job, [1, 2])]


@pytest.mark.parametrize("pad_multiple", [1, 8, 32])
def test_dynamic_batches_are_padded_to_the_pad_multiple(reranker_for, pad_multiple):
    """--pad-multiple reaches the plan: each dynamic batch's length is its longest pair rounded up to the multiple
    (never beyond max_length, 64 here)."""
    engine = RecordingEngine()
    engine.gate.set()
    reranker = reranker_for(engine, batch_size=4, pad_multiple=pad_multiple)
    texts = ["paris " * n for n in (1, 3, 7, 12, 20, 30)]
    scored = reranker.score_pairs("capital of france", texts)
    ordered = sorted((int(n) for n in scored.lengths), reverse=True)
    longest = [ordered[0], ordered[4]]  # two batches of at most 4, longest pairs first
    assert [shape.length for shape in engine.shapes] == [min(-(-n // pad_multiple) * pad_multiple, 64)
                                                         for n in longest]
