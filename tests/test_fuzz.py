"""Property-based fuzzing of the real server: every body gets a JSON answer with a 2xx or 4xx status, and the server
keeps serving."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.http import http_bytes, request, send_raw

FIELDS = ["query", "documents", "top_k", "top_n", "return_documents", "model", "timeout_ms", "rank_fields", "id",
          "text", "max_chunks_per_doc", "topk", "texts", "max_tokens_per_doc", "raw_scores", "truncate",
          "truncation_direction", "passage", "\ud800", "\udfff key"]
texts = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "solar power", "\u0000", "\ud800 lone surrogate"]))
# integers beyond 2**63 and far beyond (10**400 is a valid JSON number), next to the ordinary ones
integers = st.one_of(st.integers(-3, 2**40), st.integers(2**62, 2**70), st.sampled_from([10**19, 10**400, -(2**63)]))
scalars = st.one_of(st.none(), st.booleans(), integers, st.floats(allow_nan=False), texts)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4)),
                      max_leaves=12)
documents = st.lists(st.one_of(texts, st.fixed_dictionaries({"text": texts},
                                                                            optional={"id": scalars})), max_size=6)
bodies = st.one_of(
    values,
    st.fixed_dictionaries({"query": texts, "documents": documents},
                          optional={k: scalars for k in ("top_k", "return_documents", "timeout_ms")}),
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=5),
)
raw_bytes = st.binary(max_size=200)


def post_bytes(port, path, payload: bytes):
    return send_raw(port, http_bytes("POST", path, payload, {"Content-Type": "application/json"}))


def assert_json_2xx_4xx(resp):
    status, content_type, body = resp.status, resp.headers.get("content-type"), resp.body
    assert 200 <= status < 300 or 400 <= status < 500, (status, body[:300])
    assert content_type == "application/json"
    json.loads(body)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["/rerank", "/v1/rerank", "/v2/rerank", "/api/v1/rerank"]))
def test_json_bodies(cpu_server, body, path):
    payload = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    assert_json_2xx_4xx(post_bytes(cpu_server.port, path, payload))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=raw_bytes, path=st.sampled_from(["/rerank", "/v1/rerank", "/healthz", "/x"]))
def test_raw_bytes(cpu_server, payload, path):
    assert_json_2xx_4xx(post_bytes(cpu_server.port, path, payload))


def still_scores(port):
    """The wedge check: a normal request is still scored, well within its own deadline."""
    status, body, _ = request(port, "POST", "/rerank", {"query": "q", "documents": ["a", "b"], "timeout_ms": 10000})
    assert status == 200 and len(body["results"]) == 2


# digits that str.isdigit() or int() accept but HTTP does not, and other look-alikes
ODD_NUMBERS = st.sampled_from(["\u00b2", "\u00b9\u00b2", "\u0661\u0662", "\uff11", "\x1c31\x1c", "1_0", "+5", "5 5",
                               "9" * 40, " 12", "12\u00a0", "0x10", "-1", ""])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=ODD_NUMBERS, header=st.sampled_from(["Content-Length", "X-Request-Timeout-Ms"]),
       path=st.sampled_from(["/rerank", "/v1/rerank", "/v2/rerank", "/healthz"]))
def test_non_ascii_digits_in_headers_get_json_4xx(cpu_server, value, header, path):
    body = b'{"query":"q","documents":["a"]}'
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
    head.append(f"{header}: {value}" if header == "Content-Length" else f"Content-Length: {len(body)}")
    if header != "Content-Length":
        head.append(f"{header}: {value}")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + body
    resp = send_raw(cpu_server.port, raw)
    assert 400 <= resp.status < 500 or (path == "/healthz" and resp.status == 405) or \
        (header == "X-Request-Timeout-Ms" and value.strip() == "12" and resp.status == 200), (value, resp.status)
    json.loads(resp.body)
    still_scores(cpu_server.port)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(1, 200_000), opener=st.sampled_from([b"[", b'{"a":', b'{"query":[']))
def test_any_nesting_depth_is_a_json_answer(cpu_server, depth, opener):
    resp = post_bytes(cpu_server.port, "/rerank", opener * depth)
    assert resp.status in (400, 413) and json.loads(resp.body)
    still_scores(cpu_server.port)


def test_server_still_serves_after_fuzzing(cpu_server):
    still_scores(cpu_server.port)
