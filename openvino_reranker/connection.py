"""The HTTP/1.1 connection layer, which knows nothing of reranking. `HttpServer` bounds the open connections
(`ConnectionSlots`) and ends requests that arrive too slowly (`SlowReadReaper`); `HttpConnection` serves one
connection: it waits for each request's first byte, reads the head within read_timeout_s and has `framing` parse it
once, refuses what cannot be served, reads the body, writes the answers and closes with a linger. A subclass answers
the requests it accepts (`httpserver.RerankHandler`); http.server's request handler is not used."""

from __future__ import annotations

import email.utils
import logging
import select
import socket
import socketserver
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import ThreadingHTTPServer

from .config import Config
from .errors import (
    ClientGoneError,
    HttpProtocolError,
    LengthRequiredError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServiceError,
)
from .framing import (
    SHOWN_CHARS,
    Headers,
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

log = logging.getLogger("openvino_reranker")

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})  # any other is a 501
PYTHON_VERSION = "Python/" + sys.version.split()[0]  # after the software's name in the Server header
EVICTABLE_AFTER_S = 1.0  # at the bound, a connection that has waited this long for a request may make room
REAP_INTERVAL_S = 0.25  # how often the reaper looks for requests past read_timeout_s
LINGER_S = 2.0  # after a closing answer, how long the client's remaining bytes are read and discarded
LINGER_BYTES = 64 * 1024 * 1024  # ... and at most how many


@dataclass(frozen=True)
class ConnectionLimits:
    """The options the connection layer enforces (SPEC.md, "Deadlines, overload and disconnects")."""

    first_byte_timeout_s: float
    idle_timeout_s: float
    read_timeout_s: float
    max_header_bytes: int
    max_body_bytes: int
    max_connections: int

    @classmethod
    def from_config(cls, config: Config) -> ConnectionLimits:
        return cls(config.first_byte_timeout_s, config.idle_timeout_s, config.read_timeout_s, config.max_header_bytes,
                   config.max_body_bytes, config.max_connections)


# ---------------------------------------------------------------------------------------------- pure pieces


def head_refusal(problem: str, in_request_line: bool, reaped: bool, limits: ConnectionLimits) -> ServiceError | None:
    """What answers a head that did not arrive whole (HeadReader.problem); None when nobody is left to answer (a
    reset). A read the reaper ended looks like the client's EOF: it is a 408 all the same."""
    if problem == "reset":
        return None
    if problem == "too_large" and in_request_line:
        return HttpProtocolError(414, f"the request line is longer than max_header_bytes ({limits.max_header_bytes})")
    if problem == "too_large":
        return HttpProtocolError(431, f"the request line and headers exceed max_header_bytes "
                                      f"({limits.max_header_bytes} bytes)")
    if problem == "timeout" or reaped:
        return RequestTimeoutError(f"the request line and headers did not arrive within read_timeout_s "
                                   f"({limits.read_timeout_s})")
    return HttpProtocolError(400, "the connection ended before the request headers did")


def body_refusal(head: RequestHead, max_body_bytes: int) -> ServiceError | None:
    """Why the body cannot be read, before a byte of it is: only Content-Length framing, up to max_body_bytes."""
    if head.framing.chunked:
        return LengthRequiredError("chunked request bodies are not supported: send Content-Length",
                                   headers={"Connection": "close"})
    length = head.framing.content_length
    if length is None:
        return LengthRequiredError("Content-Length is required", headers={"Connection": "close"})
    if length > max_body_bytes:
        return PayloadTooLargeError(f"the body has {length} bytes; the limit (max_body_bytes) is {max_body_bytes}",
                                    headers={"Connection": "close"})
    return None


def response_head(status: int, fields: Iterable[tuple[str, str]]) -> bytes:
    """A status line (HTTP/1.1, whatever the request's 1.x), header lines and the blank line that ends them."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {status} {phrase}", *(f"{name}: {value}" for name, value in fields), "", ""]
    return "\r\n".join(lines).encode("latin-1")


# ---------------------------------------------------------------------------------------------- sockets


def peer_closed(sock: socket.socket) -> bool:
    """True when the peer has closed: its end is readable but holds no data. poll, not select.select, which fails
    for descriptors above 1024. Never raises: our own end closed (fileno -1) or an error on the socket (a reset)
    means gone; anything else unexpected means not gone, so the request runs on to its answer (at worst wasted
    work), where a wrong "gone" would drop a live client's request with no answer at all."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return True
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            return True
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    except Exception:
        log.debug("client-gone probe failed; assuming the client is still there", exc_info=True)
        return False


