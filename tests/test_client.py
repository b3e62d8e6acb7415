"""client.rerank_candidates: reranks against the real server, and falls back to vector order on each failure."""

import json
import socket
import threading
import time

import pytest
from conftest import free_port

from client import RerankSettings, rerank_candidates

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
    """A loopback TCP server that answers every connection with `behaviour(conn)`."""

    def __init__(self, behaviour):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.behaviour = behaviour
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
            length = int([h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0])
            while len(body) < length:
                body += conn.recv(65536)
            try:
                self.behaviour(conn, json.loads(body))
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

    def make(behaviour):
        services.append(FakeService(behaviour))
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
def test_bad_answers_fall_back(fake_service, status, payload, needle):
    svc = fake_service(respond(status, payload))
    assert_fallback(rerank_candidates(QUERY, CANDIDATES, settings(svc.url)), needle=needle)


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
