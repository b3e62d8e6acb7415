"""The score cache: repeated pairs are answered with the same floats without tokenizing or batching, the key holds
everything a request can change, it is bounded, it can be bypassed, and /metrics counts it."""

import numpy as np
from support.engines import FakeEngine, fake_head
from support.http import request

from openvino_reranker.cache import ScoreCache
from openvino_reranker.reranker import Reranker
from openvino_reranker.scoring import Truncation


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
    from support.models import F32
    from support.servers import RunningServer

    with RunningServer(["--device", "CPU", *F32, "--model-dir", str(tiny_model.path), "--cache-dir", "",
                        "--score-cache-size", "0"]).wait_ready() as srv:
        request(srv.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})
        assert "score_cache" not in request(srv.port, "GET", "/metrics")[1]


# ---- a cached answer is the answer: every option, every dialect (issue 16, items 2 and 4)

LONG = " ".join(["solar power is energy from the sun turned into electricity"] * 40)  # over max_length 128
Q = "solar power"
VOLATILE = {"timings_ms", "npu_busy_delta_us", "id", "request_id"}


def stable(body):
    """A body without what differs between two identical requests (timings, request ids)."""
    if isinstance(body, dict):
        return {k: stable(v) for k, v in body.items() if k not in VOLATILE}
    if isinstance(body, list):
        return [stable(v) for v in body]
    return body


# (route, body): each request option that can change an answer, on the dialects that take it
OPTION_REQUESTS = [
    ("/rerank", {"query": Q, "texts": ["short", LONG], "truncate": False}),  # TEI: 413 for texts[1]
    ("/rerank", {"query": Q, "texts": [LONG, "short"], "truncate": True}),
    ("/rerank", {"query": Q, "texts": [LONG, "short"], "truncation_direction": "left"}),
    ("/rerank", {"query": Q, "texts": [LONG], "truncation_direction": "left", "truncate": False}),
    ("/rerank", {"query": Q, "texts": [LONG, "short"], "raw_scores": True, "return_text": True}),
    ("/rerank", {"query": Q, "documents": [LONG, "short"]}),
    ("/rerank", {"query": Q, "documents": [LONG, "short"], "max_chunks_per_doc": 3}),
    ("/rerank", {"query": Q, "documents": [LONG, "short"], "top_k": 1, "return_documents": True}),
    ("/rerank", {"query": Q, "documents": [LONG] * 30}),  # over max_total_tokens only by counting each copy
    ("/rerank", {"model": "m", "query": Q, "documents": [LONG, "short"], "top_n": 1}),  # infinity / vLLM
    ("/v1/rerank", {"query": Q, "documents": [LONG, "short"], "max_tokens_per_doc": 5}),
    ("/v1/rerank", {"query": Q, "documents": [LONG, "short"], "max_chunks_per_doc": 2, "top_n": 1}),
    ("/v2/rerank", {"model": "m", "query": Q, "documents": [LONG, "short"], "max_tokens_per_doc": 7}),
    ("/v2/rerank", {"model": "m", "query": Q, "documents": [LONG] * 30}),
]


def test_a_cached_answer_is_the_answer_the_request_gets_without_the_cache(tiny_model):
    """For each request: its answer with the cache bypassed, then after an ordinary request scored the same pairs,
    then after itself was answered from the cache, are the same status and the same body (timings and ids aside)."""
    from support.models import F32
    from support.servers import RunningServer

    # one compile: with replicas, how a round's pairs are shared out depends on how many the cache left, so the
    # f32 padding of a batch (and the last bits of a score) could differ between the compared answers
    with RunningServer(["--device", "CPU", *F32, "--model-dir", str(tiny_model.path), "--cache-dir", "",
                        "--max-length", "128", "--max-total-tokens", "2000", "--replicas", "1"]).wait_ready() as srv:
        for route, body in OPTION_REQUESTS:
            uncached = request(srv.port, "POST", route, body, {"Cache-Control": "no-cache"})
            docs = body.get("documents") or body.get("texts")
            ordinary = request(srv.port, "POST", "/rerank", {"query": Q, "documents": docs[:2]})
            assert ordinary[0] == 200
            for attempt in range(2):
                cached = request(srv.port, "POST", route, body)
                assert (cached[0], stable(cached[1])) == (uncached[0], stable(uncached[1])), (route, body, attempt)
        assert {s for s in (request(srv.port, "POST", r, b, {"Cache-Control": "no-cache"})[0]
                            for r, b in OPTION_REQUESTS)} == {200, 413}  # both kinds of answer were compared


def test_the_token_limit_counts_what_usage_reports(tiny_model, fake_server):
    """max_total_tokens, usage and tokens_scored_total count the same thing: every document's tokens after
    truncation, duplicates and cache hits included."""
    from prometheus_client.parser import text_string_to_metric_families

    from openvino_reranker.cache import ScoreCache as Cache

    fake = fake_server("--max-total-tokens", "100").start(FakeEngine())
    fake.service.reranker.cache = Cache(100)
    one = request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["solar power is energy"]})
    per_copy = one[1]["usage"]["tokens"]
    fits = 100 // per_copy
    status, body, _ = request(fake.port, "POST", "/rerank",
                              {"query": "q", "documents": ["solar power is energy"] * fits})
    assert status == 200 and body["usage"]["tokens"] == fits * per_copy <= 100
    status, body, _ = request(fake.port, "POST", "/rerank",
                              {"query": "q", "documents": ["solar power is energy"] * (fits + 1)})
    assert status == 413 and "max_total_tokens" in body["error"]["message"]
    text = request(fake.port, "GET", "/metrics")[1]
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["openvino_reranker_tokens_scored_total"] == per_copy + fits * per_copy
