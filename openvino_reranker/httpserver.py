"""HTTP: the routes (derived from the dialect table), the request handler and the server (connection bound,
slow-client reaper). Parsing, scoring and rendering are called from here, never done here."""

from __future__ import annotations

import hmac
import logging
import re
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
from .api import DIALECTS, NATIVE, Dialect, ResponseContext, decode_json, encode_json, render_healthz
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
from .service import RerankService

log = logging.getLogger("openvino_reranker")



JSON_TYPES = ("application/json",)


@dataclass(frozen=True)
class Route:
    method: str
    handler: str  # RerankHandler method, called with the route
    needs_key: bool  # with an API key set
    dialect: Dialect  # parses, renders and shapes errors (the native error shape for the non-scoring routes)


def build_routes(dialects: Sequence[Dialect]) -> dict[str, Route]:
    """The probes and /metrics, then one POST route per dialect path."""
    routes = {
        "/healthz": Route("GET", "route_healthz", False, NATIVE),
        "/readyz": Route("GET", "route_readyz", False, NATIVE),
        "/metrics": Route("GET", "route_metrics", True, NATIVE),
    }
    for dialect in dialects:
        for path in dialect.paths:
            if path in routes:
                raise ValueError(f"two routes for {path}")
            routes[path] = Route("POST", "route_score", dialect.needs_key, dialect)
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

    # ---- connection: idle and slow-client timeouts

    def handle_one_request(self):
        """Wait for a request's first byte for up to idle_timeout_s, then give the whole request (line, headers,
        body) read_timeout_s: past it the server's reaper shuts the socket, so a slow client cannot hold a thread."""
        config = self.server.config
        self.connection.settimeout(config.idle_timeout_s)
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:  # idle timeout, reset
            self.close_connection = True
            return
        self.connection.settimeout(config.read_timeout_s)
        self.server.watch_read(self, time.monotonic() + config.read_timeout_s)
        try:
            super().handle_one_request()
        finally:
            self.server.unwatch_read(self)

    # ---- dispatch

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _dispatch(self) -> None:
        service = self.server.service
        started = self._started = time.perf_counter()
        self._arrived = time.monotonic()  # deadlines count from here
        self._body_read = False
        self._status = 0
        self._log: dict[str, Any] = {}
        self.request_id = self._request_id()
        path = self.path.split("?", 1)[0]
        route = ROUTES.get(path)
        render_error = route.dialect.render_error if route else NATIVE.render_error
        service.in_flight.enter()
        try:
            if route is None:
                raise NotFoundError(f"no route {path}; routes: {', '.join(ROUTES)}")
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
            self._send_json(exc.status, render_error(exc), exc.headers)
        except Exception:  # a bug: log it, answer 500, keep serving
            log.exception("unhandled error on %s %s (request %s)", self.command, path, self.request_id)
            error = ServiceError("internal error; the server log has the details")
            self._send_json(error.status, render_error(error))
        finally:
            service.in_flight.leave()
            elapsed = time.perf_counter() - started
            service.metrics.observe_request(route_label(path), self._status, elapsed)
            extra = "".join(f" {k}={v}" for k, v in self._log.items())
            log.info("request id=%s method=%s route=%s status=%s ms=%.1f%s", self.request_id, self.command, path,
                     self._status, elapsed * 1000, extra)

    def _request_id(self) -> str:
        given = self.headers.get("X-Request-ID", "")
        return given if re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", given) else uuid.uuid4().hex

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
        if self.headers.get("Transfer-Encoding"):
            raise LengthRequiredError("chunked request bodies are not supported: send Content-Length",
                                      headers={"Connection": "close"})
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            raise LengthRequiredError("Content-Length is required", headers={"Connection": "close"})
        if not raw_length.strip().isdigit():
            raise BadRequestError(f"Content-Length {raw_length!r} is not a number", headers={"Connection": "close"})
        length = int(raw_length)
        limit = self.server.config.max_body_bytes
        if length > limit:
            raise PayloadTooLargeError(f"the body has {length} bytes; the limit (max_body_bytes) is {limit}",
                                       headers={"Connection": "close"})
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise RequestTimeoutError("timed out reading the request body",
                                      headers={"Connection": "close"}) from None
        except OSError:
            raise ClientGoneError("the connection closed while the body was read") from None
        if len(body) != length:
            raise RequestTimeoutError(f"the body ended after {len(body)} of {length} bytes (read_timeout_s is "
                                      f"{self.server.config.read_timeout_s})", headers={"Connection": "close"})
        self._body_read = True
        self.server.unwatch_read(self)
        if content_type not in JSON_TYPES:
            raise UnsupportedMediaTypeError(
                f"Content-Type must be application/json, not {content_type or 'missing'}")
        return decode_json(body)

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
                                  f"{raw[:40]!r}", "X-Request-Timeout-Ms") from None

    def _client_gone(self) -> bool:
        """True when the peer has closed: the socket is readable but holds no data."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    # ---- writing

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        headers = dict(headers or {})
        if self._body_pending() or self.server.service.draining:
            headers["Connection"] = "close"  # an unread body would be parsed as the next request
        self._status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Request-ID", self.request_id)
            for name, value in headers.items():
                self.send_header(name, value)
            if headers.get("Connection", "").lower() == "close":
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client went away while we answered
            self.close_connection = True

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        body = encode_json(payload)
        self._send(status, body, "application/json", headers)

    def _body_pending(self) -> bool:
        if self._body_read:
            return False
        length = (self.headers.get("Content-Length") or "0").strip()
        return bool(self.headers.get("Transfer-Encoding")) or not length.isdigit() or int(length) > 0


    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server before a route runs (bad request line, header limits, ...) as JSON."""
        self.request_id = getattr(self, "request_id", None) or uuid.uuid4().hex
        self._body_read = True  # nothing more is read: the connection closes after this answer
        error = HttpProtocolError(code, message or HTTPStatus(code).phrase)
        self.close_connection = True
        self._send_json(error.status, NATIVE.render_error(error), error.headers)

    def log_request(self, code="-", size="-"):
        pass  # one line per request is written by _dispatch

    def log_message(self, format, *args):
        log.debug("http: %s", (format % args).translate({c: None for c in range(32)}))

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
        request = route.dialect.parse(self._read_json(), service.limits)
        deadline = service.deadline(self._arrived, request.timeout_ms, self._header_timeout_ms())
        self._log["documents"] = len(request.documents)
        scored = service.score(request, deadline, self._client_gone)
        self._log.update(tokens=int(scored.lengths.sum()), queue_ms=f"{scored.queue_ms:.1f}",
                         tokenize_ms=f"{scored.tokenize_ms:.1f}", infer_ms=f"{scored.infer_ms:.1f}")
        context = ResponseContext(self.request_id, service.model_name, service.config.device,
                                  (time.perf_counter() - self._started) * 1000)
        self._send_json(200, route.dialect.render(request, scored, context))

