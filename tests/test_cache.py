"""The score cache: repeated pairs are answered with the same floats without tokenizing or batching, the key holds
everything a request can change, it is bounded, it can be bypassed, and /metrics counts it."""

import numpy as np
from conftest import FakeEngine, fake_head, request

from openvino_reranker.batcher import Reranker
from openvino_reranker.cache import ScoreCache
from openvino_reranker.encoding import Truncation


def test_lru_bounded_by_entries():
    cache = ScoreCache(2)
    keys = [ScoreCache.key(Truncation(), "q", t) for t in ("a", "b", "c")]
    cache.put(keys[0], (0.1, -2.0, 5, False))
    cache.put(keys[1], (0.2, -1.0, 5, False))
    assert cache.get(keys[0]) == (0.1, -2.0, 5, False)  # a is now the most recent
    cache.put(keys[2], (0.3, 0.0, 5, False))  # evicts b
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 1)


def test_the_key_holds_what_changes_a_score():
    base = ScoreCache.key(Truncation(), "q", "doc")
    assert base == ScoreCache.key(Truncation(), "q", "doc")
    others = [ScoreCache.key(Truncation("left"), "q", "doc"),
              ScoreCache.key(Truncation(max_document_tokens=5), "q", "doc"),
              ScoreCache.key(Truncation(), "q2", "doc"), ScoreCache.key(Truncation(), "q", "doc2"),
              ScoreCache.key(Truncation(), "q\x00d", "oc"), ScoreCache.key(Truncation(), "q", "d\x00oc"),
              ScoreCache.key(Truncation(), "q", "\ud800")]
    assert len({base, *others}) == 1 + len(others)


def test_repeated_pairs_skip_the_device_and_keep_their_floats(tiny_model):
    engine = FakeEngine()
    reranker = Reranker(fake_head(tiny_model.path / "tokenizer.json", 64), engine, 8, cache=ScoreCache(100))
    try:
        first = reranker.score_pairs("q", ["solar power", "the cat", "bread"])
        calls = engine.calls
        again = reranker.score_pairs("q", ["bread", "solar power", "the cat"])  # all hits, another order
        assert engine.calls == calls and again.batches == 0
        assert np.array_equal(again.scores, first.scores[[2, 0, 1]])  # the same floats, bit for bit
        assert np.array_equal(again.lengths, first.lengths[[2, 0, 1]])
        mixed = reranker.score_pairs("q", ["the cat", "a new document"])
        assert engine.calls == calls + 1 and mixed.scores[0] == first.scores[1]
        assert reranker.score_pairs("other query", ["the cat"]).batches == 1  # the query is part of the key
        bypassed = reranker.score_pairs("q", ["the cat"], use_cache=False)
        assert bypassed.batches == 1 and bypassed.scores[0] == first.scores[1]
    finally:
        reranker.close()


def test_metrics_count_hits_and_no_cache_bypasses(fake_server):
    from prometheus_client.parser import text_string_to_metric_families

    fake = fake_server().start(FakeEngine())
    from openvino_reranker.cache import ScoreCache as Cache

    fake.service.reranker.cache = Cache(100)
    body = {"query": "q", "documents": ["solar power", "the cat"]}
    assert request(fake.port, "POST", "/rerank", body)[0] == 200
    assert request(fake.port, "POST", "/v1/rerank", body)[0] == 200  # the same pairs on another dialect
    assert request(fake.port, "POST", "/rerank", body, {"Cache-Control": "no-cache"})[0] == 200
    text = request(fake.port, "GET", "/metrics")[1]
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["openvino_reranker_score_cache_hits_total"] == 2
    assert samples["openvino_reranker_score_cache_misses_total"] == 2
    assert samples["openvino_reranker_score_cache_entries"] == 2


def test_size_0_disables_it(tiny_model, tmp_path):
    from conftest import F32, RunningServer

    with RunningServer(["--device", "CPU", *F32, "--model-dir", str(tiny_model.path), "--cache-dir", "",
                        "--score-cache-size", "0"]).wait_ready() as srv:
        request(srv.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})
        assert "score_cache" not in request(srv.port, "GET", "/metrics")[1]
