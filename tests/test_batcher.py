"""Cross-request batching: pairs of concurrent requests share micro-batches, large requests do not starve small
ones, and scores stay right under concurrency (real engine, dynamic and static shapes)."""

import threading
import time

import numpy as np
import pytest
from conftest import SCORE_TOLERANCE, FakeEngine, fake_head, real_reranker

from openvino_reranker.batcher import Reranker
from openvino_reranker.config import ShapeBucket
from openvino_reranker.errors import NotReadyError
from openvino_reranker.scoring import logits_to_scores


class RecordingEngine(FakeEngine):
    """Slow enough that requests pile up; records each batch's real rows."""

    def __init__(self, delay_s=0.15, buckets=None):
        super().__init__("slow", delay_s)
        self.buckets = buckets
        self.rows: list[int] = []
        self.shapes: list = []
        self.order: list[int] = []

    def infer(self, feed, shape, deadline=None):
        self.rows.append(int((feed["attention_mask"].sum(axis=1) > 0).sum()))
        self.shapes.append(shape)
        return super().infer(feed, shape, deadline)


def reranker_for(engine, tiny_model, batch_size=8, round_pairs=64):
    return Reranker(fake_head(tiny_model.path / "tokenizer.json", 64), engine, batch_size, round_pairs=round_pairs)


def run_all(reranker, requests):
    results = [None] * len(requests)

    def one(i, query, texts, delay):
        time.sleep(delay)
        results[i] = (reranker.score_pairs(query, texts), time.perf_counter())

    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_small_requests_share_batches(tiny_model):
    engine = RecordingEngine()
    reranker = reranker_for(engine, tiny_model)
    # the first request occupies the device; six 2-document requests arrive meanwhile
    requests = [("first", ["a"], 0.0)] + [(f"q{i}", ["solar power", "the cat"], 0.05) for i in range(6)]
    results = run_all(reranker, requests)
    assert all(r is not None for r in results)
    assert max(engine.rows) == 8  # 12 waiting pairs went out as 8 + 4, not as six batches of 2
    assert len(engine.rows) <= 3
    reranker.close()


def test_scores_land_with_their_own_request(tiny_model):
    engine = RecordingEngine(delay_s=0.05)
    reranker = reranker_for(engine, tiny_model)
    texts = {f"q{i}": ["solar power " * (i + 1), "cat", "bread " * (3 * i + 1)] for i in range(5)}
    results = run_all(reranker, [(q, t, 0.0) for q, t in texts.items()])
    for (q, t), (scored, _) in zip(texts.items(), results, strict=True):
        # FakeEngine's logit is the row's token count / 10: recompute it from this request's own encoding
        enc = reranker.head.encode(q, t)
        assert np.allclose(scored.scores, logits_to_scores(enc.lengths[:, None] / 10))
    reranker.close()


def test_a_small_request_is_not_stuck_behind_a_large_one(tiny_model):
    engine = RecordingEngine(delay_s=0.1)
    reranker = reranker_for(engine, tiny_model, batch_size=8, round_pairs=16)
    results = run_all(reranker, [("large", ["solar power and wind"] * 96, 0.0), ("small", ["cat", "dog"], 0.05)])
    (large, large_done), (small, small_done) = results
    assert small_done < large_done  # round-robin: the small one got the next round
    assert large.scores.shape == (96,) and small.scores.shape == (2,)
    reranker.close()


def test_static_buckets_are_filled_across_requests(tiny_model):
    buckets = (ShapeBucket(8, 32), ShapeBucket(8, 64))
    engine = RecordingEngine(buckets=buckets)
    reranker = reranker_for(engine, tiny_model)
    run_all(reranker, [("first", ["a"], 0.0)] + [(f"q{i}", ["solar", "cat"], 0.05) for i in range(4)])
    assert set(engine.shapes) <= set(buckets) and max(engine.rows) == 8
    reranker.close()


@pytest.mark.parametrize("buckets", [None, (ShapeBucket(4, 32), ShapeBucket(4, 128))])
def test_real_engine_scores_under_concurrency(tiny_model, buckets):
    # two infer requests on one stream: the batcher's two workers run batches at once (multi-stream compiles are
    # left to the parity guard, see test_parity.py)
    reranker = real_reranker(tiny_model, buckets, 128, batch_size=4, infer_requests=2)
    requests = [(f"{w} power", [f"{w} energy from the sun", "the cat", f"a {w} train on a bridge " * (k + 1)], 0.0)
                for k, w in enumerate(["solar", "wind", "water", "city", "rocket", "engine", "music", "ocean"])]
    results = run_all(reranker, requests)
    for (query, texts, _), (scored, _) in zip(requests, results, strict=True):
        assert abs(scored.scores - tiny_model.reference_scores(query, texts)).max() < SCORE_TOLERANCE
    reranker.close()


def test_a_closed_batcher_refuses_new_work(tiny_model):
    reranker = reranker_for(FakeEngine(), tiny_model)
    reranker.close()
    with pytest.raises(NotReadyError):
        reranker.score_pairs("q", ["a"])
