"""HTTP: the routes (derived from the dialect table), the request handler and the server (connection bound,
slow-client reaper). Parsing, scoring and rendering are called from here, never done here; the request head is
read and checked with `framing`: http.server's own parser is not used."""

from __future__ import annotations

import hmac
import logging
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import __version__
from .api import (
    DIALECTS,
    NATIVE,
    Dialect,
    ResponseContext,
    decode_json,
    dialect_for,
    encode_json,
    render_healthz,
)
from .config import TIMEOUT_MS
from .errors import (
    BadRequestError,
    ClientGoneError,
    HttpProtocolError,
    LengthRequiredError,
    MethodNotAllowedError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServiceError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from .framing import (
    SHOWN_CHARS,
    HeadReader,
    RequestHead,
    check_version,
    client_request_id,
    first_byte_fault,
    parse_head,
    parse_headers,
    parse_request_line,
    printable,
)
from .service import RerankService

log = logging.getLogger("openvino_reranker")


JSON_TYPES = ("application/json",)

EVICTABLE_AFTER_S = 1.0  # at the bound, a connection that has waited this long for a request may make room
LINGER_S = 2.0  # after a closing answer, how long the client's remaining bytes are read and discarded
LINGER_BYTES = 64 * 1024 * 1024  # ... and at most how many


@dataclass(frozen=True)
class Route:
    method: str
    handler: str  # RerankHandler method, called with the route
    needs_key: bool  # with an API key set
    dialect: Dialect  # the default: shapes errors before a body is decoded (native for the non-scoring routes)
    dialects: tuple[Dialect, ...] = ()  # a scoring route's dialects, tried in order on the decoded body


def build_routes(dialects: Sequence[Dialect]) -> dict[str, Route]:
    """The probes and /metrics, then one POST route per dialect path; dialects that share a path are tried in
    table order (Dialect.matches), and the one that matches any body is the path's default and comes last."""
    routes = {
        "/healthz": Route("GET", "route_healthz", False, NATIVE),
        "/readyz": Route("GET", "route_readyz", False, NATIVE),
        "/metrics": Route("GET", "route_metrics", True, NATIVE),
    }
    shared: dict[str, list[Dialect]] = {}
    for dialect in dialects:
        for path in dialect.paths:
            if path in routes:
                raise ValueError(f"{path} is not a scoring route")
            shared.setdefault(path, []).append(dialect)
    for path, group in shared.items():
        defaults = [d for d in group if d.matches is None]
        if len(defaults) != 1 or group[-1].matches is not None:
            raise ValueError(f"{path} needs exactly one default dialect (matches=None), listed last")
        if len({d.needs_key for d in group}) != 1:
            raise ValueError(f"the dialects of {path} disagree on needs_key")
        routes[path] = Route("POST", "route_score", group[-1].needs_key, group[-1], tuple(group))
    return routes


ROUTES = build_routes(DIALECTS)


def route_label(path: str) -> str:
    """The metrics' and logs' name for a path: the route, or "other" (a client's path never becomes a label)."""
    return path if path in ROUTES else "other"


class RerankHandler(BaseHTTPRequestHandler):
    """Routes: see ROUTES. Every answer, errors included, is JSON (Prometheus text on /metrics) with an exact
    Content-Length, over HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # a garbled request line still gets a status line and headers, not 0.9
    server_version = f"openvino-reranker/{__version__}"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid the 40 ms delayed-ACK stall
    server: RerankServer

    # ---- connection: first-byte, idle and slow-client timeouts

    def setup(self):
        super().setup()
        self.requests_begun = 0
        self.reaped = False  # set by the server's reaper when this request overran read_timeout_s
        self._linger = False  # a closing answer was sent: read what the client still sends before closing

    def handle_one_request(self):
        """Wait for a request's first byte (first_byte_timeout_s on a new connection, idle_timeout_s between
        keep-alive requests), then give the whole request (line, headers, body) read_timeout_s: past it the
        server's reaper shuts the socket's read side, the read in progress ends, and the request is answered 408."""
        config = self.server.config
        wait_s = config.idle_timeout_s if self.requests_begun else config.first_byte_timeout_s
        if not self._await_first_byte(wait_s):
            self.close_connection = True
            return
        self.requests_begun += 1
        self._begin_request()
        self.connection.settimeout(config.read_timeout_s)
        self.server.watch_read(self, time.monotonic() + config.read_timeout_s)
        try:
            self._handle_request()
        except TimeoutError:  # a write timed out: the client stopped reading
            self.close_connection = True
        finally:
            self.server.unwatch_read(self)

    def _await_first_byte(self, timeout_s: float) -> bool:
        """True when a byte has arrived; False on timeout, EOF, a reset, or when the server closed this waiting
        connection to make room for a new one (RerankServer.make_room)."""
        self.server.start_waiting(self, used=self.requests_begun > 0)
        arrived = False
        try:
            self.connection.settimeout(timeout_s)
            arrived = bool(self.rfile.peek(1))
        except OSError:  # timeout, reset, or shut down by make_room
            pass
        finally:
            still_ours = self.server.stop_waiting(self)
        return arrived and still_ours

    def _begin_request(self) -> None:
        """Per-request state: the handler object serves every request of its connection."""
        self._began = time.perf_counter()
        self.request_id = uuid.uuid4().hex
        self.command, self.path, self.requestline = None, "", ""
        self.request_version = self.default_request_version
        self._head: RequestHead | None = None
        self._body_read = False
        self._status = 0
        self.reaped = False

    def _handle_request(self) -> None:
        """http.server's handle_one_request: the first byte checked, then the request line and headers read
        through a HeadReader."""
        fault = first_byte_fault(self.rfile.peek(1)[:1])  # _await_first_byte has seen it arrive: no wait
        if fault is not None:
            self._refuse(HttpProtocolError(400, fault))
            return
        reader = HeadReader(self.rfile, self.server.config.max_header_bytes)
        line = reader.readline()
        if reader.problem:
            self._refuse_head(reader, in_request_line=True)
            return
        if line in (b"\r\n", b"\n"):
            # RFC 9112 2.2: an empty line where a request line belongs is ignored (some clients end a body with
            # CRLF); the next request gets its own wait
            self.close_connection = False
            return
        if not self._read_head(reader, line):
            return
        getattr(self, f"do_{self.command}")()
        self.wfile.flush()

    def _read_head(self, reader: HeadReader, line: bytes) -> bool:
        """The request line and the header lines read through the HeadReader and parsed once by `framing`. False
        when the request was refused (and answered)."""
        try:
            request_line = parse_request_line(line)
            self.command, self.path = request_line.method, request_line.target
            check_version(request_line)
            headers = parse_headers(reader.read_header_lines())
            if reader.problem:
                self._refuse_head(reader, in_request_line=False)
                return False
            # the head has been read whole: from here on every answer, refusals included, carries the client's own id
            self.request_id = client_request_id(headers) or self.request_id
            head = self._head = parse_head(request_line, headers)
            self.path, self.headers = head.path, head.headers
            self.request_version = "HTTP/1.1" if head.http11 else "HTTP/1.0"
            if not hasattr(self, f"do_{head.method}"):
                raise HttpProtocolError(501, printable(f"unsupported method {head.method}", 2 * SHOWN_CHARS))
        except HttpProtocolError as exc:
            self._refuse(exc)
            return False
        self.close_connection = not head.keep_alive
        return True

    def _refuse_head(self, head: HeadReader, in_request_line: bool) -> None:
        limit = self.server.config.max_header_bytes
        if head.problem == "reset":  # nobody left to answer
            self.close_connection = True
        elif head.problem == "too_large" and in_request_line:
            self._refuse(HttpProtocolError(414, f"the request line is longer than max_header_bytes ({limit})"))
        elif head.problem == "too_large":
            self._refuse(HttpProtocolError(431, f"the request line and headers exceed max_header_bytes ({limit} "
                                                f"bytes)"))
        elif head.problem == "timeout" or self.reaped:
            self._refuse(RequestTimeoutError(f"the request line and headers did not arrive within read_timeout_s "
                                             f"({self.server.config.read_timeout_s})"))
        else:
            self._refuse(HttpProtocolError(400, "the connection ended before the request headers did"))

    def _refuse(self, error: ServiceError) -> None:
        """Answer a request refused before it reached a route with Connection: close (what follows on the
        connection cannot be framed): in the error shape of the route its request line named (a Cohere client still
        finds `message`), else the native one. Logged like a request and counted as route "other"."""
        path = self.path.split("?", 1)[0]  # "" until http.server has parsed the request line
        route = ROUTES.get(path)
        render_error = route.dialect.render_error if route else NATIVE.render_error
        self.close_connection = True
        self._send_json(error.status, render_error(error), {**error.headers, "Connection": "close"})
        elapsed = time.perf_counter() - self._began
        self.server.service.metrics.observe_request("other", error.status, elapsed)
        log.info("request id=%s method=%s route=%s status=%s ms=%.1f error=%s", self.request_id,
                 self.command or "-", printable(path) or "-", error.status, elapsed * 1000,
                 printable(error.message, 2 * SHOWN_CHARS))

    def finish(self):
        super().finish()
        if self._linger:
            _linger_close(self.connection)

    # ---- dispatch

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _dispatch(self) -> None:
        service = self.server.service
        started = self._started = time.perf_counter()
        self._arrived = time.monotonic()  # deadlines count from here
        self._log: dict[str, Any] = {}
        path = self.path.split("?", 1)[0]
        route = ROUTES.get(path)
        self._dialect = route.dialect if route else NATIVE  # route_score narrows it once the body is decoded
        service.in_flight.enter()
        try:
            if route is None:
                raise NotFoundError(f"no route {printable(path)}; routes: {', '.join(ROUTES)}")
            if self.command != route.method:
                raise MethodNotAllowedError(f"{self.command} is not allowed on {path}; use {route.method}",
                                            headers={"Allow": route.method})
            if route.needs_key:
                self._check_auth()
            if self.command != "POST":
                self.server.unwatch_read(self)  # the whole request has arrived
            getattr(self, route.handler)(route)
        except ClientGoneError:
            self._status = 499
            self.close_connection = True
        except ServiceError as exc:
            self._send_json(exc.status, self._dialect.render_error(exc), exc.headers)
        except Exception:  # a bug: log it, answer 500, keep serving
            log.exception("unhandled error on %s %s (request %s)", self.command, printable(path), self.request_id)
            error = ServiceError("internal error; the server log has the details")
            self._send_json(error.status, self._dialect.render_error(error))
        finally:
            service.in_flight.leave()
            elapsed = time.perf_counter() - started
            service.metrics.observe_request(route_label(path), self._status, elapsed)
            extra = "".join(f" {k}={v}" for k, v in self._log.items())
            log.info("request id=%s method=%s route=%s status=%s ms=%.1f%s", self.request_id, self.command,
                     printable(path), self._status, elapsed * 1000, extra)

    def _check_auth(self) -> None:
        key = self.server.service.api_key
        if not key:
            return
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise UnauthorizedError("a valid 'Authorization: Bearer <key>' header is required",
                                    headers={"WWW-Authenticate": 'Bearer realm="openvino-reranker"'})

    # ---- reading

    def _read_json(self) -> Any:
        framing = self._head.framing
        if framing.chunked:
            raise LengthRequiredError("chunked request bodies are not supported: send Content-Length",
                                      headers={"Connection": "close"})
        length = framing.content_length
        if length is None:
            raise LengthRequiredError("Content-Length is required", headers={"Connection": "close"})
        limit = self.server.config.max_body_bytes
        if length > limit:
            raise PayloadTooLargeError(f"the body has {length} bytes; the limit (max_body_bytes) is {limit}",
                                       headers={"Connection": "close"})
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        try:
            self._send_continue()
            body = self.rfile.read(length)
        except TimeoutError:
            raise RequestTimeoutError("timed out reading the request body",
                                      headers={"Connection": "close"}) from None
        except OSError:
            raise ClientGoneError("the connection closed while the body was read") from None
        if len(body) != length:  # EOF: the reaper ended the read at read_timeout_s, or the client stopped short
            raise RequestTimeoutError(f"the body ended after {len(body)} of {length} bytes (read_timeout_s is "
                                      f"{self.server.config.read_timeout_s})", headers={"Connection": "close"})
        self._body_read = True
        self.server.unwatch_read(self)
        if content_type not in JSON_TYPES:
            raise UnsupportedMediaTypeError(
                f"Content-Type must be application/json, not {content_type or 'missing'}")
        return decode_json(body)

    def _send_continue(self) -> None:
        # Expect: 100-continue is answered here, once the body is wanted: a request refused from its headers (401,
        # 411, 413, ...) gets its final answer instead, and its client need not send the body
        if self._head.expect_continue:
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()

    def _header_timeout_ms(self) -> int | None:
        """X-Request-Timeout-Ms, parsed by the same bound as the body's timeout_ms (a bad one is a 400 even when
        the body has timeout_ms)."""
        raw = self.headers.get("X-Request-Timeout-Ms")
        if raw is None:
            return None
        try:
            return TIMEOUT_MS.parse_text(raw)
        except ValueError:
            raise BadRequestError(f"X-Request-Timeout-Ms must be an integer {TIMEOUT_MS.lo}..{TIMEOUT_MS.hi}, not "
                                  f"{printable(raw, 40)!r}", "X-Request-Timeout-Ms") from None

    def _client_gone(self) -> bool:
        """True when the peer has closed: its end is readable but holds no data. poll, not select.select, which
        fails for descriptors above 1024. Never raises: our own end closed (fileno -1) or an error on the socket
        (a reset) means gone; anything else unexpected means not gone, so the request runs on to its answer (at
        worst wasted work), where a wrong "gone" would drop a live client's request with no answer at all."""
        if self.reaped:  # our own SHUT_RD reads as the peer's EOF: no telling, so the request is answered
            return False
        try:
            fd = self.connection.fileno()
            if fd < 0:
                return True
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            events = poller.poll(0)
            if not events:
                return False
            if events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                return True
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        except Exception:
            log.debug("client-gone probe failed; assuming the client is still there", exc_info=True)
            return False

    # ---- writing

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        headers = dict(headers or {})
        if self._body_pending() or self.server.service.draining or self.reaped:
            headers["Connection"] = "close"  # an unread body would be parsed as the next request
        closing = headers.get("Connection", "").lower() == "close"  # the server closes: linger for what follows
        if not closing and self.close_connection:  # the client's close option, or HTTP/1.0 without keep-alive
            headers["Connection"] = "close"
        elif not closing and self.request_version == "HTTP/1.0":
            headers["Connection"] = "keep-alive"  # an HTTP/1.0 client keeps the connection only when told so
        self._status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Request-ID", self.request_id)
            for name, value in headers.items():
                self.send_header(name, value)
            if closing:
                self.close_connection = True
                self._linger = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client went away while we answered
            self.close_connection = True
            self._linger = False

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        body = encode_json(payload)
        self._send(status, body, "application/json", headers)

    def _body_pending(self) -> bool:
        """Body bytes may follow the head unread: the connection must close after the answer."""
        return self._head is not None and self._head.framing.has_body and not self._body_read

    def log_request(self, code="-", size="-"):
        pass  # one line per request is written by _dispatch (or _refuse)

    def log_message(self, format, *args):
        log.debug("http: %s", printable(format % args, 2 * SHOWN_CHARS))

    # ---- routes

    def route_healthz(self, route: Route) -> None:
        self._send_json(200, render_healthz(__version__))

    def route_readyz(self, route: Route) -> None:
        ready, body = self.server.service.readyz()
        self._send_json(200 if ready else 503, body, {} if ready else {"Retry-After": "1"})

    def route_metrics(self, route: Route) -> None:
        body = self.server.service.render_metrics().encode("utf-8")
        self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def route_score(self, route: Route) -> None:
        """parse -> score (the service owns readiness, admission, deadline and bookkeeping) -> render."""
        service = self.server.service
        body = self._read_json()
        dialect = self._dialect = dialect_for(route.dialects, body)
        request = dialect.parse(body, service.limits)
        deadline = service.deadline(self._arrived, request.timeout_ms, self._header_timeout_ms())
        self._log["documents"] = len(request.documents)
        cache_control = (self.headers.get("Cache-Control") or "").lower()
        use_cache = "no-cache" not in cache_control and "no-store" not in cache_control
        scored = service.score(request, deadline, self._client_gone, use_cache)
        self._log.update(tokens=int(scored.lengths.sum()), queue_ms=f"{scored.queue_ms:.1f}",
                         tokenize_ms=f"{scored.tokenize_ms:.1f}", infer_ms=f"{scored.infer_ms:.1f}")
        context = ResponseContext(self.request_id, service.model_name, service.config.device,
                                  (time.perf_counter() - self._started) * 1000)
        self._send_json(200, dialect.render(request, scored, context))


