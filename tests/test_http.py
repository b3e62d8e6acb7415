"""The real server on a loopback port: both routes against the numpy reference, and every error status."""

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from support.engines import FakeEngine
from support.http import request, send_raw
from support.models import SCORE_TOLERANCE

from openvino_reranker.config import load_config
from openvino_reranker.cpu import apply_tuning, read_cpu

QUERY = "how to boil water at sea level"
DOCS = [
    "water boils at one hundred degrees celsius at sea level",
    "the museum in paris has art from the history of france",
    "boil the water, then add salt and the pasta",
    "solar power is energy from the sun",
    "how much pressure does a high mountain have, and at what temperature does water boil there",
]


# ---------------------------------------------------------------------------------------------- success paths


def test_healthz_and_readyz(cpu_server, tiny_model):
    assert request(cpu_server.port, "GET", "/healthz")[:2][0] == 200
    status, body, _ = request(cpu_server.port, "GET", "/readyz?verbose=1")
    assert status == 200 and body["ready"] is True
    assert body["device"] == "CPU" and body["execution_devices"] == ["CPU"]
    assert body["model_dir"] == str(tiny_model.path) and body["model"] == "tiny-cross-encoder"
    assert body["max_length"] == 128 and body["shape_mode"] == "dynamic" and body["buckets"] is None
    assert body["startup_check"]["npu_busy_delta_us"] is None and "CPU" in body["startup_check"]["npu_note"]
    assert set(body["versions"]) >= {"openvino", "tokenizers", "server"}
    # the micro-batch defaults this CPU's row of cpu.TUNED gives (the fixture sets none of them)
    config, tuned = apply_tuning(load_config(["--device", "CPU"], {}), read_cpu())
    assert body["tuning"] == tuned.describe() and set(body["tuning"]["chosen"]) == {
        "batch_size", "pad_multiple", "performance_hint", "replicas"}
    # the tiny model's weights are INT8 weight-only, which the CPU row's replicas leave to one compile, saying so
    assert body["compile"]["replicas"] == 1 and body["compile"]["loaded_from_cache"] == [False]
    assert (body["compile"]["replicas_note"] is None) == (config.replicas == 1)
    assert (body["batch_size"], body["pad_multiple"]) == (config.batch_size, config.pad_multiple)
    assert body["compile"]["properties"]["PERFORMANCE_HINT"] == config.performance_hint.upper()


def test_native_rerank_matches_the_reference(cpu_server, tiny_model):
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)]
    status, body, resp = request(cpu_server.port, "POST", "/rerank",
                                 {"query": QUERY, "documents": docs, "return_documents": True})
    assert status == 200 and body["ok"] is True and resp.getheader("Content-Type") == "application/json"
    expected = tiny_model.reference_scores(QUERY, DOCS)
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    for r in results:
        assert r["id"] == f"d{r['index']}" and r["text"] == DOCS[r["index"]]
        assert abs(r["score"] - expected[r["index"]]) < SCORE_TOLERANCE
        assert r["truncated"] is False
    assert [r["index"] for r in results] == list(np.argsort(-expected, kind="stable"))
    assert body["model"] == "tiny-cross-encoder" and body["device"] == "CPU" and body["npu_busy_delta_us"] is None
    assert body["usage"]["documents"] == 5 and body["usage"]["tokens"] > 5 * 5
    assert set(body["timings_ms"]) == {"tokenize", "infer", "total"}


def test_native_top_k_and_plain_strings(cpu_server):
    status, body, _ = request(cpu_server.port, "POST", "/rerank", {"query": QUERY, "documents": DOCS, "top_k": 2})
    assert status == 200 and len(body["results"]) == 2
    assert all("id" not in r and "text" not in r for r in body["results"])
    full = request(cpu_server.port, "POST", "/rerank", {"query": QUERY, "documents": DOCS, "top_k": 50})[1]
    assert len(full["results"]) == 5 and full["results"][:2] == body["results"]


def test_ties_keep_input_order(cpu_server):
    docs = ["solar power", "cat", "solar power", "solar power"]
    body = request(cpu_server.port, "POST", "/rerank", {"query": "sun", "documents": docs})[1]
    same = [r["index"] for r in body["results"] if r["index"] != 1]
    assert same == [0, 2, 3]
    assert len({r["score"] for r in body["results"] if r["index"] != 1}) == 1


