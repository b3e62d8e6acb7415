"""Limits, overload, deadlines, disconnects, slow clients, faults, drain, auth and metrics, on real servers."""

import http.client
import json
import logging
import socket
import threading
import time

import pytest
from support.engines import FakeEngine, close_reranker
from support.http import http_bytes, request, send_raw
from support.servers import free_port
from support.waiting import wait_until

from openvino_reranker.errors import EXIT_CONFIG, EXIT_MODEL, DeadlineExceededError
from openvino_reranker.startup import drain, main

DOCS = ["solar power", "the cat and the dog", "bread and cheese"]


def in_background(fn, *args):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn(*args)), daemon=True)
    thread.start()
    return thread, result


# ---------------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize("args, body, field, limit", [
    (["--max-query-chars", "10"], {"query": "q" * 11, "documents": DOCS}, "query", "max_query_chars"),
    (["--max-document-chars", "20"], {"query": "q", "documents": ["a", "b" * 21]}, "documents[1]",
     "max_document_chars"),
    (["--max-document-chars", "20"], {"query": "q", "documents": [{"text": "b" * 21}]}, "documents[0].text",
     "max_document_chars"),
    (["--max-total-tokens", "12"], {"query": "solar power", "documents": DOCS}, "documents", "max_total_tokens"),
    (["--max-documents", "2"], {"query": "q", "documents": DOCS}, "documents", "max_documents"),
])
def test_limits_are_413_naming_the_limit_and_field(fake_server, args, body, field, limit):
    fake = fake_server(*args).start(FakeEngine())
    status, payload, _ = request(fake.port, "POST", "/rerank", body)
    assert status == 413 and payload["error"]["type"] == "too_large"
    assert payload["error"]["field"] == field and limit in payload["error"]["message"]


LONG_TEXT = "solar power " * 100  # over the fake engine's 64 tokens per pair


def field_and_message(payload) -> tuple[str | None, str]:
    """An error's field and message in any dialect's shape (native, Cohere/infinity, TEI)."""
    if isinstance(payload.get("error"), dict):
        return payload["error"]["field"], payload["error"]["message"]
    return payload["field"], payload.get("message") or payload["error"]


@pytest.mark.parametrize("args, path, body, status, field", [
    # a pair too long to score untruncated (only TEI can ask for that): the body's own `texts`
    ([], "/rerank", {"query": "q", "texts": ["a", LONG_TEXT], "truncate": False}, 413, "texts[1]"),
    # the token budget, found after parsing: the list as each dialect's body names it
    (["--max-total-tokens", "12"], "/rerank", {"query": "q", "documents": DOCS}, 413, "documents"),
    (["--max-total-tokens", "12"], "/v1/rerank", {"query": "q", "documents": DOCS}, 413, "documents"),
    (["--max-total-tokens", "12"], "/v2/rerank", {"query": "q", "documents": DOCS}, 413, "documents"),
    (["--max-total-tokens", "12"], "/rerank", {"query": "q", "texts": DOCS}, 413, "texts"),
    (["--max-total-tokens", "12"], "/rerank", {"query": "q", "documents": DOCS, "model": "m"}, 413, "documents"),
    (["--max-total-tokens", "12"], "/rerank", [{"query": "q", "passage": d} for d in DOCS], 413, "pairs"),
    # found while parsing: each dialect's entry path
    (["--max-document-chars", "20"], "/rerank", {"query": "q", "documents": ["a", "b" * 21]}, 413, "documents[1]"),
    (["--max-document-chars", "20"], "/v2/rerank", {"query": "q", "documents": ["a", "b" * 21]}, 413,
     "documents[1]"),
    (["--max-document-chars", "20"], "/rerank", {"query": "q", "texts": ["a", "b" * 21]}, 413, "texts[1]"),
    (["--max-document-chars", "20"], "/rerank", {"query": "q", "documents": ["a", "b" * 21], "top_n": 1}, 413,
     "documents[1]"),
    (["--max-document-chars", "20"], "/rerank", [{"query": "q", "passage": "a"}, {"query": "q", "passage": "b" * 21}],
     413, "[1].passage"),
    ([], "/v1/rerank", {"query": "q", "documents": ["a", {"text": " "}]}, 400, "documents[1].text"),
    ([], "/rerank", {"query": "q", "texts": ["a", 7]}, 400, "texts[1]"),
    ([], "/rerank", {"query": "q", "documents": ["a", ""], "raw_scores": True}, 400, "documents[1]"),
    ([], "/rerank", [{"query": "q", "passage": "a"}, {"query": "q", "passage": ""}], 400, "[1].passage"),
])
def test_errors_name_the_documents_as_the_body_does(fake_server, args, path, body, status, field):
    """Every dialect's errors that name its documents use the body's own field: `texts` in a TEI body, never the
    native `documents` (issue 16: truncate=false named documents[1] on a TEI body)."""
    fake = fake_server(*args).start(FakeEngine())
    got, payload, _ = request(fake.port, "POST", path, body)
    named, message = field_and_message(payload)
    assert got == status and named == field, payload
    assert field in message and ("documents" in message) == ("documents" in field), message