class RerankServer(ThreadingHTTPServer):
    """The HTTP server plus its connection guards: a bound on open connections (beyond it a connection idle for
    EVICTABLE_AFTER_S is closed to make room, else an immediate 503 and no thread), and a reaper that ends a
    request still being received after read_timeout_s (slow clients)."""

    daemon_threads = True  # idle keep-alive connections must not block shutdown
    request_queue_size = 128

    def __init__(self, address, service: RerankService):
        self.service = service
        self.config = service.config
        super().__init__(address, RerankHandler, bind_and_activate=False)
        self._slots = threading.BoundedSemaphore(service.config.max_connections)
        self._lock = threading.Lock()  # guards both tables
        self._reading: dict[RerankHandler, float] = {}  # a request being received -> its deadline
        self._waiting: dict[RerankHandler, tuple[bool, float]] = {}  # waiting for a request -> (used, since)
        self._closed = threading.Event()
        threading.Thread(target=self._reap_slow_reads, daemon=True, name="slow-client-reaper").start()

    # ---- connection bound

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False) and not (self.make_room() and self._slots.acquire(timeout=1.0)):
            self._refuse_connection(request, client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def start_waiting(self, handler: RerankHandler, used: bool) -> None:
        with self._lock:
            self._waiting[handler] = (used, time.monotonic())

    def stop_waiting(self, handler: RerankHandler) -> bool:
        """False when make_room closed the connection meanwhile."""
        with self._lock:
            return self._waiting.pop(handler, None) is not None

    def make_room(self) -> bool:
        """At the bound: close the connection that has waited longest for a request, if it has waited at least
        EVICTABLE_AFTER_S (never-used connections first, then idle keep-alive ones), so that idle connections cannot
        lock out a client with a request to send. A connection in the middle of a request is never closed; a
        client whose idle keep-alive connection is closed retries on a new one, as after idle_timeout_s."""
        now = time.monotonic()
        with self._lock:
            idle = [(used, since, handler) for handler, (used, since) in self._waiting.items()
                    if now - since >= EVICTABLE_AFTER_S]
            if not idle:
                return False
            _, _, handler = min(idle, key=lambda entry: entry[:2])
            del self._waiting[handler]
            _shutdown(handler.connection, socket.SHUT_RDWR)
        log.debug("closed an idle connection from %s to make room (max_connections)", handler.client_address[0])
        return True

    def _refuse_connection(self, sock: socket.socket, client_address) -> None:
        """Logged and counted (route "other", 503) before the answer goes out, so that they are never behind it."""
        request_id = uuid.uuid4().hex
        self.service.metrics.observe_request("other", 503, 0.0)
        log.info("request id=%s method=- route=- status=503 ms=0.0 error=connection from %s refused: "
                 "max_connections (%s) open and none idle", request_id,
                 client_address[0] if client_address else "?", self.config.max_connections)
        _refuse_connection(sock, request_id)

    # ---- slow clients

    def watch_read(self, handler: RerankHandler, deadline: float) -> None:
        with self._lock:
            self._reading[handler] = deadline

    def unwatch_read(self, handler: RerankHandler) -> None:
        with self._lock:
            self._reading.pop(handler, None)

    def _reap_slow_reads(self) -> None:
        """Past its deadline, a request's socket is shut for reading only: the blocked read returns EOF and the
        handler still answers 408 (with Connection: close) on the open write side."""
        while not self._closed.wait(0.25):
            now = time.monotonic()
            with self._lock:  # under the lock: once unwatch_read returns, the handler's next request is safe
                expired = [h for h, deadline in self._reading.items() if deadline <= now]
                for handler in expired:
                    del self._reading[handler]
                    handler.reaped = True
                    _shutdown(handler.connection, socket.SHUT_RD)
            for handler in expired:
                log.info("ending a request from %s: not received within read_timeout_s (%ss)",
                         handler.client_address[0], self.config.read_timeout_s)

    def server_close(self):
        self._closed.set()
        super().server_close()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):  # resets, broken pipes, reaped slow clients
            log.debug("connection from %s ended: %s", client_address[0] if client_address else "?",
                      sys.exc_info()[1])
            return
        log.exception("connection error from %s", client_address[0] if client_address else "?")


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:  # already closed or reset
        pass


