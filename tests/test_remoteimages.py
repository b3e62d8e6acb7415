"""Image URLs fetched (remoteimages.ImageFetcher) from real HTTP servers on loopback: a page image, a silent server
and a trickling one (each within image_fetch_timeout_s, and the request's deadline), oversized files (declared and
streamed), a 404, redirects on and off the allow-list, a file that is not an image."""

from __future__ import annotations

import time

import pytest
from support.imagefiles import GIF, PNG, ImageServer, send

from openvino_reranker.errors import BadRequestError, DeadlineExceededError, PayloadTooLargeError
from openvino_reranker.remoteimages import ImageFetcher


@pytest.fixture
def images():
    server = ImageServer()
    other = ImageServer()  # "localhost": a host not on the allow-list

    def silent(h):  # the request arrives, no answer comes until the test ends
        server.release.wait(30)

    def trickle(h):  # headers at once, then one byte of a PNG every 0.1 s: every read is fast, the whole is not
        h.send_response(200)
        h.send_header("Content-Length", str(len(PNG)))
        h.end_headers()
        for byte in PNG:
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            if server.release.wait(0.1):  # time passing on purpose: this is what a trickling server does
                return

    def streamed_big(h):  # no Content-Length: the limit is found while reading
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(PNG + bytes(100_000))

    server.routes.update({
        "/page.png": lambda h: send(h, PNG, headers={"Content-Type": "text/plain"}),  # the type is not trusted
        "/chunked.png": lambda h: send(h, PNG, headers={"Connection": "close"}, length=False),
        "/animation.gif": lambda h: send(h, GIF, headers={"Content-Type": "image/png"}),
        "/big.png": lambda h: send(h, PNG + bytes(100_000)),
        "/streamed-big.png": streamed_big,
        "/silent.png": silent,
        "/trickle.png": trickle,
        "/in.png": lambda h: send(h, b"", 302, {"Location": "/page.png"}),
        "/out.png": lambda h: send(h, b"", 301, {"Location": other.url("/page.png", "localhost")}),
        "/ftp.png": lambda h: send(h, b"", 307, {"Location": "ftp://127.0.0.1/page.png"}),
        "/nowhere.png": lambda h: send(h, b"", 302),
        "/loop.png": lambda h: send(h, b"", 302, {"Location": "/loop.png"}),
        "/error.png": lambda h: send(h, b"{}", 500),
    })
    other.routes["/page.png"] = lambda h: send(h, PNG)
    server.other = other
    yield server
    server.close()
    other.close()


def fetcher(timeout_s: float = 5.0, max_bytes: int = 50_000) -> ImageFetcher:
    return ImageFetcher(("127.0.0.1",), timeout_s, max_bytes)


def test_a_page_image_is_fetched_whatever_its_content_type(images):
    assert fetcher().fetch(images.url("/page.png?x=1"), "documents[0].image") == PNG
    assert fetcher().fetch(images.url("/chunked.png"), "documents[0].image") == PNG
    assert images.requests == ["/page.png?x=1", "/chunked.png"]


def test_each_url_is_fetched_once_in_order(images):
    got = fetcher().fetch_all([(images.url("/page.png"), "documents[0].image"),
                               (images.url("/in.png"), "documents[1].image"),
                               (images.url("/page.png"), "documents[2].image")])
    assert set(got.values()) == {PNG} and images.requests == ["/page.png", "/in.png", "/page.png"]


@pytest.mark.parametrize("path, status, needle", [
    ("/missing.png", 400, "answered 404"),
    ("/error.png", 400, "answered 500"),
    ("/animation.gif", 400, "not a PNG or JPEG file"),
    ("/big.png", 413, "has 100067 bytes; the limit (max_image_bytes) is 50000"),
    ("/streamed-big.png", 413, "more than 50000 bytes; the limit (max_image_bytes) is 50000"),
    ("/ftp.png", 400, "redirected to not an http or https URL"),
    ("/nowhere.png", 400, "302 without a Location"),
    ("/loop.png", 400, "more than 3 redirects"),
])
def test_refusals_name_the_field(images, path, status, needle):
    expected = PayloadTooLargeError if status == 413 else BadRequestError
    with pytest.raises(expected) as info:
        fetcher().fetch(images.url(path), "documents[2].image")
    assert info.value.field == "documents[2].image" and info.value.status == status
    assert needle in info.value.message.replace(str(len(PNG) + 100_000), "100067")
    assert "127.0.0.1" in info.value.message or "redirect" in info.value.message


def test_a_redirect_off_the_allow_list_is_not_followed(images):
    with pytest.raises(BadRequestError) as info:
        fetcher().fetch(images.url("/out.png"), "documents[0].content[0].image_url.url")
    assert "redirected to a remote image URL (http://localhost) whose host is not in image_url_hosts" in \
        info.value.message
    assert images.other.requests == []  # never asked


def test_a_redirect_on_the_allow_list_is_followed(images):
    assert fetcher().fetch(images.url("/in.png"), "f") == PNG and images.requests == ["/in.png", "/page.png"]


@pytest.mark.parametrize("path", ["/silent.png", "/trickle.png"])
def test_a_slow_server_is_given_up_on_after_the_timeout(images, path):
    started = time.monotonic()
    with pytest.raises(BadRequestError) as info:
        fetcher(timeout_s=1).fetch(images.url(path), "documents[1].image")
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 3, elapsed  # the whole fetch is bounded, not each read
    assert info.value.field == "documents[1].image" and "longer than image_fetch_timeout_s (1 s)" in \
        info.value.message


def test_the_request_deadline_comes_first(images):
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        fetcher(timeout_s=30).fetch(images.url("/silent.png"), "documents[0].image", deadline=started + 0.5)
    assert time.monotonic() - started < 2.5
    with pytest.raises(DeadlineExceededError):  # already past: nothing is asked
        fetcher().fetch(images.url("/page.png"), "documents[0].image", deadline=time.monotonic() - 1)
    assert images.requests == ["/silent.png"]


def test_a_refused_connection_is_a_400(images):
    closed = ImageServer()
    closed.close()
    with pytest.raises(BadRequestError) as info:
        fetcher().fetch(closed.url("/page.png"), "documents[0].image")
    assert "fetching the image from 127.0.0.1 failed" in info.value.message
