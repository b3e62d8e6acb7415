"""client.rerank_candidates: reranks against the real server, and falls back to vector order on each failure."""

import json
import logging
import socket
import threading
import time

import pytest
from support.servers import free_port

from client import RerankSettings, rerank_candidates, rerank_endpoint

CANDIDATES = [
    {"id": "v1", "text": "the cat and the dog", "score": 0.91},
    {"id": "v2", "text": "bread cheese and wine", "score": 0.88},
    {"id": "v3", "text": "solar power is energy from the sun", "score": 0.85},
    {"id": "v4", "text": "a train on a bridge", "score": 0.80},
    {"id": "v5", "text": "paris is the capital of france", "score": 0.79},
    {"id": "v6", "text": "water boils at one hundred degrees celsius", "score": 0.70},
]
QUERY = "how does solar power work"


def settings(url, **kw):
    base = {"enabled": True, "url": url, "initial_k": 20, "top_k": 3, "timeout_ms": 3000}
    base.update(kw)
    return RerankSettings(**base)


def assert_fallback(result, top_k=3, needle=""):
    assert result.reranked is False and result.rerank_error and needle in result.rerank_error
    assert [c["id"] for c in result.candidates] == [c["id"] for c in CANDIDATES[:top_k]]
    assert all(c["rerank_score"] is None for c in result.candidates)


def test_reranks_with_the_real_server(cpu_server, tiny_model):
    result = rerank_candidates(QUERY, CANDIDATES, settings(cpu_server.base, initial_k=5))
    assert result.reranked and result.rerank_error is None and len(result.candidates) == 3
    expected = tiny_model.reference_scores(QUERY, [c["text"] for c in CANDIDATES[:5]])  # v6 is beyond INITIAL_K
    best = sorted(range(5), key=lambda i: -expected[i])[:3]
    assert [c["id"] for c in result.candidates] == [CANDIDATES[i]["id"] for i in best]
    for c in result.candidates:
        i = int(c["id"][1:]) - 1
        assert abs(c["rerank_score"] - expected[i]) < 1e-4 and c["score"] == CANDIDATES[i]["score"]
    assert CANDIDATES[0].get("rerank_score") is None  # the caller's objects are not modified


def test_disabled_is_vector_order():
    assert_fallback(rerank_candidates(QUERY, CANDIDATES, settings("http://127.0.0.1:1", enabled=False)),
                    needle="disabled")


def test_connection_refused():
    result = rerank_candidates(QUERY, CANDIDATES, settings(f"http://127.0.0.1:{free_port()}"))
    assert_fallback(result, needle="Connection")