def _linger_close(sock: socket.socket) -> None:
    """Half-close, then read and discard what the client still sends for up to LINGER_S or LINGER_BYTES (the
    lingering close of Apache and nginx). Closing over unread input makes the kernel answer the client's next
    bytes with a reset: a client still writing a refused body (413, or 401 before the body) then fails on the
    reset instead of reading the answer."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_S
        left = LINGER_BYTES
        buffer = bytearray(64 * 1024)
        while left > 0 and (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            received = sock.recv_into(buffer)
            if not received:
                break
            left -= received
    except OSError:
        pass


_REFUSAL = encode_json(NATIVE.render_error(OverloadedError("too many open connections (max_connections); retry "
                                                           "shortly")))


def _refuse_connection(sock: socket.socket, request_id: str) -> None:
    """Answer a connection over max_connections without giving it a thread: the answer, a half-close, and what
    has already arrived discarded without waiting (a close over unread input sends a reset)."""
    try:
        sock.settimeout(1.0)
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                     b"Connection: close\r\nX-Request-ID: " + request_id.encode() + b"\r\nContent-Length: "
                     + str(len(_REFUSAL)).encode() + b"\r\n\r\n" + _REFUSAL)
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        for _ in range(16):
            if not sock.recv(64 * 1024):
                break
    except OSError:  # BlockingIOError included: nothing more has arrived
        pass
