"""HTTP on loopback for the tests: one request through http.client (`request`), and requests as raw bytes on a
socket with the response as it came (`http_bytes`, `send_raw`, `RawResponse`)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import NamedTuple


def request(port: int, method: str, path: str, body=None, headers: dict | None = None, conn=None):
    """One HTTP request; returns (status, parsed JSON body or None, headers)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        hdrs = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        is_json = (resp.getheader("Content-Type") or "").startswith("application/json")
        payload = (json.loads(raw) if is_json else raw.decode()) if raw else None
        return resp.status, payload, resp
    finally:
        if own:
            conn.close()


class RawResponse(NamedTuple):
    """One response as it came off the socket: status, headers (names lower-cased), the body's raw bytes."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body) if self.body else None

    def text(self) -> str:
        return self.body.decode()


def http_bytes(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    """A request as raw bytes: HTTP/1.1, a Host header, Content-Length when there is a body, then `headers`."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def send_raw(port: int, data: bytes, timeout_s: float = 30.0, method: str = "GET") -> RawResponse:
    """Send `data` as is on a new connection and read one response (`method`: the one sent, for HEAD's sake)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        resp = http.client.HTTPResponse(s, method=method)
        resp.begin()
        body = resp.read()
        return RawResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
