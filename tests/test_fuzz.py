"""Property-based fuzzing of the real server: every body gets a JSON answer with a 2xx or 4xx status, and the server
keeps serving."""

import json

from conftest import http_bytes, request, send_raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FIELDS = ["query", "documents", "top_k", "top_n", "return_documents", "model", "timeout_ms", "rank_fields", "id",
          "text", "max_chunks_per_doc", "topk"]
texts = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "solar power", "\u0000", "\ud800 lone surrogate"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=False), texts)
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
@given(body=bodies, path=st.sampled_from(["/rerank", "/v1/rerank"]))
def test_json_bodies(cpu_server, body, path):
    payload = json.dumps(body, allow_nan=True).encode()
    assert_json_2xx_4xx(post_bytes(cpu_server.port, path, payload))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=raw_bytes, path=st.sampled_from(["/rerank", "/v1/rerank", "/healthz", "/x"]))
def test_raw_bytes(cpu_server, payload, path):
    assert_json_2xx_4xx(post_bytes(cpu_server.port, path, payload))


def test_server_still_serves_after_fuzzing(cpu_server):
    assert request(cpu_server.port, "POST", "/rerank", {"query": "q", "documents": ["a", "b"]})[0] == 200
