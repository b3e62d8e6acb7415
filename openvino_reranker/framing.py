"""HTTP/1.1 framing, checked on the raw bytes: the request head is read (`HeadReader`) and parsed once
(`parse_request_line`, `parse_headers`, `parse_head`) into what the connection and the routes read of it
(`RequestHead`: the method, the path, one header map, the body's framing, keep-alive), refusing every head a proxy in
front could read differently. http.client's own header parser drops a line without a colon (and every header after
it), folds obs-fold lines, takes EOF for the end of the headers, has no bound on their total size and counts the
blank line among its 100 headers, and `str.isdigit()` accepts lengths `int()` refuses: none of it is used here."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import HttpProtocolError

# RFC 9110/9112 grammar, on the raw bytes. A token is a method or a header name; a header value is visible ASCII,
# obs-text (0x80-0xff), space and tab: any other control character (a bare CR, NUL, \x1c) is refused. The target
# is visible ASCII: http.server splits the line with str.split(), which also splits at \x1c-\x1f, \x85 and \xa0.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
REQUEST_LINE_RE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r?\n")  # an ASCII target
HEADER_LINE_RE = re.compile(rb"(" + _TOKEN + rb"):([\t\x20-\x7e\x80-\xff]*)\r?\n")
TOKEN_RE = re.compile(_TOKEN)
CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,18}")  # ASCII digits only: '²' passes str.isdigit() and fails int()
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # an X-Request-ID echoed as sent
# An absolute-form request target (RFC 9112 3.2.2): scheme://authority then the path and query, no fragment. The
# authority's host is an IP literal in brackets or a reg-name / IPv4 address (RFC 3986 3.2.2), then an optional port.
ABSOLUTE_FORM_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^#]*)")
AUTHORITY_RE = re.compile(r"(\[[0-9A-Za-z:._~!$&'()*+,;=-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]+)(:[0-9]*)?")

SHOWN_CHARS = 200  # client-sent text (a path) shown in a log line or an error message
MAX_HEADER_LINES = 100  # header lines in one request; more are a 431
MAX_HEADER_LINE_BYTES = 65536  # one header line, its line end included; longer is a 431


def first_byte_fault(first: bytes) -> str | None:
    """Why no request can begin with the byte `first`, else None. A request line begins with its method, a token
    (RFC 9110 5.6.2), and an empty line may come before it (RFC 9112 2.2): any other byte (a TLS handshake's 0x16,
    NUL, whitespace, a JSON body) is refused as soon as it arrives, not after read_timeout_s without an LF."""
    if first in (b"\r", b"\n") or TOKEN_RE.fullmatch(first):
        return None
    hint = " (a TLS handshake? This port speaks plain HTTP)" if first == b"\x16" else ""
    return f"the byte 0x{first[0]:02x} cannot begin a request: a request line begins with a method, a token{hint}"


@dataclass(frozen=True)
class RequestLine:
    """`METHOD target HTTP/major.minor`, as sent."""

    method: str
    target: str
    major: int
    minor: int


def parse_request_line(line: bytes) -> RequestLine:
    """The request line, or a 400: single spaces, a token method, a visible-ASCII target, HTTP/digit.digit."""
    m = REQUEST_LINE_RE.fullmatch(line)
    if m is None:
        raise HttpProtocolError(400, "malformed request line (expected: METHOD /path HTTP/1.1, single spaces, an "
                                     "ASCII path)")
    method, target, major, minor = (part.decode("ascii") for part in m.groups())
    return RequestLine(method, target, int(major), int(minor))


def check_version(line: RequestLine) -> None:
    """A 505 for any version but HTTP/1.x: an HTTP/0.9 answer would be a bare body, no status line, no headers."""
    if line.major != 1:
        raise HttpProtocolError(505, f"HTTP/{line.major}.{line.minor} is not supported: HTTP/1.0 and HTTP/1.1 only")


def printable(text: str, limit: int = SHOWN_CHARS) -> str:
    """Client-sent text as logs and messages show it: control and non-ASCII characters escaped (a terminal escape
    or a forged log line does not get through), at most about `limit` characters."""
    shown = "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii") for c in text[:limit])
    if len(shown) > limit or len(text) > limit:
        return f"{shown[:limit]}...({len(text)} characters)"
    return shown


@dataclass(frozen=True)
class RequestTarget:
    """The request target as routes see it, and the host an absolute-form target names."""

    path: str  # the path and query (origin-form, or an absolute-form's), or "*"
    host: str | None = None  # an absolute-form target's authority: it replaces the Host header for the request


def parse_target(target: str, method: str) -> RequestTarget:
    """The request target's form (RFC 9112 3.2): origin-form `/path?query`; absolute-form
    `http://host[:port]/path?query`, which a server must accept, the scheme in any case, its host replacing the
    Host header as nginx does (the host is not compared with this server's names: no Host is, and nginx's default
    server serves any); asterisk-form `*` for OPTIONS. A 400 for anything else: an `https://` target (this port
    speaks plain HTTP), another scheme, userinfo (RFC 9110 4.2.4), an empty or malformed host, a fragment, an
    authority-form target (CONNECT's), `*` with another method."""
    if target.startswith("/"):
        return RequestTarget(target)
    if target == "*":
        if method != "OPTIONS":
            raise HttpProtocolError(400, f"the request target * (asterisk-form) is for OPTIONS only, not {method}")
        return RequestTarget(target)
    absolute = ABSOLUTE_FORM_RE.fullmatch(target)
    if absolute is None:
        raise HttpProtocolError(400, f"malformed request target {printable(target, 80)!r} (expected /path or "
                                     f"http://host/path)")
    scheme, authority, path = absolute.groups()
    if scheme.lower() == "https":
        raise HttpProtocolError(400, "an https:// request target on a plain-HTTP connection: this port does not "
                                     "speak TLS (send /path, or http://host/path)")
    if scheme.lower() != "http":
        raise HttpProtocolError(400, f"the request target's scheme is {printable(scheme, 20)!r}: only http:// is "
                                     f"served")
    if "@" in authority:
        raise HttpProtocolError(400, "the request target has userinfo (user@host), which an http URI must not have")
    if not AUTHORITY_RE.fullmatch(authority):
        raise HttpProtocolError(400, f"the request target's host {printable(authority, 80)!r} is empty or malformed "
                                     f"(expected host or host:port)")
    return RequestTarget(path if path.startswith("/") else "/" + path, authority)


@dataclass(frozen=True)
class Headers:
    """The header lines as one map, parsed once: a lower-cased name -> its values in order, each without the spaces
    and tabs around it. A line that is not `name: value` is left out and the first one's fault kept in `fault`
    (read_framing refuses it), so that the request's own id is still found in the lines after it."""

    fields: Mapping[str, tuple[str, ...]]
    fault: str = ""  # what is wrong with the first malformed line, "" when there is none

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header `name` (any case), else `default`."""
        values = self.fields.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return list(self.fields.get(name.lower(), ()))

    def replaced(self, name: str, value: str) -> Headers:
        return Headers({**self.fields, name.lower(): (value,)}, self.fault)


def parse_headers(lines: Sequence[bytes]) -> Headers:
    """The header lines (the blank line that ends them excluded) as a Headers map."""
    fields: dict[str, list[str]] = {}
    fault = ""
    for number, line in enumerate(lines, 1):
        m = HEADER_LINE_RE.fullmatch(line)
        if m is None:
            fault = fault or f"header line {number} {_line_fault(line)}"
            continue
        fields.setdefault(m.group(1).decode("ascii").lower(), []).append(m.group(2).decode("latin-1").strip(" \t"))
    return Headers({name: tuple(values) for name, values in fields.items()}, fault)


@dataclass(frozen=True)
class Framing:
    """How the body is delimited."""

    content_length: int | None
    chunked: bool  # a Transfer-Encoding was sent (refused with 411 where a body is read)

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def read_framing(headers: Headers, http11: bool) -> Framing:
    """The body's framing, refusing (400) every header block a proxy in front could read differently (RFC 9112,
    sections 3.2, 5 and 6.3): a line that is not `name: value`, a control character in a value, Content-Length
    given more than once (even with the same value: one rule, no guessing which copy a proxy used) or not plain
    ASCII digits, an empty Transfer-Encoding, and on HTTP/1.1 a missing or repeated Host."""
    if headers.fault:
        raise HttpProtocolError(400, headers.fault)
    lengths = headers.get_all("content-length")
    if len(lengths) > 1:
        raise HttpProtocolError(400, "Content-Length is given more than once")
    if lengths and not CONTENT_LENGTH_RE.fullmatch(lengths[0]):
        raise HttpProtocolError(400, f"Content-Length {printable(lengths[0], 40)!r} is not a number of bytes "
                                     f"(1 to 18 ASCII digits)")
    encodings = headers.get_all("transfer-encoding")
    if any(not value for value in encodings):
        raise HttpProtocolError(400, "an empty Transfer-Encoding header")
    hosts = len(headers.get_all("host"))
    if hosts > 1 or (http11 and hosts == 0):
        raise HttpProtocolError(400, f"an HTTP/1.1 request needs exactly one Host header, not {hosts}")
    return Framing(int(lengths[0]) if lengths else None, bool(encodings))


def client_request_id(headers: Headers) -> str | None:
    """The request's own X-Request-ID (the first, if sent more than once) when it is 1-128 characters of
    A-Za-z0-9._:-, else None. Found even when another header line is malformed, so that the refusal of such a head
    still echoes it (http.server's parser loses every header after a line without a colon)."""
    value = headers.get("x-request-id")
    return value if value is not None and REQUEST_ID_RE.fullmatch(value) else None


def connection_options(values: Sequence[str]) -> frozenset[str]:
    """The options of the Connection header lines `values`: each a comma-separated list of tokens, compared
    case-insensitively (RFC 9110 7.6.1; empty list elements are allowed and ignored)."""
    return frozenset(option.strip(" \t").lower() for value in values for option in value.split(",")) - {""}


def keeps_alive(http11: bool, options: frozenset[str]) -> bool:
    """Whether the connection persists after the answer (RFC 9112 9.3): never with a `close` option anywhere; on
    HTTP/1.1 by default; on HTTP/1.0 only with a `keep-alive` option."""
    return "close" not in options and (http11 or "keep-alive" in options)


@dataclass(frozen=True)
class RequestHead:
    """A request head read whole and accepted: what the connection and the routes read of it."""

    method: str
    path: str  # the path and query (an absolute-form target's; a leading "//" made "/"), or "*"
    http11: bool  # HTTP/1.1 or a later 1.x; False: HTTP/1.0
    headers: Headers  # with an absolute-form target's host as Host
    framing: Framing
    keep_alive: bool  # the client lets the connection persist after the answer (the server may still close it)
    expect_continue: bool  # the client waits for 100 Continue before it sends the body


def parse_head(line: RequestLine, headers: Headers) -> RequestHead:
    """The head of a request whose line and headers arrived whole: its framing checked first (read_framing), then
    its target (parse_target); an HttpProtocolError (400) for either."""
    http11 = line.minor != 0
    framing = read_framing(headers, http11)
    target = parse_target(line.target, line.method)
    if target.host is not None:  # absolute-form: its host replaces Host for the request (RFC 9112 3.2.2)
        headers = headers.replaced("Host", target.host)
    path = "/" + target.path.lstrip("/") if target.path.startswith("//") else target.path  # as http.server (gh-87389)
    alive = keeps_alive(http11, connection_options(headers.get_all("Connection")))
    expect_continue = http11 and (headers.get("Expect") or "").lower() == "100-continue"
    return RequestHead(line.method, path, http11, headers, framing, alive, expect_continue)


def _line_fault(line: bytes) -> str:
    """What is wrong with a header line HEADER_LINE_RE refused."""
    if line[:1] in (b" ", b"\t"):
        return "starts with whitespace (obs-fold line folding is not accepted)"
    name, colon, _ = line.partition(b":")
    if not colon:
        return "has no colon"
    if not TOKEN_RE.fullmatch(name):
        return "has a malformed name (whitespace before the colon?)"
    return "contains a control character (a bare CR, NUL, ...)"


class HeadReader:
    """Reads the request line and the header lines from rfile. Keeps each raw line for parse_headers, reads at most
    `budget` bytes in all (a line is not buffered past it), and turns EOF, a timeout or a reset before the blank
    line into `problem` and an empty line, where http.client would take EOF for the end of a complete head."""

    def __init__(self, rfile, budget: int):
        self.rfile = rfile
        self.budget = budget
        self.lines: list[bytes] = []
        self.problem = ""  # "too_large", "ended" (EOF mid-line), "timeout" or "reset"

    def readline(self, limit: int = -1) -> bytes:
        if self.problem:
            return b""
        want = self.budget + 1 if limit < 0 else min(limit, self.budget + 1)
        try:
            line = self.rfile.readline(want)
        except TimeoutError:
            self.problem = "timeout"
            return b""
        except OSError:
            self.problem = "reset"
            return b""
        self.budget -= len(line)
        if self.budget < 0:
            self.problem = "too_large"
            return b""
        if len(line) == limit:  # the caller's line limit reached: read_header_lines refuses it (431)
            return line
        if not line.endswith(b"\n"):
            self.problem = "ended"
            return b""
        self.lines.append(line)
        return line

    def read_header_lines(self) -> list[bytes]:
        """The header lines after the request line, up to the blank line (which is not returned). More than
        MAX_HEADER_LINES lines or a line over MAX_HEADER_LINE_BYTES is a 431. When the head did not arrive whole,
        `problem` is set and what arrived is returned."""
        start = len(self.lines)
        while True:
            line = self.readline(MAX_HEADER_LINE_BYTES + 1)
            if self.problem:
                return self.lines[start:]
            if len(line) > MAX_HEADER_LINE_BYTES:
                raise HttpProtocolError(431, f"a header line is longer than {MAX_HEADER_LINE_BYTES} bytes")
            if line in (b"\r\n", b"\n"):
                return self.lines[start:-1]
            if len(self.lines) - start > MAX_HEADER_LINES:
                raise HttpProtocolError(431, f"more than {MAX_HEADER_LINES} header lines")
