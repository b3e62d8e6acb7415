"""Image documents sent as http(s) URLs: fetched only from the hosts of `image_url_hosts` (none by default: such a
document is refused while the body is parsed), and only once the whole body has been parsed, the model shown to take
images and the request admitted. Standard library only (http.client): no proxy, no cookies, no redirect followed
off the allow-list, each fetch within `image_fetch_timeout_s` and the request's deadline, and its body read in
pieces up to `max_image_bytes`, never further. Fetching arbitrary URLs from a server is an SSRF hole; the allow-list
is of host names as the URL spells them, so name only hosts you trust to resolve to what you mean."""

from __future__ import annotations

import http.client
import ssl
import time
from collections.abc import Callable, Sequence
from urllib.parse import urljoin, urlsplit

from . import __version__
from .api import image_url_refusal
from .errors import BadRequestError, ClientGoneError, DeadlineExceededError, PayloadTooLargeError
from .images import image_format

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
PIECE = 65536  # bytes read at a time, the deadline checked between reads


class ImageFetcher:
    def __init__(self, hosts: tuple[str, ...], timeout_s: float, max_bytes: int):
        self.hosts, self.timeout_s, self.max_bytes = hosts, timeout_s, max_bytes
        self._tls = ssl.create_default_context()

    def fetch_all(self, urls: Sequence[tuple[str, str]], deadline: float | None = None,
                  client_gone: Callable[[], bool] | None = None) -> dict[str, bytes]:
        """{url: the file's bytes} for (url, field) pairs, one at a time in order, each distinct URL once. The
        first failure raises, naming its field."""
        fetched: dict[str, bytes] = {}
        for url, field in urls:
            if url in fetched:
                continue
            if client_gone is not None and client_gone():
                raise ClientGoneError("the client closed the connection")
            fetched[url] = self.fetch(url, field, deadline)
        return fetched

    def fetch(self, url: str, field: str, deadline: float | None = None) -> bytes:
        """The file at `url` (200 only; redirects followed on the allow-list, at most MAX_REDIRECTS). 400 naming
        `field` when it cannot be had, 413 when it is over max_image_bytes, 504 when the request's deadline passes
        first."""
        started = time.monotonic()
        end = started + self.timeout_s
        if deadline is not None:
            end = min(end, deadline)
        for _ in range(MAX_REDIRECTS + 1):
            refusal = image_url_refusal(url, self.hosts)
            if refusal is not None:  # only a redirect gets here: the body's own URLs were checked when parsed
                raise BadRequestError(f"{field} was redirected to {refusal}", field)
            parts = urlsplit(url)
            host = parts.hostname or ""
            try:
                status, location, data = self._get(parts, host, field, end)
            except TimeoutError:
                if deadline is not None and end >= deadline and time.monotonic() >= deadline:
                    raise DeadlineExceededError("the request's deadline passed while its image URLs were "
                                                "fetched") from None
                raise BadRequestError(f"{field}: fetching the image from {host} took longer than "
                                      f"image_fetch_timeout_s ({self.timeout_s:g} s)", field) from None
            except (OSError, http.client.HTTPException) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                raise BadRequestError(f"{field}: fetching the image from {host} failed: {reason}", field) from None
            if status in REDIRECTS:
                if not location:
                    raise BadRequestError(f"{field}: {host} answered {status} without a Location", field)
                url = urljoin(url, location)
                continue
            if status != 200:
                raise BadRequestError(f"{field}: {host} answered {status} to the image's URL", field)
            if image_format(data) is None:  # the Content-Type is not trusted either
                raise BadRequestError(f"{field}: the file at {host} is not a PNG or JPEG file (from its first "
                                      f"bytes)", field)
            return data
        raise BadRequestError(f"{field}: more than {MAX_REDIRECTS} redirects", field)

    def _get(self, parts, host: str, field: str, end: float) -> tuple[int, str | None, bytes]:
        """One GET: (status, Location, body); the body only of a 200, read piece by piece with the time left as
        each read's timeout, so that neither a silent nor a trickling server outlasts `end`."""
        remaining = _left(end)
        if parts.scheme.lower() == "https":
            conn = http.client.HTTPSConnection(host, parts.port, timeout=remaining, context=self._tls)
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=remaining)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"User-Agent": f"openvino-reranker/{__version__}",
                                                 "Accept": "image/png, image/jpeg"})
            sock = conn.sock  # kept: http.client lets go of it once a response will close the connection
            response = conn.getresponse()
            if response.status != 200:
                return response.status, response.getheader("Location"), b""
            length = response.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
                raise PayloadTooLargeError(f"{field}: the image at {host} has {int(length)} bytes; the limit "
                                           f"(max_image_bytes) is {self.max_bytes}", field)
            data = bytearray()
            while True:
                sock.settimeout(_left(end))
                piece = response.read1(PIECE)
                if not piece:
                    return 200, None, bytes(data)
                data += piece
                if len(data) > self.max_bytes:
                    raise PayloadTooLargeError(f"{field}: the image at {host} has more than {self.max_bytes} bytes; "
                                               f"the limit (max_image_bytes) is {self.max_bytes}", field)
        finally:
            conn.close()


def _left(end: float) -> float:
    left = end - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
