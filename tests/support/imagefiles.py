"""Image documents for the tests: small PNG, JPEG and GIF files made with Pillow, their data: URLs and vLLM content
parts, and `ImageServer`, a loopback HTTP server whose paths each behave one way (for image URLs)."""

from __future__ import annotations

import base64
import http.server
import io
import threading

from PIL import Image


def image_file(fmt: str = "PNG", size=(6, 4), color=(200, 10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, fmt)
    return out.getvalue()


PNG, JPEG = image_file("PNG"), image_file("JPEG")
PNG64, JPEG64 = base64.b64encode(PNG).decode(), base64.b64encode(JPEG).decode()
GIF = b"GIF89a" + bytes(40)


def data_url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


class ImageServer:
    """A loopback HTTP server whose paths each behave one way; `requests` records every path asked for, and
    `release` ends every handler that waits (the silent and trickling ones)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.requests: list[str] = []
        self.release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.requests.append(self.path)
                route = owner.routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                route(self)

        self.routes = {}
        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def send(handler, body: bytes, status: int = 200, headers: dict | None = None, length: bool = True):
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