def shutdown_quietly(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:  # already closed or reset
        pass


def linger_close(sock: socket.socket) -> None:
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


def answer_overloaded(sock: socket.socket, request_id: str, body: bytes) -> None:
    """Answer a connection over max_connections without giving it a thread: a 503 with `body`, a half-close, and
    what has already arrived discarded without waiting (a close over unread input sends a reset)."""
    try:
        sock.settimeout(1.0)
        sock.sendall(response_head(503, [("Content-Type", "application/json"), ("Retry-After", "1"),
                                         ("Connection", "close"), ("X-Request-ID", request_id),
                                         ("Content-Length", str(len(body)))]) + body)
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        for _ in range(16):
            if not sock.recv(64 * 1024):
                break
    except OSError:  # BlockingIOError included: nothing more has arrived
        pass


# ---------------------------------------------------------------------------------------------- the guards


class ConnectionSlots:
    """At most `limit` open connections, each holding a slot (and a thread) until it closes. At the bound, the
    connection that has waited longest for a request is closed to make room, if it has waited at least
    EVICTABLE_AFTER_S (never-used connections first, then idle keep-alive ones), so that idle connections cannot lock
    out a client with a request to send. A connection in the middle of a request is never closed; a client whose
    idle keep-alive connection is closed retries on a new one, as after idle_timeout_s."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.held = 0  # slots in use
        self._free = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._waiting: dict[HttpConnection, tuple[bool, float]] = {}  # waiting for a request -> (used, since)

    def acquire(self) -> bool:
        """A slot for a new connection, made if need be (make_room; the closed connection's thread gives its slot
        back as it ends); False when there is none."""
        if not self._free.acquire(blocking=False) and not (self.make_room() and self._free.acquire(timeout=1.0)):
            return False
        with self._lock:
            self.held += 1
        return True

    def release(self) -> None:
        self._free.release()
        with self._lock:  # after the release: once `held` has dropped, the slot can be had
            self.held -= 1

    def start_waiting(self, connection: HttpConnection, used: bool) -> None:
        with self._lock:
            self._waiting[connection] = (used, self.clock())

    def stop_waiting(self, connection: HttpConnection) -> bool:
        """False when make_room closed the connection meanwhile."""
        with self._lock:
            return self._waiting.pop(connection, None) is not None

    def evictable(self) -> int:
        """How many connections make_room may close now."""
        with self._lock:
            return len(self._idle())

    def make_room(self) -> bool:
        """Close the connection that has waited longest for a request, if one may be closed (see the class)."""
        with self._lock:
            idle = self._idle()
            if not idle:
                return False
            _, _, connection = min(idle, key=lambda entry: entry[:2])
            del self._waiting[connection]
            shutdown_quietly(connection.connection, socket.SHUT_RDWR)
        log.debug("closed an idle connection from %s to make room (max_connections)", connection.client_address[0])
        return True

    def _idle(self) -> list[tuple[bool, float, HttpConnection]]:
        """(used, since, connection) of each connection that has waited EVICTABLE_AFTER_S; the lock is held."""
        now = self.clock()
        return [(used, since, c) for c, (used, since) in self._waiting.items() if now - since >= EVICTABLE_AFTER_S]


class SlowReadReaper:
    """Ends a request still being received read_timeout_s after it began, however it trickles: its socket is shut
    for reading only, so the blocked read returns EOF, and the connection, marked `reaped`, still answers 408 (with
    Connection: close) on the open write side."""

    def __init__(self, read_timeout_s: float):
        self.read_timeout_s = read_timeout_s
        self._lock = threading.Lock()
        self._deadlines: dict[HttpConnection, float] = {}  # a request being received -> its deadline
        self._stopped = threading.Event()
        threading.Thread(target=self._reap, daemon=True, name="slow-client-reaper").start()

    def watch(self, connection: HttpConnection) -> None:
        with self._lock:
            self._deadlines[connection] = time.monotonic() + self.read_timeout_s

    def unwatch(self, connection: HttpConnection) -> None:
        with self._lock:
            self._deadlines.pop(connection, None)

    def reading(self) -> int:
        """Requests being received."""
        with self._lock:
            return len(self._deadlines)

    def stop(self) -> None:
        self._stopped.set()

    def _reap(self) -> None:
        while not self._stopped.wait(REAP_INTERVAL_S):
            now = time.monotonic()
            with self._lock:  # under the lock: once unwatch returns, the connection's next request is safe
                expired = [c for c, deadline in self._deadlines.items() if deadline <= now]
                for connection in expired:
                    del self._deadlines[connection]
                    connection.reaped = True
                    shutdown_quietly(connection.connection, socket.SHUT_RD)
            for connection in expired:
                log.info("ending a request from %s: not received within read_timeout_s (%ss)",
                         connection.client_address[0], self.read_timeout_s)


# ---------------------------------------------------------------------------------------------- server, connection


class HttpServer(ThreadingHTTPServer, ABC):
    """A thread per connection (`handler_class`, an HttpConnection), within the guards: `slots` bounds the open
    connections (beyond the bound, `refuse_connection` answers at once, with no thread) and `reaper` ends requests
    that arrive too slowly. Bound and activated by the caller."""

    daemon_threads = True  # idle keep-alive connections must not block shutdown
    request_queue_size = 128

    def __init__(self, address, handler_class: type[HttpConnection], limits: ConnectionLimits):
        self.limits = limits
        super().__init__(address, handler_class, bind_and_activate=False)
        self.slots = ConnectionSlots(limits.max_connections)
        self.reaper = SlowReadReaper(limits.read_timeout_s)

    def process_request(self, request, client_address):
        if not self.slots.acquire():
            self.refuse_connection(request, client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    @abstractmethod
    def refuse_connection(self, sock: socket.socket, client_address) -> None:
        """A connection over max_connections: a subclass answers it (answer_overloaded), and logs and counts it."""

    def server_close(self):
        self.reaper.stop()
        super().server_close()

    def handle_error(self, request, client_address):
        peer = client_address[0] if client_address else "?"
        if isinstance(sys.exc_info()[1], OSError):  # resets, broken pipes, reaped slow clients
            log.debug("connection from %s ended: %s", peer, sys.exc_info()[1])
            return
        log.exception("connection error from %s", peer)


class HttpConnection(socketserver.StreamRequestHandler, ABC):
    """One client connection: its requests one after another (HTTP/1.1 keep-alive), each one's head read within
    read_timeout_s and parsed once by `framing`, refused here when it cannot be served, else given to `respond`.
    Every answer has an exact Content-Length and the request's X-Request-ID.

    A subclass answers: `respond(head)` (with `send` and `read_body`), `error_body(error, path)` for a refusal,
    `refused(error, path, elapsed_s)` to log and count one, and `draining()` to close every connection."""

    disable_nagle_algorithm = True  # an answer goes out at once, even behind an unacknowledged 100 Continue
    server_software = "http"  # the Server header's first word
    server: HttpServer

    def setup(self):
        super().setup()
        self.requests_begun = 0
        self.reaped = False  # set by the reaper when this request overran read_timeout_s
        self.linger = False  # a closing answer was sent: read what the client still sends before closing

    def handle(self):
        self.close_connection = False
        while not self.close_connection:
            self.serve_next_request()

    def finish(self):
        super().finish()
        if self.linger:
            linger_close(self.connection)

    def serve_next_request(self) -> None:
        """Wait for a request's first byte (first_byte_timeout_s on a new connection, idle_timeout_s between
        keep-alive requests), then give the whole request (line, headers, body) read_timeout_s: past it the reaper
        shuts the socket's read side, the read in progress ends, and the request is answered 408."""
        limits = self.server.limits
        self.close_connection = True  # unless the request keeps the connection open
        if not self.await_first_byte(limits.idle_timeout_s if self.requests_begun else limits.first_byte_timeout_s):
            return
        self.requests_begun += 1
        self.begin_request()
        self.connection.settimeout(limits.read_timeout_s)
        self.server.reaper.watch(self)
        try:
            head = self.read_head()
            if head is not None:
                self.respond(head)
        except TimeoutError:  # a write timed out: the client stopped reading
            self.close_connection = True
        finally:
            self.server.reaper.unwatch(self)

    def await_first_byte(self, timeout_s: float) -> bool:
        """True when a byte has arrived; False on timeout, EOF, a reset, or when the slots closed this waiting
        connection to make room for a new one."""
        self.server.slots.start_waiting(self, used=self.requests_begun > 0)
        arrived = False
        try:
            self.connection.settimeout(timeout_s)
            arrived = bool(self.rfile.peek(1))
        except OSError:  # timeout, reset, or shut down by make_room
            pass
        finally:
            still_ours = self.server.slots.stop_waiting(self)
        return arrived and still_ours

    def begin_request(self) -> None:
        """Per-request state: one HttpConnection serves every request of its connection."""
        self.began = time.perf_counter()
        self.request_id = uuid.uuid4().hex
        self.method = self.path = ""  # as far as the request line was parsed: refusals are shaped and logged by them
        self.head: RequestHead | None = None
        self.body_read = False
        self.status = 0
        self.reaped = False

    def read_head(self) -> RequestHead | None:
        """The request's head, read within max_header_bytes and parsed once; None when there is nothing more to do
        (the request was refused and answered, the client reset, or an empty line came where a request line
        belongs: RFC 9112 2.2 ignores it, some clients end a body with CRLF, and the next request gets its own wait)."""
        fault = first_byte_fault(self.rfile.peek(1)[:1])  # await_first_byte has seen it arrive: no wait
        if fault is not None:
            self.refuse(HttpProtocolError(400, fault))
            return None
        reader = HeadReader(self.rfile, self.server.limits.max_header_bytes)
        line = reader.readline()
        if reader.problem:
            self.refuse_head(reader.problem, in_request_line=True)
            return None
        if line in (b"\r\n", b"\n"):
            self.close_connection = False
            return None
        try:
            request_line = parse_request_line(line)
            self.method, self.path = request_line.method, request_line.target
            check_version(request_line)
            headers = parse_headers(reader.read_header_lines())
            if reader.problem:
                self.refuse_head(reader.problem, in_request_line=False)
                return None
            self.request_id = client_request_id(headers) or self.request_id  # the head is whole: the client's id
            head = self.head = parse_head(request_line, headers)
            self.path = head.path
            if head.method not in METHODS:
                raise HttpProtocolError(501, printable(f"unsupported method {head.method}", 2 * SHOWN_CHARS))
        except HttpProtocolError as exc:
            self.refuse(exc)
            return None
        self.close_connection = not head.keep_alive
        if not head.framing.has_body:
            self.server.reaper.unwatch(self)  # the whole request has arrived
        return head

    def refuse_head(self, problem: str, in_request_line: bool) -> None:
        error = head_refusal(problem, in_request_line, self.reaped, self.server.limits)
        if error is not None:
            self.refuse(error)

    def refuse(self, error: ServiceError) -> None:
        """Answer a request refused before `respond`, with Connection: close (what follows on the connection cannot
        be framed), in the error shape `error_body` gives for its path ("" when the request line was refused)."""
        path = self.path.split("?", 1)[0]
        self.close_connection = True
        self.send(error.status, self.error_body(error, path), "application/json",
                  {**error.headers, "Connection": "close"})
        self.refused(error, path, time.perf_counter() - self.began)

    @property
    def headers(self) -> Headers:
        return self.head.headers

    def read_body(self) -> bytes:
        """The request's body, whole (100 Continue first when the client waits for it): 411 and 413 before a byte
        is read (body_refusal), 408 when it does not arrive within read_timeout_s, ClientGoneError on a reset."""
        refusal = body_refusal(self.head, self.server.limits.max_body_bytes)
        if refusal is not None:
            raise refusal
        length = self.head.framing.content_length
        try:
            if self.head.expect_continue:
                self.wfile.write(response_head(100, []))
            body = self.rfile.read(length)
        except TimeoutError:
            raise RequestTimeoutError("timed out reading the request body", headers={"Connection": "close"}) from None
        except OSError:
            raise ClientGoneError("the connection closed while the body was read") from None
        if len(body) != length:  # EOF: the reaper ended the read at read_timeout_s, or the client stopped short
            raise RequestTimeoutError(f"the body ended after {len(body)} of {length} bytes (read_timeout_s is "
                                      f"{self.server.limits.read_timeout_s})", headers={"Connection": "close"})
        self.body_read = True
        self.server.reaper.unwatch(self)
        return body

    def client_gone(self) -> bool:
        """Whether the client has closed its connection (peer_closed). After the reaper's shutdown our own end reads
        as the peer's EOF: no telling, so the request runs on to its answer."""
        return not self.reaped and peer_closed(self.connection)

    def send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        """One answer, in one write. The server closes the connection, and lingers, when `headers` say so, a body is
        left unread (it would be parsed as the next request), the server is draining or the read was reaped. The
        answer says `Connection: close` then and to a client that asked to close, and `keep-alive` to an HTTP/1.0
        client that asked to keep the connection (it keeps it only when told so)."""
        head = self.head
        fields = {"Server": f"{self.server_software} {PYTHON_VERSION}", "Date": email.utils.formatdate(usegmt=True),
                  "Content-Type": content_type, "Content-Length": str(len(body)), "X-Request-ID": self.request_id,
                  **(headers or {})}
        closing = (fields.get("Connection", "").lower() == "close" or self.draining() or self.reaped
                   or (head is not None and head.framing.has_body and not self.body_read))
        if closing or self.close_connection:
            fields["Connection"] = "close"
        elif head is not None and not head.http11:
            fields["Connection"] = "keep-alive"
        self.status = status
        if closing:
            self.close_connection = self.linger = True
        try:
            data = response_head(status, fields.items())
            self.wfile.write(data if self.method == "HEAD" else data + body)
        except OSError:  # the client went away while we answered
            self.close_connection = True
            self.linger = False

    # ---- what a subclass provides

    @abstractmethod
    def respond(self, head: RequestHead) -> None:
        """Answer a request whose head was read whole and accepted."""

    @abstractmethod
    def error_body(self, error: ServiceError, path: str) -> bytes:
        """The JSON body of a refusal of a request to `path`."""

    def refused(self, error: ServiceError, path: str, elapsed_s: float) -> None:
        """A refusal has been answered: log and count it."""

    def draining(self) -> bool:
        """True while every answer is to close its connection (the server is shutting down)."""
        return False