def test_cohere_route(cpu_server, tiny_model):
    status, body, resp = request(cpu_server.port, "POST", "/v1/rerank",
                                 {"model": "anything", "query": QUERY, "documents": DOCS, "top_n": 3},
                                 headers={"X-Request-ID": "abc-123"})
    assert status == 200 and set(body) == {"id", "results", "meta", "model", "usage"}  # Jina's two as well
    assert body["id"] == "abc-123" and resp.getheader("X-Request-ID") == "abc-123"
    assert len(body["results"]) == 3
    expected = tiny_model.reference_scores(QUERY, DOCS)
    for r in body["results"]:
        assert set(r) == {"index", "relevance_score"}  # no `document` key at all when not asked
        assert abs(r["relevance_score"] - expected[r["index"]]) < SCORE_TOLERANCE
    assert body["meta"]["tokens"]["input_tokens"] > 0


def test_cohere_return_documents_echoes_the_objects(cpu_server):
    docs = ["solar power", {"text": "cat", "title": "pets"}]
    body = request(cpu_server.port, "POST", "/v1/rerank",
                   {"query": "sun", "documents": docs, "return_documents": True})[1]
    by_index = {r["index"]: r["document"] for r in body["results"]}
    assert by_index == {0: {"text": "solar power"}, 1: {"text": "cat", "title": "pets"}}


def test_concurrent_requests_all_match_the_reference(cpu_server, tiny_model):
    queries = ["boil water", "solar power energy", "capital of france", "how does a train engine work"] * 3
    expected = {q: tiny_model.reference_scores(q, DOCS) for q in set(queries)}

    def one(q):
        body = request(cpu_server.port, "POST", "/rerank", {"query": q, "documents": DOCS})[1]
        return q, {r["index"]: r["score"] for r in body["results"]}

    with ThreadPoolExecutor(6) as pool:
        for q, got in pool.map(one, queries):
            assert max(abs(got[i] - expected[q][i]) for i in range(len(DOCS))) < SCORE_TOLERANCE


def test_keep_alive_survives_errors(cpu_server):
    conn = http.client.HTTPConnection("127.0.0.1", cpu_server.port, timeout=10)
    try:
        assert request(cpu_server.port, "POST", "/rerank", {"query": ""}, conn=conn)[0] == 400
        assert request(cpu_server.port, "GET", "/nowhere", conn=conn)[0] == 404
        status, body, resp = request(cpu_server.port, "POST", "/rerank", {"query": "q", "documents": ["a"]}, conn=conn)
        assert status == 200 and resp.getheader("Connection") is None
        sock = conn.sock
        assert request(cpu_server.port, "GET", "/healthz", conn=conn)[0] == 200 and conn.sock is sock
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- errors