def test_a_huge_string_is_refused_before_tokenizing(fake_server, monkeypatch):
    fake = fake_server("--max-body-bytes", str(60 * 1024 * 1024)).start(FakeEngine())
    calls = []
    monkeypatch.setattr(fake.service.reranker.head, "encode", lambda *a: calls.append(a))
    status, payload, _ = request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["x" * 50_000_000]})
    assert status == 413 and payload["error"]["field"] == "documents[0]" and calls == []


@pytest.mark.parametrize("body, field", [
    ({"query": "q", "documents": DOCS, "timeout_ms": 0}, "timeout_ms"),
    ({"query": "q", "documents": DOCS, "timeout_ms": "5"}, "timeout_ms"),
])
def test_bad_timeout_field(fake_server, body, field):
    fake = fake_server().start(FakeEngine())
    status, payload, _ = request(fake.port, "POST", "/rerank", body)
    assert status == 400 and payload["error"]["field"] == field


def test_bad_timeout_header(fake_server):
    fake = fake_server().start(FakeEngine())
    status, payload, _ = request(fake.port, "POST", "/rerank", {"query": "q", "documents": DOCS},
                                 {"X-Request-Timeout-Ms": "soon"})
    assert status == 400 and payload["error"]["field"] == "X-Request-Timeout-Ms"


# ---------------------------------------------------------------------------------------------- overload, deadlines


def test_queue_full_is_an_immediate_503(fake_server):
    engine = FakeEngine("gated")
    fake = fake_server("--max-queued-requests", "1").start(engine)
    thread, first = in_background(request, fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})
    engine.wait_entered()  # the first request is admitted and on the device, held there until release()
    started = time.monotonic()
    status, payload, resp = request(fake.port, "POST", "/v1/rerank", {"query": "q", "documents": ["a"]})
    elapsed = time.monotonic() - started
    engine.release()
    assert status == 503 and payload["type"] == "overloaded" and resp.getheader("Retry-After") == "1"
    assert elapsed < 0.5  # refused without waiting for the running request (held until after the answer)
    thread.join(10)
    assert first["value"][0] == 200  # and the admitted request still completes


def test_deadline_passed_between_batches_is_504(fake_server):
    engine = FakeEngine("gated")
    fake = fake_server("--batch-size", "1").start(engine)
    # ten batches of one (distinct documents: identical pairs may be scored once); the first is held on the device
    # until the 400 ms deadline has passed (the answer)
    status, payload, _ = request(fake.port, "POST", "/rerank",
                                 {"query": "q", "documents": [f"a{i}" for i in range(10)], "timeout_ms": 400})
    close_reranker(fake.service.reranker)  # opens the gate; returns once every queued batch ran or was dropped
    assert status == 504 and payload["error"]["type"] == "deadline_exceeded"
    assert engine.calls <= 3  # the rest was dropped before inference


def test_deadline_from_header_and_server_default(fake_server):
    engine = FakeEngine("gated")
    fake = fake_server("--batch-size", "1", "--request-timeout-ms", "400").start(engine)
    docs = [f"a{i}" for i in range(5)]  # five batches of one
    # the first batch is held on the device past the server's default of 400 ms
    assert request(fake.port, "POST", "/rerank", {"query": "q", "documents": docs})[0] == 504  # server default
    thread, second = in_background(request, fake.port, "POST", "/v1/rerank", {"query": "q", "documents": docs},
                                   {"X-Request-Timeout-Ms": "5000"})
    wait_until(lambda: fake.service.admission.admitted == 1, what="admitting the second request")
    # deliberate, once it is admitted: the second request waits behind the held batch for longer than the server's
    # default of 400 ms, which its header overrides
    time.sleep(0.6)
    engine.release()
    thread.join(10)
    status, _, _ = second["value"]
    assert status == 200  # the header asked for more time


