"""HTTP routes over the connection layer: the route table (derived from the dialect table), the handler (dispatch,
the API key, the four routes) and the server. The connection layer (`connection`) reads, parses and refuses requests
and writes answers; parsing, scoring and rendering are called from here, never done here."""

from __future__ import annotations

import hmac
import logging
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import __version__
from .api import decode_json, encode_json
from .config import TIMEOUT_MS
from .connection import ConnectionLimits, HttpConnection, HttpServer, answer_overloaded
from .dialects import DIALECTS, NATIVE, Dialect, ResponseContext, dialect_for, render_healthz
from .errors import (
    BadRequestError,
    ClientGoneError,
    MethodNotAllowedError,
    NotFoundError,
    OverloadedError,
    ServiceError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from .framing import SHOWN_CHARS, RequestHead, printable
from .service import RerankService

log = logging.getLogger("openvino_reranker")


JSON_TYPES = ("application/json",)


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


class RerankHandler(HttpConnection):
    """Routes: see ROUTES. Every answer, errors included, is JSON (Prometheus text on /metrics), over HTTP/1.1
    keep-alive (connection.HttpConnection)."""

    server_software = f"openvino-reranker/{__version__}"
    server: RerankServer

    def respond(self, head: RequestHead) -> None:
        """The route, its method and API key, then the route itself; one log line and one count per request."""
        service = self.server.service
        started = self._started = time.perf_counter()
        self._arrived = time.monotonic()  # deadlines count from here
        self._log: dict[str, Any] = {}
        path = head.path.split("?", 1)[0]
        route = ROUTES.get(path)
        self._dialect = route.dialect if route else NATIVE  # route_score narrows it once the body is decoded
        service.in_flight.enter()
        try:
            if route is None:
                raise NotFoundError(f"no route {printable(path)}; routes: {', '.join(ROUTES)}")
            if head.method != route.method:
                raise MethodNotAllowedError(f"{head.method} is not allowed on {path}; use {route.method}",
                                            headers={"Allow": route.method})
            if route.needs_key:
                self._check_auth()
            getattr(self, route.handler)(route)
        except ClientGoneError:
            self.status = 499
            self.close_connection = True
        except ServiceError as exc:
            self.send_json(exc.status, self._dialect.render_error(exc), exc.headers)
        except Exception:  # a bug: log it, answer 500, keep serving
            log.exception("unhandled error on %s %s (request %s)", head.method, printable(path), self.request_id)
            error = ServiceError("internal error; the server log has the details")
            self.send_json(error.status, self._dialect.render_error(error))
        finally:
            service.in_flight.leave()
            elapsed = time.perf_counter() - started
            service.metrics.observe_request(route_label(path), self.status, elapsed)
            extra = "".join(f" {k}={v}" for k, v in self._log.items())
            log.info("request id=%s method=%s route=%s status=%s ms=%.1f%s", self.request_id, head.method,
                     printable(path), self.status, elapsed * 1000, extra)

    def error_body(self, error: ServiceError, path: str) -> bytes:
        """A refusal in the error shape of the route its request line named (a Cohere client still finds
        `message`), else the native one."""
        route = ROUTES.get(path)
        return encode_json((route.dialect if route else NATIVE).render_error(error))

    def refused(self, error: ServiceError, path: str, elapsed_s: float) -> None:
        """Logged like a request and counted as route "other"."""
        self.server.service.metrics.observe_request("other", error.status, elapsed_s)
        log.info("request id=%s method=%s route=%s status=%s ms=%.1f error=%s", self.request_id, self.method or "-",
                 printable(path) or "-", error.status, elapsed_s * 1000, printable(error.message, 2 * SHOWN_CHARS))

    def draining(self) -> bool:
        return self.server.service.draining

    def send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self.send(status, encode_json(payload), "application/json", headers)

    def _check_auth(self) -> None:
        key = self.server.service.api_key
        if not key:
            return
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise UnauthorizedError("a valid 'Authorization: Bearer <key>' header is required",
                                    headers={"WWW-Authenticate": 'Bearer realm="openvino-reranker"'})

    def _read_json(self) -> Any:
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        body = self.read_body()
        if content_type not in JSON_TYPES:
            raise UnsupportedMediaTypeError(f"Content-Type must be application/json, not {content_type or 'missing'}")
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
                                  f"{printable(raw, 40)!r}", "X-Request-Timeout-Ms") from None

    # ---- routes

    def route_healthz(self, route: Route) -> None:
        self.send_json(200, render_healthz(__version__))

    def route_readyz(self, route: Route) -> None:
        ready, body = self.server.service.readyz()
        self.send_json(200 if ready else 503, body, {} if ready else {"Retry-After": "1"})

    def route_metrics(self, route: Route) -> None:
        body = self.server.service.render_metrics().encode("utf-8")
        self.send(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def route_score(self, route: Route) -> None:
        """parse -> score (the service owns readiness, admission, deadline and bookkeeping) -> render."""
        service = self.server.service
        body = self._read_json()
        dialect = self._dialect = dialect_for(route.dialects, body)
        request = dialect.parse(body, service.limits)
        deadline = service.deadline(self._arrived, request.timeout_ms, self._header_timeout_ms())
        self._log["documents"] = len(request.documents)
        images = sum(d.is_image for d in request.documents)
        if images:
            self._log["images"] = images  # counted, never shown: no image data or URL reaches the log
        cache_control = (self.headers.get("Cache-Control") or "").lower()
        use_cache = "no-cache" not in cache_control and "no-store" not in cache_control
        request = service.fetch_images(request, deadline, self.client_gone)
        scored = service.score(request, deadline, self.client_gone, use_cache)
        self._log.update(tokens=int(scored.lengths.sum()), queue_ms=f"{scored.queue_ms:.1f}",
                         tokenize_ms=f"{scored.tokenize_ms:.1f}", infer_ms=f"{scored.infer_ms:.1f}")
        context = ResponseContext(self.request_id, service.model_name, service.config.device,
                                  (time.perf_counter() - self._started) * 1000)
        self.send_json(200, dialect.render(request, scored, context))


OVERLOADED_BODY = encode_json(NATIVE.render_error(OverloadedError("too many open connections (max_connections); "
                                                                  "retry shortly")))


class RerankServer(HttpServer):
    """RerankHandler's server: a RerankService behind the connection layer's guards (connection.HttpServer)."""

    def __init__(self, address, service: RerankService):
        self.service = service
        super().__init__(address, RerankHandler, ConnectionLimits.from_config(service.config))

    def refuse_connection(self, sock: socket.socket, client_address) -> None:
        """Logged and counted (route "other", 503) before the answer goes out, so that they are never behind it."""
        request_id = uuid.uuid4().hex
        self.service.metrics.observe_request("other", 503, 0.0)
        log.info("request id=%s method=- route=- status=503 ms=0.0 error=connection from %s refused: "
                 "max_connections (%s) open and none idle", request_id,
                 client_address[0] if client_address else "?", self.limits.max_connections)
        answer_overloaded(sock, request_id, OVERLOADED_BODY)
