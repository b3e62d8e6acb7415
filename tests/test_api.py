"""The wire: the dialect table and the routes derived from it, JSON decoding and encoding, the bounded timeout
parser, and the error shapes per dialect."""

import json

import pytest
from support.engines import FakeEngine
from support.http import request

from openvino_reranker.api import RequestLimits, decode_json, encode_json, parse_native
from openvino_reranker.config import TIMEOUT_MS, IntRange, load_config
from openvino_reranker.dialects import COHERE, DIALECTS, NATIVE, Dialect, dialect_for
from openvino_reranker.errors import BadRequestError, OverloadedError
from openvino_reranker.httpserver import ROUTES, build_routes, route_label

LIMITS = RequestLimits.from_config(load_config([], {}))


# ---------------------------------------------------------------------------------------------- the dialect table


def test_routes_come_from_the_dialect_table():
    for dialect in DIALECTS:
        for path in dialect.paths:
            route = ROUTES[path]
            assert (route.method, route.handler, route.needs_key) == ("POST", "route_score", dialect.needs_key)
            assert dialect in route.dialects and route.dialect is route.dialects[-1]
    assert [d.name for d in ROUTES["/rerank"].dialects] == ["tei", "pairs", "infinity", "native"]
    assert dialect_for(ROUTES["/rerank"].dialects, {"model": None, "query": "q", "documents": ["a"]}).name == \
        "infinity"
    assert dialect_for(ROUTES["/rerank"].dialects, {"query": "q", "texts": ["a"], "top_n": 1}).name == "tei"
    assert dialect_for(ROUTES["/rerank"].dialects, {"query": "q", "texts": ["a"]}).name == "tei"
    assert dialect_for(ROUTES["/rerank"].dialects, [{"query": "q", "passage": "a"}]).name == "pairs"
    assert dialect_for(ROUTES["/rerank"].dialects, {"query": "q", "documents": ["a"]}).name == "native"
    assert dialect_for(ROUTES["/rerank"].dialects, "junk").name == "native"
    assert {p for p, r in ROUTES.items() if r.method == "GET"} == {"/healthz", "/readyz", "/metrics"}
    assert {p for p, r in ROUTES.items() if r.needs_key} == {"/metrics", *(p for d in DIALECTS for p in d.paths)}


def test_adding_a_dialect_is_one_entry():
    extra = Dialect("extra", ("/x/rerank", "/x/v2/rerank"), parse_native, NATIVE.render, COHERE.render_error,
                    needs_key=False)
    routes = build_routes((*DIALECTS, extra))
    assert routes["/x/rerank"].dialects == (extra,) and routes["/x/v2/rerank"].dialect is extra
    assert routes["/x/rerank"].needs_key is False and set(routes) == set(ROUTES) | {"/x/rerank", "/x/v2/rerank"}
    with pytest.raises(ValueError, match="/rerank needs exactly one default dialect"):
        build_routes((*DIALECTS, Dialect("dup", ("/rerank",), parse_native, NATIVE.render, NATIVE.render_error)))
    with pytest.raises(ValueError, match="/healthz is not a scoring route"):
        build_routes((*DIALECTS, Dialect("probe", ("/healthz",), parse_native, NATIVE.render, NATIVE.render_error)))


def test_route_labels_never_carry_a_client_path():
    assert route_label("/rerank") == "/rerank" and route_label("/v1/rerank") == "/v1/rerank"
    assert route_label("/etc/passwd") == "other" and route_label("/rerank/") == "other"


def test_error_shapes_per_dialect():
    error = OverloadedError("busy", headers={"Retry-After": "1"})
    assert NATIVE.render_error(error) == {"ok": False, "error": {"type": "overloaded", "message": "busy",
                                                                 "field": None}}
    assert COHERE.render_error(BadRequestError("no", "query")) == {"message": "no", "type": "invalid_request",
                                                                   "field": "query"}


# ---------------------------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("raw, needle", [
    (b'{"query": NaN}', "NaN is not allowed"),
    (b'{"query": 1e999}', "out of range"),
    (b'[' * 100_000, "nested too deeply"),
    (b'{"a":' * 50_000, "nested too deeply"),
    (b'\xff', "not valid UTF-8"),
    (b'{"n": ' + b'9' * 5000 + b'}', "not valid JSON"),
])
def test_bodies_that_are_400(raw, needle):
    with pytest.raises(BadRequestError, match=needle):
        decode_json(raw)


def test_an_echoed_lone_surrogate_is_written_as_its_escape():
    body = encode_json({"document": {"text": "a\ud800b"}, "n": 1})
    assert json.loads(body) == {"document": {"text": "a\ud800b"}, "n": 1}
    assert b"\\ud800" in body


# ---------------------------------------------------------------------------------------------- bounded integers


@pytest.mark.parametrize("text, value", [("1", 1), (" 30000\t", 30000), ("3600000", 3600000)])
def test_int_range_parses_ascii_digits(text, value):
    assert TIMEOUT_MS.parse_text(text) == value


@pytest.mark.parametrize("text", ["0", "3600001", "\u00b2", "\u00b9\u00b2", "\u0661", "1_000", "+5", "", "5 5",
                                  "\x1c31\x1c", "1e3", "9" * 30])
def test_int_range_refuses_everything_else(text):
    with pytest.raises(ValueError):
        TIMEOUT_MS.parse_text(text)


def test_int_range_messages():
    with pytest.raises(ValueError, match="is outside 1..10"):
        IntRange(1, 10).parse_text("11")
    with pytest.raises(ValueError, match="is not an integer"):
        IntRange(1, 10).parse_text("ten")


@pytest.mark.parametrize("value", [0, 3_600_001, 9223372036854775807, 10_000_000_000_000, 10**400, True, 1.5, "5"])
def test_body_timeout_outside_the_bound_is_400(value):
    with pytest.raises(BadRequestError) as info:
        parse_native({"query": "q", "documents": ["a"], "timeout_ms": value}, LIMITS)
    assert info.value.field == "timeout_ms" and "1..3600000" in info.value.message


@pytest.mark.parametrize("value", [1, 3_600_000, None])
def test_body_timeout_inside_the_bound(value):
    assert parse_native({"query": "q", "documents": ["a"], "timeout_ms": value}, LIMITS).timeout_ms == value


@pytest.mark.parametrize("body, headers, field", [
    ({"query": "q", "documents": ["a"], "timeout_ms": 9223372036854775807}, {}, "timeout_ms"),
    ({"query": "q", "documents": ["a"]}, {"X-Request-Timeout-Ms": "\u00b9\u00b2"}, "X-Request-Timeout-Ms"),
    ({"query": "q", "documents": ["a"]}, {"X-Request-Timeout-Ms": "3600001"}, "X-Request-Timeout-Ms"),
    # a junk header is a 400 even when the body names its own timeout
    ({"query": "q", "documents": ["a"], "timeout_ms": 5000}, {"X-Request-Timeout-Ms": "soon"}, "X-Request-Timeout-Ms"),
])
def test_timeouts_are_400_over_http_and_the_service_keeps_scoring(fake_server, body, headers, field):
    fake = fake_server().start(FakeEngine())
    for path in ("/rerank", "/v1/rerank"):
        if path == "/v1/rerank" and field == "timeout_ms":
            continue  # the Cohere body has no timeout_ms
        status, payload, _ = request(fake.port, "POST", path, body, headers)
        error = payload["error"] if path == "/rerank" else payload
        assert status == 400 and error["field"] == field, payload
    assert request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["a", "b"]})[0] == 200
