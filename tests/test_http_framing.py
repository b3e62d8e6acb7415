"""Hostile HTTP framing on a real server: every malformed request line or header block gets a JSON answer (never a
stack trace, a 500, a dropped or hung connection), and the server keeps serving afterwards."""

import fcntl
import http.client
import json
import logging
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.engines import FakeEngine
from support.http import request
from support.waiting import wait_until

from openvino_reranker.connection import EVICTABLE_AFTER_S, peer_closed
from openvino_reranker.httpserver import RerankHandler

BODY = json.dumps({"query": "q", "documents": ["a", "b"]}).encode()


# ---------------------------------------------------------------------------------------------- helpers


def read_until_closed(sock: socket.socket, timeout_s: float = 5.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or `timeout_s` passes without a close (False)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, False
    return data, True


def parse_responses(data: bytes) -> list[tuple[int, dict, object]]:
    """(status, lower-cased headers, JSON body) of each response in `data`."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"an incomplete response head: {data[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers.get("content-length", "0"))
        body, data = rest[:length], rest[length:]
        assert headers.get("content-type", "application/json").startswith(("application/json", "text/plain"))
        out.append((int(status_line.split()[1]), headers, json.loads(body) if body else None))
    return out


def exchange(port: int, data: bytes, half_close: bool = False, timeout_s: float = 5.0):
    """Send raw bytes on a new connection; returns (responses, closed by the server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        raw, closed = read_until_closed(s, timeout_s)
    return parse_responses(raw), closed


def assert_serving(port: int) -> None:
    """After a hostile request, a normal scoring request on a new connection still gets 200."""
    assert request(port, "POST", "/rerank", {"query": "q", "documents": ["a"]})[0] == 200


def assert_refused(responses, closed, status=400, error_type="http_error"):
    """Exactly one answer, in the native error shape, with Connection: close, and the connection then closed."""
    assert len(responses) == 1, responses
    got, headers, body = responses[0]
    assert got == status and body["ok"] is False and body["error"]["type"] == error_type, responses
    assert headers["connection"] == "close" and closed
    assert "Traceback" not in json.dumps(body)
    return body["error"]["message"]


def post_head(length: bytes, extra: bytes = b"", path: bytes = b"/rerank") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " + length
            + b"\r\n" + extra + b"\r\n")


SMUGGLED = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"  # what a desynced parser would take as a second request

FRAMING_400 = [
    # Content-Length that str.isdigit()/str.strip() accept but int() or a proxy would not
    ("superscript_length_healthz", b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n"),
    ("superscript_length_rerank", post_head(b"\xb2") + b"{}"),
    ("fs_padded_length", post_head(b"\x1c" + str(len(BODY)).encode() + b"\x1c") + BODY),
    ("nbsp_padded_length", post_head(b"\xa0" + str(len(BODY)).encode() + b"\xa0") + BODY),
    ("signed_length", post_head(b"+" + str(len(BODY)).encode()) + BODY),
    ("length_list", post_head(b"%d, %d" % (len(BODY), len(BODY))) + BODY),
    ("huge_length", post_head(b"9" * 5000) + BODY),
    # two lengths: a proxy using the other one would see a different next request
    ("duplicate_length", post_head(b"0", b"Content-Length: %d\r\n" % len(SMUGGLED)) + SMUGGLED),
    ("duplicate_same_length", post_head(str(len(BODY)).encode(), b"Content-Length: %d\r\n" % len(BODY)) + BODY),
    # lines http.client's parser drops silently, with every header after them
    ("no_colon", b"GET /healthz HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n"),
    ("no_colon_hides_transfer_encoding", post_head(b"3", b"junk\r\nTransfer-Encoding: chunked\r\n") + b"{}\n"),
    ("obs_fold_space", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n continued\r\n\r\n"),
    ("obs_fold_tab", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\tcontinued\r\n\r\n"),
    ("space_before_colon", post_head(str(len(BODY)).encode()).replace(b"Content-Length:", b"Content-Length :")
     + BODY),
    ("bare_cr", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\rContent-Length: 5\r\n\r\n"),
    ("nul", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
    ("empty_transfer_encoding", post_head(str(len(BODY)).encode(), b"Transfer-Encoding: \r\n") + BODY),
    ("missing_host", b"GET /healthz HTTP/1.1\r\n\r\n"),
    ("duplicate_host", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ("request_line_fs", b"GET\x1c/healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("request_line_double_space", b"GET  /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
]


@pytest.mark.parametrize("data", [c[1] for c in FRAMING_400], ids=[c[0] for c in FRAMING_400])
def test_ambiguous_framing_is_400_and_close(fake_server, data):
    fake = fake_server().start(FakeEngine())
    responses, closed = exchange(fake.port, data)
    assert_refused(responses, closed)
    assert_serving(fake.port)


def test_a_refusal_on_the_cohere_route_has_the_cohere_shape(fake_server):
    fake = fake_server().start(FakeEngine())
    data = post_head(b"0", b"Content-Length: %d\r\n" % len(SMUGGLED), path=b"/v1/rerank") + SMUGGLED
    responses, closed = exchange(fake.port, data)
    assert [r[0] for r in responses] == [400] and closed
    body = responses[0][2]
    assert body["type"] == "http_error" and "more than once" in body["message"]  # what Cohere's SDKs read
    assert_serving(fake.port)


def test_the_refusal_says_what_is_wrong(fake_server):
    fake = fake_server().start(FakeEngine())
    cases = {
        post_head(b"\xb2"): "Content-Length",
        post_head(b"0", b"Content-Length: 5\r\n"): "more than once",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n": "colon",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n continued\r\n\r\n": "fold",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n": "control character",
        b"GET /healthz HTTP/1.1\r\n\r\n": "Host",
    }
    for data, needle in cases.items():
        assert needle in assert_refused(*exchange(fake.port, data))


def test_a_proper_request_after_a_clean_one_still_keeps_alive(fake_server):
    """The checks do not refuse ordinary requests: two on one connection, HTTP/1.0 without Host, one leading CRLF."""
    fake = fake_server().start(FakeEngine())
    last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    two = post_head(str(len(BODY)).encode()) + BODY + b"\r\n" + last
    responses, closed = exchange(fake.port, two)
    assert [r[0] for r in responses] == [200, 200] and closed
    responses, closed = exchange(fake.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert [r[0] for r in responses] == [200] and closed
    folded_looking = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Tab:\tvalue\twith tabs\t\r\nConnection: close\r\n\r\n"
    assert [r[0] for r in exchange(fake.port, folded_looking)[0]] == [200]


LAST = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"  # ends a pipelined exchange


@pytest.mark.parametrize("version, connection, closes", [
    (b"1.1", [b"close"], True),
    (b"1.1", [b"TE, close"], True),  # libwww-perl
    (b"1.1", [b"te ,\tCLOSE "], True),
    (b"1.1", [b"keep-alive, close"], True),
    (b"1.1", [b"TE", b"close"], True),  # several Connection lines
    (b"1.1", [b",close,"], True),
    (b"1.1", [b"TE"], False),
    (b"1.1", [b"closed, x-close"], False),  # only the token close closes
    (b"1.1", [], False),
    (b"1.0", [], True),
    (b"1.0", [b"keep-alive"], False),
    (b"1.0", [b"TE, Keep-Alive"], False),
    (b"1.0", [b"TE", b"keep-alive"], False),
    (b"1.0", [b"keep-alive, close"], True),
])
def test_connection_options_are_a_token_list(fake_server, version, connection, closes):
    """RFC 9112 9.6: a close token anywhere in the comma-separated Connection list, on any of its lines, closes
    after the answer, which says `Connection: close`; an HTTP/1.0 keep-alive token anywhere keeps the connection
    open and the answer says `Connection: keep-alive` (issue 16: `Connection: TE, close` kept it open)."""
    fake = fake_server().start(FakeEngine())
    fields = b"".join(b"Connection: " + value + b"\r\n" for value in connection)
    first = b"GET /healthz HTTP/" + version + b"\r\nHost: x\r\n" + fields + b"\r\n"
    responses, closed = exchange(fake.port, first + LAST)
    assert closed and [r[0] for r in responses] == ([200] if closes else [200, 200])
    said = responses[0][1].get("connection")
    assert said == ("close" if closes else "keep-alive" if version == b"1.0" else None)


RID = b"X-Request-ID: rid-16.4\r\n"
CLOSE = b"Connection: close\r\n"

REFUSED_AFTER_THE_HEAD = [
    ("trace_501", b"TRACE /healthz HTTP/1.1\r\nHost: x\r\n" + RID + b"\r\n", 501),
    ("brew_501", b"BREW /rerank HTTP/1.1\r\nHost: x\r\n" + RID + b"\r\n", 501),
    ("repeated_host", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + RID + b"\r\n", 400),
    ("missing_host", b"GET /healthz HTTP/1.1\r\n" + RID + b"\r\n", 400),
    ("repeated_length", post_head(b"0", b"Content-Length: 5\r\n" + RID), 400),
    ("bad_length", post_head(b"+2", RID) + b"{}", 400),
    ("no_colon_before_it", b"GET /healthz HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n" + RID + b"\r\n", 400),
    ("folded_line_before_it", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n more\r\n" + RID + b"\r\n", 400),
    ("nul_in_a_value", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n" + RID + b"\r\n", 400),
    ("empty_transfer_encoding", post_head(b"2", b"Transfer-Encoding: \r\n" + RID) + b"{}", 400),
    ("chunked_411", post_head(b"2", b"Transfer-Encoding: chunked\r\n" + RID) + b"{}", 411),
    ("too_large_413", post_head(b"99999999", RID), 413),
    ("media_type_415", b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" + RID + CLOSE + b"\r\n{}", 415),
    ("not_found_404", b"GET /nowhere HTTP/1.1\r\nHost: x\r\n" + RID + CLOSE + b"\r\n", 404),
    ("method_405", b"GET /rerank HTTP/1.1\r\nHost: x\r\n" + RID + CLOSE + b"\r\n", 405),
]


@pytest.mark.parametrize("data, status", [c[1:] for c in REFUSED_AFTER_THE_HEAD],
                         ids=[c[0] for c in REFUSED_AFTER_THE_HEAD])
def test_every_answer_after_the_head_echoes_the_request_id(fake_server, data, status):
    """SPEC: every response carries the request's own X-Request-ID when it sent a valid one; refusals made from a
    head read whole (501, 400 for its framing, ...) made a new id (issue 16)."""
    fake = fake_server().start(FakeEngine())
    [(got, headers, _)], closed = exchange(fake.port, data)
    assert got == status and closed
    assert headers["x-request-id"] == "rid-16.4"


def scoring_request(target: bytes, host: bytes | None = b"Host: x\r\n", version: bytes = b"1.1") -> bytes:
    return (b"POST " + target + b" HTTP/" + version + b"\r\n" + (host or b"") + b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n" % len(BODY) + CLOSE + b"\r\n" + BODY)


@pytest.mark.parametrize("target", [
    b"http://127.0.0.1:18818/rerank",
    b"HTTP://LOCALHOST/rerank",  # the scheme and the host are case-insensitive
    b"hTtP://[::1]:18818/rerank?x=1",  # an IPv6 literal; the query is ignored as on any path
    b"http://reranker.internal//rerank",  # any host is served, as by nginx's default server
    b"http://127.0.0.1:/rerank",  # an empty port is the default one (RFC 3986)
])
def test_an_absolute_form_target_is_routed_by_its_path(fake_server, target):
    """RFC 9112 3.2.2: a server MUST accept the absolute-form; it got a 404 (issue 16)."""
    fake = fake_server().start(FakeEngine())
    [(status, _, body)], closed = exchange(fake.port, scoring_request(target))
    assert status == 200 and body["ok"] is True and len(body["results"]) == 2 and closed


def test_the_absolute_form_host_replaces_the_host_header(fake_server, monkeypatch):
    fake = fake_server().start(FakeEngine())
    seen = []
    route_healthz = RerankHandler.route_healthz

    def record(handler, route):
        seen.append(handler.headers.get_all("Host"))
        route_healthz(handler, route)

    monkeypatch.setattr(RerankHandler, "route_healthz", record)
    head = b"GET http://reranker.internal:18818/healthz HTTP/1.1\r\nHost: other.example\r\n" + CLOSE + b"\r\n"
    assert [r[0] for r in exchange(fake.port, head)[0]] == [200]
    # HTTP/1.0 may leave Host out; HTTP/1.1 still needs exactly one (RFC 9112 3.2), as nginx does
    assert [r[0] for r in exchange(fake.port, b"GET http://h10.example/healthz HTTP/1.0\r\n\r\n")[0]] == [200]
    assert seen == [["reranker.internal:18818"], ["h10.example"]]
    assert "Host" in assert_refused(*exchange(fake.port, b"GET http://x/healthz HTTP/1.1\r\n" + CLOSE + b"\r\n"))


@pytest.mark.parametrize("target, needle", [
    (b"https://127.0.0.1:18818/rerank", "https"),  # this port speaks plain HTTP only
    (b"ftp://127.0.0.1/rerank", "scheme"),
    (b"http:///rerank", "host"),  # an empty host (RFC 9110 4.2.1: reject)
    (b"http://:18818/rerank", "host"),
    (b"http://user:secret@127.0.0.1/rerank", "userinfo"),  # RFC 9110 4.2.4
    (b"http://127.0.0.1:80x/rerank", "host"),
    (b"http://[::1/rerank", "host"),
    (b"http://exa mple/rerank", "request line"),  # two spaces: not even a request line
    (b"http:/127.0.0.1/rerank", "request target"),
    (b"http://127.0.0.1/rerank#top", "request target"),  # a fragment is never sent
    (b"rerank", "request target"),  # neither /path nor scheme://
    (b"127.0.0.1:18818", "request target"),  # authority-form is for CONNECT
    (b"*", "OPTIONS"),  # asterisk-form is for OPTIONS
])
def test_a_malformed_or_https_target_is_400(fake_server, target, needle):
    fake = fake_server().start(FakeEngine())
    assert needle in assert_refused(*exchange(fake.port, scoring_request(target)))
    assert_serving(fake.port)


def test_options_asterisk_is_a_request_with_no_route(fake_server):
    """Asterisk-form (RFC 9112 3.2.4) names no resource here: a 404 as before, on a connection that stays open."""
    fake = fake_server().start(FakeEngine())
    options = b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"
    [(status, headers, body), (after, _, _)], closed = exchange(fake.port, options + LAST)
    assert status == 404 and body["error"]["type"] == "not_found" and "connection" not in headers
    assert after == 200 and closed


def test_a_head_cut_short_by_the_client_is_400_not_a_request(fake_server):
    """http.client treats EOF as the end of the headers: a half-closed, incomplete head must not be served."""
    fake = fake_server().start(FakeEngine())
    responses, closed = exchange(fake.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n", half_close=True)
    assert_refused(responses, closed)
    assert_serving(fake.port)


@pytest.mark.parametrize("path, shape", [("/rerank", "native"), ("/v1/rerank", "cohere")])
def test_superscript_timeout_header_is_400_in_the_route_dialect(fake_server, path, shape):
    fake = fake_server().start(FakeEngine())
    status, body, _ = request(fake.port, "POST", path, {"query": "q", "documents": ["a"]},
                              {"X-Request-Timeout-Ms": "\u00b9\u00b2"})
    error = body["error"] if shape == "native" else body
    assert status == 400 and error["type"] == "invalid_request" and error["field"] == "X-Request-Timeout-Ms"
    assert_serving(fake.port)


# ---------------------------------------------------------------------------------------------- timeouts


def trickle(port: int, head: bytes, drip: bytes, every_s: float = 0.3, limit_s: float = 4.0) -> tuple[bytes, float]:
    """Send `head`, then `drip` every `every_s` (each gap shorter than read_timeout_s, so only the total deadline
    can stop it) until the server answers or closes; returns (what it sent, seconds until then)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head)
        started = time.monotonic()
        s.settimeout(every_s)
        data = b""
        while time.monotonic() - started < limit_s:
            try:
                s.sendall(drip)
                chunk = s.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        return data, time.monotonic() - started


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank"])
def test_a_stalled_body_gets_408_before_the_close(fake_server, path):
    fake = fake_server("--read-timeout-s", "1").start(FakeEngine())
    data, elapsed = trickle(fake.port, post_head(b"100", path=path.encode()) + b"{", b" ")
    assert elapsed < 2.5
    [(status, headers, body)] = parse_responses(data)
    error = body["error"] if path == "/rerank" else body
    assert status == 408 and error["type"] == "request_timeout" and headers["connection"] == "close"
    assert_serving(fake.port)


def test_a_trickled_head_is_cut_off_at_read_timeout(fake_server):
    fake = fake_server("--read-timeout-s", "1").start(FakeEngine())
    data, elapsed = trickle(fake.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n")
    assert elapsed < 2.5
    [(status, headers, body)] = parse_responses(data)
    assert status == 408 and body["error"]["type"] == "request_timeout" and headers["connection"] == "close"
    assert_serving(fake.port)


@pytest.mark.parametrize("data", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello: no LF for a long while
    b"\x00",
    b"\x80\x2e\x01\x00\x02",  # an SSLv2-style hello
    b" GET /healthz HTTP/1.1",  # whitespace cannot begin a method
    b'{"query": "q"',  # a body without its request line
    b"\r\n\x16\x03\x01\x02\x00",  # after the empty line RFC 9112 allows: the next first byte is checked too
], ids=["tls", "nul", "sslv2", "space", "brace", "crlf_then_tls"])
def test_a_first_byte_that_cannot_begin_a_request_is_refused_at_once(fake_server, data):
    """A request line starts with its method, a token (or with an empty line): anything else is refused with 400
    and a close as soon as it arrives, not after read_timeout_s without an LF (issue 16)."""
    fake = fake_server("--read-timeout-s", "10").start(FakeEngine())
    started = time.monotonic()
    responses, closed = exchange(fake.port, data, timeout_s=8)
    assert time.monotonic() - started < 2
    assert "cannot begin a request" in assert_refused(responses, closed)
    assert_serving(fake.port)


def test_a_leading_empty_line_still_begins_a_request(fake_server):
    fake = fake_server().start(FakeEngine())
    for data in (b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
                 b"\nGET /healthz HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n"):
        responses, closed = exchange(fake.port, data)
        assert [r[0] for r in responses] == [200] and closed


def test_a_connection_that_never_speaks_is_closed_at_first_byte_timeout(fake_server):
    fake = fake_server("--first-byte-timeout-s", "1", "--idle-timeout-s", "5").start(FakeEngine())
    with socket.create_connection(("127.0.0.1", fake.port)) as silent:
        started = time.monotonic()
        data, closed = read_until_closed(silent, 4)
        assert data == b"" and closed and 0.8 < time.monotonic() - started < 2.5
    # a keep-alive connection that has been used keeps idle_timeout_s
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    try:
        assert request(fake.port, "GET", "/healthz", conn=conn)[0] == 200
        used = conn.sock
        time.sleep(1.6)  # deliberate: the used connection idles past first_byte_timeout_s (1 s), within idle's 5 s
        assert request(fake.port, "GET", "/healthz", conn=conn)[0] == 200 and conn.sock is used
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- size limits


def test_413_reaches_a_client_that_sends_the_whole_body_first(fake_server):
    fake = fake_server("--max-body-bytes", "1024").start(FakeEngine())
    body = b"x" * (8 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as s:
        s.sendall(post_head(str(len(body)).encode()) + body)  # a naive client: the whole body, then read
        raw, closed = read_until_closed(s, 10)
    [(status, headers, payload)] = parse_responses(raw)
    assert status == 413 and payload["error"]["type"] == "too_large" and headers["connection"] == "close"
    assert closed
    assert_serving(fake.port)


def test_expect_continue_is_answered_only_when_the_body_is_wanted(fake_server):
    fake = fake_server("--max-body-bytes", "1024").start(FakeEngine())
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as s:
        s.sendall(post_head(b"5000", b"Expect: 100-continue\r\n"))
        raw, closed = read_until_closed(s)
    [(status, _, _)] = parse_responses(raw)
    assert status == 413 and closed  # no "100 Continue" for a body that will be refused
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as s:
        s.sendall(post_head(str(len(BODY)).encode(), b"Expect: 100-continue\r\n"))
        assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(BODY)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


def test_the_header_block_is_capped_at_max_header_bytes(fake_server):
    fake = fake_server().start(FakeEngine())
    many = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(90))  # 90 KB in 91 lines
    message = assert_refused(*exchange(fake.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"), 431)
    assert "max_header_bytes" in message and "65536" in message
    assert_serving(fake.port)


def with_header_lines(count: int) -> bytes:
    """GET /healthz with exactly `count` header lines: Host, count - 2 others, Connection: close."""
    others = b"".join(b"X-Line-%d: v\r\n" % i for i in range(count - 2))
    return b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + others + b"Connection: close\r\n\r\n"


def test_100_header_lines_pass_and_101_are_431(fake_server):
    """SPEC: more than 100 header lines are refused. http.client counts the blank line too, so its limit refused
    exactly 100 (issue 16)."""
    fake = fake_server().start(FakeEngine())
    responses, closed = exchange(fake.port, with_header_lines(100))
    assert [r[0] for r in responses] == [200] and closed
    message = assert_refused(*exchange(fake.port, with_header_lines(101)), 431)
    assert "more than 100 header lines" in message
    assert_serving(fake.port)


def test_a_header_line_may_take_65536_bytes_with_its_crlf(fake_server):
    """The line limit http.client had, kept now that the header lines are read here."""
    fake = fake_server("--max-header-bytes", "200000").start(FakeEngine())
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    line = b"X-Long: " + b"v" * (65536 - 10) + b"\r\n"
    assert len(line) == 65536
    assert [r[0] for r in exchange(fake.port, head + line + b"\r\n")[0]] == [200]
    message = assert_refused(*exchange(fake.port, head + b"X" + line + b"\r\n"), 431)
    assert "65536" in message


def test_the_cap_answers_before_the_head_ends(fake_server):
    """Not buffered beyond the cap: the 431 comes as soon as it is crossed, with no blank line sent."""
    fake = fake_server("--max-header-bytes", "4096").start(FakeEngine())
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"v" * 5000 + b"\r\n")
        raw, closed = read_until_closed(s, 3)
    assert_refused(parse_responses(raw), closed, 431)
    assert_serving(fake.port)


def test_a_request_line_over_the_cap_is_414(fake_server):
    fake = fake_server("--max-header-bytes", "4096").start(FakeEngine())
    assert_refused(*exchange(fake.port, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"), 414)
    assert_serving(fake.port)


# ---------------------------------------------------------------------------------------------- connections


def test_idle_connections_do_not_lock_out_new_ones(fake_server):
    fake = fake_server("--max-connections", "4").start(FakeEngine())
    silent = [socket.create_connection(("127.0.0.1", fake.port)) for _ in range(4)]
    try:
        # they have had their chance to speak: each has waited EVICTABLE_AFTER_S for a request, as the server sees it
        wait_until(lambda: fake.srv.slots.evictable() == 4, 5, "the silent connections becoming evictable")
        for _ in range(3):
            started = time.monotonic()
            assert request(fake.port, "GET", "/healthz")[0] == 200
            assert time.monotonic() - started < 1.5
        assert_serving(fake.port)
        closed = 0
        for s in silent:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except TimeoutError:
                pass
        assert closed >= 3  # the ones that made room were closed, not left hanging
    finally:
        for s in silent:
            s.close()


def test_busy_connections_still_get_an_immediate_503_logged_and_counted(fake_server, caplog):
    from prometheus_client.parser import text_string_to_metric_families

    fake = fake_server("--max-connections", "2").start(FakeEngine())
    busy = [socket.create_connection(("127.0.0.1", fake.port)) for _ in range(2)]
    try:
        for s in busy:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # mid-request: never evicted
        wait_until(lambda: fake.srv.reaper.reading() == 2, 5, "the server reading both requests")
        time.sleep(EVICTABLE_AFTER_S + 0.2)  # not a race: older than the eviction window, only mid-request protects
        with caplog.at_level(logging.INFO, logger="openvino_reranker"):
            responses, closed = exchange(fake.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_refused(responses, closed, 503, "overloaded")
        assert any("status=503" in r.getMessage() and "max_connections" in r.getMessage() for r in caplog.records)
    finally:
        for s in busy:
            s.close()
    wait_until(lambda: fake.srv.slots.held == 0, 5, "the closed connections giving their slots back")
    status, text, _ = request(fake.port, "GET", "/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("openvino_reranker_requests_total", (("route", "other"), ("status", "503")))] == 1


def test_protocol_errors_are_logged_and_counted(fake_server, caplog):
    from prometheus_client.parser import text_string_to_metric_families

    fake = fake_server("--max-header-bytes", "4096").start(FakeEngine())
    cases = [
        (b"NONSENSE\r\n\r\n", 400),
        (b"BREW /rerank HTTP/1.1\r\nHost: x\r\n\r\n", 501),
        (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /healthz HTTP/0.9\r\n\r\n", 505),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"v" * 5000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    ]
    with caplog.at_level(logging.INFO, logger="openvino_reranker"):
        for data, status in cases:
            responses, _ = exchange(fake.port, data)
            assert [r[0] for r in responses] == [status]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    for _, status in cases:
        assert any(f"status={status}" in line for line in lines), (status, lines)
    assert all(len(line) < 600 for line in lines)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(request(fake.port, "GET", "/metrics")[1]) for s in f.samples}
    counted = {status: samples.get(("openvino_reranker_requests_total", (("route", "other"), ("status", str(status)))))
               for _, status in cases}
    assert counted == {400: 2, 501: 1, 505: 2, 414: 1, 431: 1}


def test_paths_are_capped_and_control_characters_never_logged(fake_server, caplog):
    fake = fake_server().start(FakeEngine())
    with caplog.at_level(logging.INFO, logger="openvino_reranker"):
        [(status, _, body)], _ = exchange(fake.port, b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 404 and len(body["error"]["message"]) < 400  # the message echoes the path, capped
        for target in (b"/\x1b[31mred", b"/\x9b31m", b"/\x85next"):  # a terminal escape; C1 controls
            [(status, _, body)], _ = exchange(fake.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 400 and "request line" in body["error"]["message"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert len(lines) == 4 and all(len(line) < 400 for line in lines)
    assert not any(c in line for line in lines for c in "\x1b\x9b\x85")
    assert_serving(fake.port)


PIECES = [b"GET ", b"POST ", b"HEAD ", b"/rerank", b"/healthz", b"/v1/rerank", b" HTTP/1.1", b" HTTP/1.0", b"\r\n",
          b"\n", b"\r", b"\x00", b"\x1c", b"\xa0", b"\xb2", b" ", b"\t", b":", b"Host: x", b"Content-Length: 2",
          b"Content-Length: 0", b"Transfer-Encoding: chunked", b"Transfer-Encoding:", b"Expect: 100-continue",
          b"Content-Type: application/json", b"Connection: close", b"{}", b"X-Request-Timeout-Ms: 5"]
heads = st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=6)), max_size=14).map(b"".join)


def test_any_bytes_get_json_answers_and_the_server_keeps_serving(fake_server):
    """Whatever follows a request line (then a half-close): JSON answers only, no 5xx but 501/505, a closed
    connection, and a server that still scores."""
    fake = fake_server("--read-timeout-s", "2").start(FakeEngine())

    @settings(max_examples=300, deadline=None)
    @given(head=heads)
    def check(head):
        responses, closed = exchange(fake.port, b"POST /rerank HTTP/1.1\r\n" + head, half_close=True)
        assert closed
        for status, headers, body in responses:
            assert status in (100, 501, 505) or 200 <= status < 500, (status, body)
            assert status == 100 or headers["content-type"] == "application/json"
        assert_serving(fake.port)

    check()


# ---------------------------------------------------------------------------------------------- client-gone probe


def _high_fd_pair() -> tuple[socket.socket, socket.socket]:
    """A TCP connection on loopback whose server end has a descriptor above FD_SETSIZE (1024), where select.select
    fails."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    high = fcntl.fcntl(accepted.fileno(), fcntl.F_DUPFD, 1500)
    accepted.close()
    return socket.socket(fileno=high), peer


def test_client_gone_probe_works_above_fd_1024_and_never_raises():
    server_end, peer = _high_fd_pair()
    assert server_end.fileno() > 1024
    try:
        assert peer_closed(server_end) is False  # connected, nothing sent
        peer.sendall(b"pipelined")
        server_end.settimeout(5)
        assert server_end.recv(9, socket.MSG_PEEK) == b"pipelined"  # arrived, and left unread
        assert peer_closed(server_end) is False  # data waiting is not a close
    finally:
        peer.close()
        server_end.close()
    assert peer_closed(server_end) is True  # our own end is closed (fileno() is -1): nothing can be sent

    server_end, peer = _high_fd_pair()
    peer.close()
    try:
        server_end.settimeout(5)
        assert server_end.recv(1, socket.MSG_PEEK) == b""  # the close has arrived
        assert peer_closed(server_end) is True
    finally:
        server_end.close()


def test_printable_escapes_and_caps():
    from openvino_reranker.framing import printable

    assert printable("/rerank") == "/rerank"
    assert printable("/a\x1b[31m\x85\u2028") == "/a\\x1b[31m\\x85\\u2028"
    shown = printable("\x9b" * 1000)
    assert "\x9b" not in shown and len(shown) < 240 and shown.endswith("(1000 characters)")