class RerankServer(ThreadingHTTPServer):
    """The HTTP server plus two guards: a bound on open connections (beyond it: an immediate 503, no thread) and a
    reaper that shuts the socket of a request still being received after read_timeout_s (slow clients)."""

    daemon_threads = True  # idle keep-alive connections must not block shutdown
    request_queue_size = 128

    def __init__(self, address, service: RerankService):
        self.service = service
        self.config = service.config
        super().__init__(address, RerankHandler, bind_and_activate=False)
        self._slots = threading.BoundedSemaphore(service.config.max_connections)
        self._reading: dict[RerankHandler, float] = {}
        self._reading_lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._reap_slow_reads, daemon=True, name="slow-client-reaper").start()

    # ---- connection bound

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            _refuse_connection(request)
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

    # ---- slow clients

    def watch_read(self, handler: RerankHandler, deadline: float) -> None:
        with self._reading_lock:
            self._reading[handler] = deadline

    def unwatch_read(self, handler: RerankHandler) -> None:
        with self._reading_lock:
            self._reading.pop(handler, None)

    def _reap_slow_reads(self) -> None:
        while not self._closed.wait(0.25):
            now = time.monotonic()
            with self._reading_lock:
                expired = [h for h, deadline in self._reading.items() if deadline <= now]
                for handler in expired:
                    del self._reading[handler]
            for handler in expired:
                log.info("closing a connection from %s: request not received within %ss",
                         handler.client_address[0], self.config.read_timeout_s)
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def server_close(self):
        self._closed.set()
        super().server_close()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):  # resets, broken pipes, reaped slow clients
            log.debug("connection from %s ended: %s", client_address[0] if client_address else "?",
                      sys.exc_info()[1])
            return
        log.exception("connection error from %s", client_address[0] if client_address else "?")


_REFUSAL = encode_json(NATIVE.render_error(OverloadedError("too many open connections (max_connections); retry "
                                                           "shortly")))


def _refuse_connection(sock: socket.socket) -> None:
    """Answer a connection over max_connections without reading it or giving it a thread."""
    try:
        sock.settimeout(1.0)
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(_REFUSAL)).encode() + b"\r\n\r\n" + _REFUSAL)
    except OSError:
        pass