def test_waiting_for_the_device_past_the_deadline_is_504(fake_server):
    """Two admitted requests and two batcher workers, but one device slot: the first request holds the slot, the
    second's batch reaches `infer` on the other worker, waits for the slot in the engine's pool and times out
    there."""
    import queue

    class OneSlot(FakeEngine):
        def __init__(self):
            super().__init__("gated", num_requests=2)  # two workers: the second batch gets to infer at once
            self.pool = queue.Queue()
            self.pool.put(object())
            self.waited_out = threading.Event()  # set by the branch under test only

        def infer(self, feed, shape, deadline=None):
            try:
                slot = self.pool.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.waited_out.set()
                raise DeadlineExceededError("waited for the device") from None
            try:
                return super().infer(feed, shape, deadline)
            finally:
                self.pool.put(slot)

    engine = OneSlot()
    fake = fake_server().start(engine)
    thread, first = in_background(request, fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})
    engine.wait_entered()  # the first request holds the one slot, and keeps it until release()
    status, payload, _ = request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"], "timeout_ms": 300})
    assert status == 504 and payload["error"]["type"] == "deadline_exceeded"
    assert engine.waited_out.wait(5)  # the wait for the device slot itself gave up at the deadline
    engine.release()
    thread.join(10)
    assert first["value"][0] == 200


