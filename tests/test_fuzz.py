"""Property-based fuzzing of the real server: every body gets a JSON answer with a 2xx or 4xx status, and the server
keeps serving."""

import http.client
import json

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


def exchange(port, path, payload: bytes, content_type="application/json"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=payload, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def assert_json_2xx_4xx(status, content_type, body):
    assert 200 <= status < 300 or 400 <= status < 500, (status, body[:300])
    assert content_type == "application/json"
    json.loads(body)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["/rerank", "/v1/rerank"]))
def test_json_bodies(cpu_server, body, path):
    payload = json.dumps(body, allow_nan=True).encode()
    assert_json_2xx_4xx(*exchange(cpu_server.port, path, payload))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=raw_bytes, path=st.sampled_from(["/rerank", "/v1/rerank", "/healthz", "/x"]))
def test_raw_bytes(cpu_server, payload, path):
    assert_json_2xx_4xx(*exchange(cpu_server.port, path, payload))


def test_server_still_serves_after_fuzzing(cpu_server):
    conn = http.client.HTTPConnection("127.0.0.1", cpu_server.port, timeout=30)
    conn.request("POST", "/rerank", body=json.dumps({"query": "q", "documents": ["a", "b"]}),
                 headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    conn.close()
