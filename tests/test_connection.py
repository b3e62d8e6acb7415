"""The connection layer's pure pieces and its connection bound, without a server (the served behaviour is in
test_http_framing.py and test_hardening.py)."""

import socket

import pytest

from openvino_reranker.connection import (
    EVICTABLE_AFTER_S,
    ConnectionLimits,
    ConnectionSlots,
    head_refusal,
    response_head,
)
from openvino_reranker.errors import HttpProtocolError, RequestTimeoutError
from openvino_reranker.framing import parse_head, parse_headers, parse_request_line

LIMITS = ConnectionLimits(5, 30, 10, 65536, 1024, 4)


def test_response_head_is_a_status_line_fields_and_a_blank_line():
    assert response_head(100, []) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert response_head(503, [("Retry-After", "1")]) == b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\n"
    assert response_head(299, []) == b"HTTP/1.1 299 \r\n\r\n"  # no phrase for a status HTTPStatus does not know


@pytest.mark.parametrize("problem, in_request_line, reaped, status", [
    ("too_large", True, False, 414),
    ("too_large", False, False, 431),
    ("timeout", False, False, 408),
    ("ended", False, True, 408),  # the reaper's shutdown reads as the client's EOF
    ("ended", False, False, 400),
])
def test_a_head_that_did_not_arrive_whole(problem, in_request_line, reaped, status):
    error = head_refusal(problem, in_request_line, reaped, LIMITS)
    assert isinstance(error, (HttpProtocolError, RequestTimeoutError)) and error.status == status


def test_a_reset_head_gets_no_answer():
    assert head_refusal("reset", True, False, LIMITS) is None


def test_the_head_is_parsed_once_into_what_routes_read():
    line = parse_request_line(b"POST http://h.example:80//rerank?x=1 HTTP/1.1\r\n")
    headers = parse_headers([b"Host: other\r\n", b"Connection: TE, close\r\n", b"Expect: 100-continue \r\n",
                             b"Content-Length: 2\r\n"])
    head = parse_head(line, headers)
    assert head.path == "/rerank?x=1" and head.headers.get_all("host") == ["h.example:80"]
    assert head.http11 and not head.keep_alive and head.expect_continue and head.framing.content_length == 2


def test_a_malformed_line_is_kept_as_the_fault_and_the_lines_after_it_are_read():
    headers = parse_headers([b"Host: x\r\n", b"NoColon\r\n", b"X-Request-ID: rid\r\n"])
    assert headers.fault == "header line 2 has no colon" and headers.get("X-REQUEST-ID") == "rid"
    with pytest.raises(HttpProtocolError, match="no colon"):
        parse_head(parse_request_line(b"GET / HTTP/1.1\r\n"), headers)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Waiting:
    """What ConnectionSlots reads of an HttpConnection: its socket and its peer's address."""

    client_address = ("127.0.0.1", 1)

    def __init__(self):
        self.connection, self.peer = socket.socketpair()
        self.peer.settimeout(5)


def test_make_room_closes_the_longest_waiting_never_used_connection_first():
    clock = Clock()
    slots = ConnectionSlots(3, clock)
    used, fresh, newer = Waiting(), Waiting(), Waiting()
    slots.start_waiting(used, used=True)
    slots.start_waiting(fresh, used=False)
    clock.now += 0.5
    slots.start_waiting(newer, used=False)
    clock.now += EVICTABLE_AFTER_S - 0.25
    assert slots.evictable() == 2 and slots.make_room()  # `newer` has not waited long enough
    assert fresh.peer.recv(1) == b"" and not slots.stop_waiting(fresh)  # closed, and no longer waiting
    assert slots.make_room() and used.peer.recv(1) == b""  # then the idle keep-alive one
    assert not slots.make_room() and slots.stop_waiting(newer)
    for c in (used, fresh, newer):
        c.connection.close()
        c.peer.close()