def server_saw_close(server_port: int, client_port: int) -> bool:
    """True once the kernel has the server's end of this loopback connection in CLOSE_WAIT: the client's FIN has
    arrived, so the server's client-gone probe sees it."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, remote, state = line.split()[1:4]
            if local.endswith(f":{server_port:04X}") and remote.endswith(f":{client_port:04X}"):
                return state == "08"
    return False


def test_client_disconnect_drops_its_queued_work(fake_server):
    engine = FakeEngine("gated")
    fake = fake_server("--batch-size", "1").start(engine)
    body = json.dumps({"query": "q", "documents": [f"a{i}" for i in range(20)]}).encode()  # 20 distinct pairs
    with socket.create_connection(("127.0.0.1", fake.port)) as s:
        s.sendall(http_bytes("POST", "/rerank", body, {"Content-Type": "application/json"}))
        engine.wait_entered()  # the first of its 20 batches is on the device, held there
        client_port = s.getsockname()[1]
    wait_until(lambda: server_saw_close(fake.port, client_port), what="the server's end seeing the client close")
    close_reranker(fake.service.reranker)  # opens the gate; returns once every queued batch ran or was dropped
    assert engine.calls <= 4  # 20 batches were planned; work stopped once the client had gone
    assert request(fake.port, "GET", "/healthz")[0] == 200


# ------------------------------------------------------------------------------------ slow clients, connections


def test_slow_loris_is_closed_without_blocking_others(fake_server):
    fake = fake_server("--read-timeout-s", "1").start(FakeEngine())
    with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as s:
        s.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 5:
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
            # others are served meanwhile
            assert request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})[0] == 200
            s.settimeout(0.3)
            try:
                if s.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed and time.monotonic() - started < 3


def test_slow_body_is_closed(fake_server):
    fake = fake_server("--read-timeout-s", "1").start(FakeEngine())
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as s:
        s.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert time.monotonic() - started < 3
        assert data == b"" or b"408" in data.split(b"\r\n")[0]


def test_idle_keep_alive_connection_is_closed(fake_server):
    fake = fake_server("--idle-timeout-s", "1").start(FakeEngine())
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    assert request(fake.port, "GET", "/healthz", conn=conn)[0] == 200
    started = time.monotonic()
    # recv blocks until the server hangs up (bounded by the connection's 5 s timeout): no guess at when it does
    assert conn.sock.recv(1) == b""  # the server hung up
    assert time.monotonic() - started > 0.5  # at the idle timeout, not at once
    conn.close()


def test_connections_beyond_the_bound_get_503(fake_server):
    fake = fake_server("--max-connections", "2", "--idle-timeout-s", "5").start(FakeEngine())
    held = [socket.create_connection(("127.0.0.1", fake.port)) for _ in range(2)]
    try:
        wait_until(lambda: fake.srv.slots.held == 2, 5, "both connections holding a slot")
        with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as extra:
            data = b""
            while chunk := extra.recv(4096):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and json.loads(body)["error"]["type"] == "overloaded"
    finally:
        for s in held:
            s.close()
    wait_until(lambda: fake.srv.slots.held == 0, 5, "the closed connections giving their slots back")
    assert request(fake.port, "GET", "/healthz")[0] == 200  # slots are given back


# ---------------------------------------------------------------------------------------------- faults and drain


def test_repeated_failures_flip_readyz_and_a_success_flips_it_back(fake_server):
    fake = fake_server("--failures-before-unready", "2").start(FakeEngine(["fails", "fails", "ok"]))
    assert request(fake.port, "GET", "/readyz")[0] == 200
    assert request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})[0] == 500
    assert request(fake.port, "GET", "/readyz")[0] == 200  # one failure is not enough
    assert request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})[0] == 500
    status, body, _ = request(fake.port, "GET", "/readyz")
    assert status == 503 and "2 consecutive inference failures" in body["reason"] and "device lost" in body["reason"]
    # scoring is still attempted
    assert request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})[0] == 200
    assert request(fake.port, "GET", "/readyz")[0] == 200


def test_drain_finishes_in_flight_requests_and_refuses_new_ones(fake_server):
    engine = FakeEngine("gated")
    fake = fake_server("--drain-timeout-s", "10").start(engine)
    thread, result = in_background(request, fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})
    engine.wait_entered()  # in flight, held on the device
    started = time.monotonic()
    drainer, drained = in_background(lambda: (drain(fake.srv, fake.service), time.monotonic())[1])
    # the drain has stopped accepting (serve_forever has returned) and so is at, or about to be at, its wait for
    # the in-flight request
    wait_until(lambda: not fake.thread.is_alive(), 10, "the drain to stop accepting")
    time.sleep(0.5)  # deliberate: the request stays in flight this much longer, and the drain must wait for it
    engine.release()
    drainer.join(10)
    assert 0.4 < drained["value"] - started < 5  # waited for the running request, not longer
    thread.join(5)
    assert result["value"][0] == 200
    with pytest.raises(OSError):
        request(fake.port, "GET", "/healthz")


def test_drain_grace_keeps_serving_with_readyz_503_until_it_ends(fake_server):
    fake = fake_server("--drain-grace-s", "60").start(FakeEngine())
    kept_alive = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)  # opened before the drain
    assert request(fake.port, "GET", "/healthz", conn=kept_alive)[0] == 200
    end_grace = threading.Event()
    drainer, _ = in_background(drain, fake.srv, fake.service, end_grace)
    wait_until(lambda: request(fake.port, "GET", "/readyz")[0] == 503, 10, "/readyz turning 503")
    status, ready, _ = request(fake.port, "GET", "/readyz")
    assert ready["reason"] == "draining: shutting down"
    # still accepting connections and scoring, every answer closing its connection (a balancer opens a new one)
    for conn in (None, kept_alive):
        status, payload, resp = request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]}, conn=conn)
        assert status == 200 and payload["results"][0]["index"] == 0 and resp.getheader("Connection") == "close"
    kept_alive.close()
    assert drainer.is_alive()  # the grace (60 s) has not ended by itself
    end_grace.set()
    drainer.join(10)
    assert not drainer.is_alive()
    with pytest.raises(OSError):  # no longer accepting
        request(fake.port, "GET", "/healthz")


def test_drain_gives_up_after_its_timeout(fake_server):
    engine = FakeEngine("gated")
    fake = fake_server("--drain-timeout-s", "0").start(engine)
    in_background(request, fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})
    engine.wait_entered()  # in flight, and held there until the fixture closes the server
    started = time.monotonic()
    drain(fake.srv, fake.service)
    assert time.monotonic() - started < 1.5


# ---------------------------------------------------------------------------------------------- access


@pytest.mark.parametrize("path, method, body", [
    ("/rerank", "POST", {"query": "q", "documents": ["a"]}),
    ("/v1/rerank", "POST", {"query": "q", "documents": ["a"]}),
    ("/metrics", "GET", None),
])
def test_api_key_guards_scoring_and_metrics(fake_server, path, method, body):
    fake = fake_server("--api-key", "s3cret").start(FakeEngine())
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        status, payload, resp = request(fake.port, method, path, body, headers)
        assert status == 401 and resp.getheader("WWW-Authenticate").startswith("Bearer")
        assert (payload.get("type") or payload["error"]["type"]) == "unauthorized"
    assert request(fake.port, method, path, body, {"Authorization": "Bearer s3cret"})[0] == 200
    assert request(fake.port, "GET", "/healthz")[0] == 200 and request(fake.port, "GET", "/readyz")[0] == 200


def test_api_key_file(fake_server, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    fake = fake_server("--api-key-file", str(key_file)).start(FakeEngine())
    assert request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})[0] == 401
    authorized = {"Authorization": "Bearer from-a-file"}
    assert request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]}, authorized)[0] == 200


@pytest.mark.parametrize("args, code, needle", [
    (["--host", "0.0.0.0"], EXIT_CONFIG, "not a loopback address"),
    (["--api-key", "a", "--api-key-file", "/x"], EXIT_CONFIG, "not both"),
    (["--api-key-file", "/nonexistent/key"], EXIT_CONFIG, "cannot read api_key_file"),
])
def test_startup_refusals(args, code, needle, capsys, tmp_path):
    stop = threading.Event()
    stop.set()
    assert main(["--port", str(free_port()), "--device", "CPU", *args], {}, stop=stop) == code
    assert needle in capsys.readouterr().err


def test_remote_bind_allowed_with_a_key_or_the_flag(tmp_path, capsys):
    stop = threading.Event()
    stop.set()
    for extra in (["--api-key", "k"], ["--allow-remote-without-key", "true"]):
        code = main(["--host", "0.0.0.0", "--port", str(free_port()), "--device", "CPU",
                            "--model-dir", str(tmp_path / "none"), *extra], {}, stop=stop)
        assert code == EXIT_MODEL  # got past the bind check to the model


# ---------------------------------------------------------------------------------------------- observability


def test_metrics_parse_with_the_prometheus_parser(fake_server):
    from prometheus_client.parser import text_string_to_metric_families

    fake = fake_server().start(FakeEngine())
    request(fake.port, "POST", "/rerank", {"query": "q", "documents": DOCS})
    request(fake.port, "POST", "/rerank", {"query": "", "documents": DOCS})
    status, _, resp = request(fake.port, "GET", "/metrics")
    assert status == 200 and resp.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    text = send_raw(fake.port, http_bytes("GET", "/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("openvino_reranker_requests_total", (("route", "/rerank"), ("status", "200")))] == 1
    assert samples[("openvino_reranker_requests_total", (("route", "/rerank"), ("status", "400")))] == 1
    assert samples[("openvino_reranker_pairs_scored_total", ())] == 3
    assert samples[("openvino_reranker_tokens_scored_total", ())] > 3
    assert samples[("openvino_reranker_stage_duration_seconds_count", (("stage", "tokenize"),))] == 1
    assert ("openvino_reranker_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "/rerank"))) in samples
    assert samples[("openvino_reranker_queue_depth", ())] == 0
    assert samples[("openvino_reranker_ready", ())] == 1
    assert any(name == "openvino_reranker_info" and dict(labels)["device"] == "CPU" for name, labels in samples)


def test_no_request_text_in_logs_or_metrics(fake_server, caplog):
    fake = fake_server().start(FakeEngine())
    secret_q, secret_d = "zebra-query-marker", "yak-document-marker"
    with caplog.at_level(logging.DEBUG, logger="openvino_reranker"):
        request(fake.port, "POST", "/rerank", {"query": secret_q, "documents": [secret_d, "b"]},
                {"X-Request-ID": "rid-42"})
        request(fake.port, "POST", "/rerank", {"query": secret_q, "documents": [secret_d, ""]})  # an error path too
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "rid-42" in logged and "documents=2" in logged and "tokens=" in logged and "infer_ms=" in logged
    assert secret_q not in logged and secret_d not in logged
    assert secret_q not in send_raw(fake.port, http_bytes("GET", "/metrics")).text()


def test_request_id_is_echoed_or_made(fake_server):
    fake = fake_server().start(FakeEngine())
    assert request(fake.port, "GET", "/healthz", headers={"X-Request-ID": "abc.1"})[2].getheader("X-Request-ID") \
        == "abc.1"
    made = request(fake.port, "GET", "/healthz", headers={"X-Request-ID": "bad id\u00e9"})[2].getheader("X-Request-ID")
    assert made and made != "bad id" and len(made) == 32


def test_a_request_after_the_model_is_released_says_so(fake_server):
    """Seen behind HAProxy: a request that reached a draining instance after its model was freed was answered
    '503 not ready: ready'."""
    fake = fake_server().start(FakeEngine())
    fake.service.start_draining()
    fake.service.release_model()
    status, payload, _ = request(fake.port, "POST", "/rerank", {"query": "q", "documents": ["a"]})
    assert status == 503 and payload["error"]["type"] == "not_ready"
    assert "not ready: draining" in payload["error"]["message"]