class FakeService:
    """A loopback TCP server that answers every connection with `behaviour(conn, request)` and records the path of
    each request in `paths`. With `route`, a request for any other path gets a 404, as from the real server."""

    def __init__(self, behaviour, route=None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.behaviour = behaviour
        self.route = route
        self.paths = []
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            path = head.split(b"\r\n")[0].split(b" ")[1].decode()
            self.paths.append(path)
            length = int([h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0])
            while len(body) < length:
                body += conn.recv(65536)
            behaviour = self.behaviour
            if self.route is not None and path != self.route:
                behaviour = respond(404, {"ok": False, "error": {"type": "not_found", "message": f"no route {path}"}})
            try:
                behaviour(conn, json.loads(body))
            except OSError:
                pass  # the client gave up and closed: that is what the timeout tests want

    def close(self):
        self.closed.set()
        self.sock.close()


def respond(status, payload):
    def behaviour(conn, request):
        body = payload(request) if callable(payload) else payload
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
    return behaviour


@pytest.fixture
def fake_service():
    services = []

    def make(behaviour, route=None):
        services.append(FakeService(behaviour, route))
        return services[-1]

    yield make
    for s in services:
        s.close()


def test_stall_past_the_timeout_returns_within_it(fake_service):
    svc = fake_service(lambda conn, request: time.sleep(5))
    started = time.monotonic()
    result = rerank_candidates(QUERY, CANDIDATES, settings(svc.url, timeout_ms=300))
    elapsed = time.monotonic() - started
    assert_fallback(result, needle="timeout")
    assert elapsed < 1.0 and result.latency_ms < 1000


def test_trickling_server_cannot_stretch_the_timeout(fake_service):
    def trickle(conn, request):
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
            conn.sendall(bytes([byte]))
            time.sleep(0.05)

    svc = fake_service(trickle)
    started = time.monotonic()
    assert_fallback(rerank_candidates(QUERY, CANDIDATES, settings(svc.url, timeout_ms=400)), needle="timeout")
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("status, payload, needle", [
    (500, {"ok": False, "error": {"type": "inference_failed"}}, "HTTP 500"),
    (503, {"ok": False}, "HTTP 503"),
    (200, b"<html>not json</html>", "malformed JSON"),
    (200, {"ok": True}, "no results"),
    (200, {"results": [{"index": 0, "score": 0.9}]}, "returned 1 results for 3"),
    (200, {"results": [{"index": 0, "score": 0.9}, {"index": 0, "score": 0.8}, {"index": 1, "score": 0.1}]},
     "matches no candidate"),
    (200, {"results": [{"index": 0, "score": 0.9}, {"index": 9, "score": 0.8}, {"index": 1, "score": 0.1}]},
     "matches no candidate"),
    (200, {"results": [{"index": 0, "score": "high"}, {"index": 2, "score": 0.8}, {"index": 1, "score": 0.1}]},
     "finite number"),
])
def test_bad_answers_fall_back(fake_service, status, payload, needle, caplog):
    svc = fake_service(respond(status, payload))
    with caplog.at_level(logging.WARNING, logger="openvino_reranker.client"):
        result = rerank_candidates(QUERY, CANDIDATES, settings(svc.url))
    assert_fallback(result, needle=needle)
    assert not result.rerank_error.startswith("configuration") and not caplog.records  # service failures: not logged


def test_a_well_formed_fake_answer_is_used(fake_service):
    def answer(request):
        assert request["top_k"] == 3 and len(request["documents"]) == 4  # INITIAL_K=4
        return {"results": [{"index": 3, "score": 0.9}, {"index": 0, "score": 0.5}, {"index": 2, "score": 0.1}]}

    svc = fake_service(respond(200, answer))
    result = rerank_candidates(QUERY, CANDIDATES, settings(svc.url, initial_k=4))
    assert result.reranked and [c["id"] for c in result.candidates] == ["v4", "v1", "v3"]
    assert [c["rerank_score"] for c in result.candidates] == [0.9, 0.5, 0.1]


def test_fewer_candidates_than_top_k_and_none_at_all(cpu_server):
    result = rerank_candidates(QUERY, CANDIDATES[:2], settings(cpu_server.base, top_k=5))
    assert result.reranked and len(result.candidates) == 2
    empty = rerank_candidates(QUERY, [], settings(cpu_server.base))
    assert empty.candidates == [] and empty.rerank_error is None


def test_settings_from_env():
    s = RerankSettings.from_env({"RAG_RERANK_ENABLED": "true", "RAG_RERANK_URL": "http://127.0.0.1:9/",
                                 "RAG_RERANK_INITIAL_K": "50", "RAG_RERANK_TOP_K": "8", "RAG_RERANK_TIMEOUT_MS": "700"})
    assert s == RerankSettings(True, "http://127.0.0.1:9", 50, 8, 700)
    assert RerankSettings.from_env({}) == RerankSettings()
    for bad in ({"RAG_RERANK_TOP_K": "0"}, {"RAG_RERANK_TIMEOUT_MS": "soon"}, {"RAG_RERANK_ENABLED": "maybe"},
                {"RAG_RERANK_URL": "localhost:18818"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RerankSettings.from_env(bad)


GOOD_ANSWER = {"results": [{"index": 2, "score": 0.9}, {"index": 0, "score": 0.5}, {"index": 1, "score": 0.1}]}


def from_env(url):
    return RerankSettings.from_env({"RAG_RERANK_ENABLED": "true", "RAG_RERANK_URL": url, "RAG_RERANK_TOP_K": "3"})


@pytest.mark.parametrize("suffix, route", [
    ("", "/rerank"),  # the base URL
    ("/", "/rerank"),
    ("/rerank", "/rerank"),  # the URL of the route, as the design documents RAG_RERANK_URL
    ("/rerank/", "/rerank"),
    ("/reranker", "/reranker/rerank"),  # a reverse proxy's path prefix
    ("/reranker/", "/reranker/rerank"),
    ("/reranker/rerank", "/reranker/rerank"),
    ("/reranker/rerank//", "/reranker/rerank"),
])
def test_both_url_forms_reach_the_route(fake_service, suffix, route):
    svc = fake_service(respond(200, GOOD_ANSWER), route=route)
    for configured in (from_env(svc.url + suffix), settings(svc.url + suffix)):  # from the environment, by hand
        result = rerank_candidates(QUERY, CANDIDATES, configured)
        assert result.reranked and result.rerank_error is None
        assert [c["id"] for c in result.candidates] == ["v3", "v1", "v2"]
    assert svc.paths == [route, route]


def test_the_real_server_by_its_route_and_by_a_wrong_path(cpu_server):
    assert rerank_candidates(QUERY, CANDIDATES, from_env(cpu_server.base + "/rerank")).reranked
    result = rerank_candidates(QUERY, CANDIDATES, from_env(cpu_server.base + "/api"))
    assert_fallback(result, needle=f"configuration: HTTP 404 from POST {cpu_server.base}/api/rerank")
    assert "no route /api/rerank" in result.rerank_error  # the server's own message


def test_a_404_is_a_configuration_error_logged_once(fake_service, caplog):
    svc = fake_service(respond(200, GOOD_ANSWER), route="/rerank")
    called = f"{svc.url}/api/rerank"
    with caplog.at_level(logging.WARNING, logger="openvino_reranker.client"):
        first = rerank_candidates(QUERY, CANDIDATES, settings(svc.url + "/api"))
        second = rerank_candidates(QUERY, CANDIDATES, settings(svc.url + "/api"))
    assert svc.paths == ["/api/rerank"] * 2
    for result in (first, second):  # still the vector-order fallback, never an exception
        assert_fallback(result)
        assert result.rerank_error.startswith(f"configuration: HTTP 404 from POST {called} ")
        assert "no route /api/rerank" in result.rerank_error
    # only the client's records: a server fixture may still be writing its access-log line from an earlier test
    mine = [r for r in caplog.records if r.name == "openvino_reranker.client"]
    assert [r.levelno for r in mine] == [logging.WARNING]
    assert called in mine[0].getMessage() and "HTTP 404" in mine[0].getMessage()


def test_a_bad_url_built_by_hand_falls_back_and_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="openvino_reranker.client"):
        result = rerank_candidates(QUERY, CANDIDATES, settings("http://127.0.0.1:99999"))  # from_env rejects it
    assert_fallback(result, needle="configuration: url 'http://127.0.0.1:99999'")
    assert [r.levelno for r in caplog.records if r.name == "openvino_reranker.client"] == [logging.WARNING]


def test_https_speaks_tls():
    """An https URL is accepted and the call is made over TLS: a plain-HTTP answer, which a client that ignored
    the scheme would take, is refused by the TLS handshake."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    answer = json.dumps(GOOD_ANSWER).encode()

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(answer)}\r\n\r\n".encode() + answer)
            time.sleep(0.5)

    threading.Thread(target=serve, daemon=True).start()
    try:
        s = from_env(f"https://127.0.0.1:{listener.getsockname()[1]}/")
        assert rerank_endpoint(s.url) == f"https://127.0.0.1:{listener.getsockname()[1]}/rerank"
        assert_fallback(rerank_candidates(QUERY, CANDIDATES, s), needle="SSL")
    finally:
        listener.close()


@pytest.mark.parametrize("url", [
    "localhost:18818",  # no scheme
    "ftp://127.0.0.1:18818",
    "http://",
    "http:///rerank",  # no host
    "http://127.0.0.1:18818/rerank?top_k=5",
    "http://127.0.0.1:18818/?",
    "http://127.0.0.1:18818/rerank#results",
    "http://127.0.0.1:99999",
    "http://127.0.0.1:port",
    "http://127.0.0.1:0",
    "http://user:secret@127.0.0.1:18818",  # credentials the client would not send
    "http://127.0.0.1:18818/v1/rerank",  # the Cohere route: another protocol
    "http://127.0.0.1:18818/my rerank",
])
def test_from_env_rejects_malformed_urls(url):
    with pytest.raises(ValueError, match="RAG_RERANK_URL"):
        RerankSettings.from_env({"RAG_RERANK_URL": url})


@pytest.mark.parametrize("url, endpoint", [
    ("http://127.0.0.1:18818/", "http://127.0.0.1:18818/rerank"),
    ("http://127.0.0.1:18818/rerank/", "http://127.0.0.1:18818/rerank"),
    ("https://search.example/reranker", "https://search.example/reranker/rerank"),
    ("http://[::1]:18818", "http://[::1]:18818/rerank"),
])
def test_from_env_accepts_both_forms(url, endpoint):
    s = RerankSettings.from_env({"RAG_RERANK_URL": url})
    assert s.url == url.rstrip("/") and rerank_endpoint(s.url) == endpoint