ERROR_CASES = [
    # (id, method, path, body bytes or obj, headers, status, error_type, field)
    ("bad_json", "POST", "/rerank", b'{"query": ', {"Content-Type": "application/json"}, 400, "invalid_request", None),
    ("bad_utf8", "POST", "/rerank", b'{"query": "\xff"}', {"Content-Type": "application/json"}, 400,
     "invalid_request", None),
    ("nan", "POST", "/rerank", b'{"query": "q", "documents": ["a"], "top_k": NaN}',
     {"Content-Type": "application/json"}, 400, "invalid_request", None),
    ("not_object", "POST", "/rerank", 12, {}, 400, "invalid_request", None),
    ("field_path", "POST", "/rerank", {"query": "q", "documents": ["a", {"text": 3}]}, {}, 400, "invalid_request",
     "documents[1].text"),
    ("cohere_unsupported", "POST", "/v1/rerank", {"query": "q", "documents": ["a"], "rank_fields": ["x"]}, {}, 400,
     "invalid_request", "rank_fields"),
    ("not_found", "GET", "/v3/rerank", None, {}, 404, "not_found", None),
    ("method", "GET", "/rerank", None, {}, 405, "method_not_allowed", None),
    ("method_post", "POST", "/healthz", {}, {}, 405, "method_not_allowed", None),
    ("media_type", "POST", "/rerank", b'{"query": "q", "documents": ["a"]}', {"Content-Type": "text/plain"}, 415,
     "unsupported_media_type", None),
    ("no_media_type", "POST", "/v1/rerank", b'{"query": "q", "documents": ["a"]}', {}, 415,
     "unsupported_media_type", None),
    ("too_many_documents", "POST", "/rerank", {"query": "q", "documents": ["a"] * 1001}, {}, 413, "too_large",
     "documents"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_statuses(cpu_server, case):
    _, method, path, body, headers, status, error_type, field = case
    got, payload, resp = request(cpu_server.port, method, path, body, headers)
    assert got == status
    if path == "/v1/rerank":
        assert payload["type"] == error_type and payload["field"] == field and payload["message"]
    else:
        assert payload["ok"] is False and payload["error"]["type"] == error_type
        assert payload["error"]["field"] == field and payload["error"]["message"]
    if status == 405:
        assert resp.getheader("Allow") in ("POST", "GET")


def test_missing_content_length_is_411(cpu_server):
    resp = send_raw(cpu_server.port, b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
    status, body, headers = resp.status, resp.json(), resp.headers
    assert status == 411 and body["error"]["type"] == "length_required" and headers["connection"] == "close"


def test_chunked_body_is_411(cpu_server):
    resp = send_raw(cpu_server.port, b"POST /rerank HTTP/1.1\r\nHost: x\r\n"
                    b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
                    b"2\r\n{}\r\n0\r\n\r\n")
    status, body = resp.status, resp.json()
    assert status == 411 and "chunked" in body["error"]["message"]


def test_oversized_body_is_413_before_it_is_read(cpu_server):
    resp = send_raw(cpu_server.port, b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Length: "
                    b"50000000\r\nContent-Type: application/json\r\n\r\n{")
    status, body, headers = resp.status, resp.json(), resp.headers
    assert status == 413 and body["error"]["type"] == "too_large" and headers["connection"] == "close"
    assert "limit (max_body_bytes) is 2097152" in body["error"]["message"]


def test_malformed_request_line_gets_json(cpu_server):
    resp = send_raw(cpu_server.port, b"NONSENSE\r\n\r\n")
    status, body, headers = resp.status, resp.json(), resp.headers
    assert status == 400 and body["ok"] is False and body["error"]["type"] == "http_error"
    assert headers["content-type"] == "application/json"


def test_unknown_method_is_json(cpu_server):
    resp = send_raw(cpu_server.port, b"BREW /rerank HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body = resp.status, resp.json()
    assert status == 501 and body["error"]["type"] == "http_error"


def test_head_has_no_body(cpu_server):
    conn = http.client.HTTPConnection("127.0.0.1", cpu_server.port, timeout=10)
    conn.request("HEAD", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 405 and resp.read() == b"" and resp.getheader("Allow") == "GET"
    conn.close()


# ---------------------------------------------------------------------------------------------- engine faults


def test_not_ready_is_503_with_retry_after(fake_server):
    fake = fake_server()
    fake.service.readiness.reason = "compiling the model"
    status, body, resp = request(fake.port, "GET", "/readyz")
    assert status == 503 and body["ready"] is False and body["reason"] == "compiling the model"
    assert resp.getheader("Retry-After") == "1"
    assert request(fake.port, "GET", "/healthz")[0] == 200
    status, body, resp = request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})
    assert status == 503 and body["error"]["type"] == "not_ready" and resp.getheader("Retry-After") == "1"


@pytest.mark.parametrize("mode, error_type, needle", [
    ("nan", "inference_failed", "non-finite"),
    ("fails", "inference_failed", "device lost"),
    ("bug", "internal", "server log"),
])
def test_inference_faults_are_json_500(fake_server, mode, error_type, needle):
    fake = fake_server().start(FakeEngine(mode))
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    for path in ("/rerank", "/v1/rerank"):
        status, body, _ = request(fake.port, "POST", path, {"query": "q", "documents": ["a", "b"]}, conn=conn)
        assert status == 500
        err = body["error"] if path == "/rerank" else body
        assert err["type"] == error_type and needle in (err.get("message") or "")
        assert "Traceback" not in json.dumps(body)
    assert request(fake.port, "GET", "/healthz", conn=conn)[0] == 200  # same connection, still serving
    conn.close()
