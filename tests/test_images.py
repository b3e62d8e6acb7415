"""images.decode_image: PNG and JPEG to RGB; a bomb refused from its header; anything else an ImageError."""

import io
import time

import pytest
from PIL import Image

from openvino_reranker.errors import StartupError
from openvino_reranker.images import ImageError, decode_image, image_format, require_pillow
from openvino_reranker.scoring import ImageDocument


def noisy(fmt: str) -> bytes:
    """A 64x64 image of noise: its compressed pixels fill the file, so cutting the file cuts pixels."""
    out = io.BytesIO()
    Image.frombytes("RGB", (64, 64), bytes((i * 7919) % 251 for i in range(64 * 64 * 3))).save(out, fmt)
    return out.getvalue()


def encoded(mode: str, size: tuple[int, int], fmt: str, color=(10, 20, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 7).save(out, fmt)
    return out.getvalue()


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGB", "JPEG"), ("L", "JPEG")])
def test_decodes_to_rgb(mode, fmt):
    image = decode_image(encoded(mode, (40, 30), fmt), max_pixels=1200)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_rgba_png_drops_alpha():
    data = encoded("RGB", (4, 4), "PNG")
    with Image.open(io.BytesIO(data)) as im:
        out = io.BytesIO()
        im.convert("RGBA").save(out, "PNG")
    assert decode_image(out.getvalue(), 100).getpixel((0, 0)) == (10, 20, 30)


def test_over_the_pixel_limit_is_too_large():
    with pytest.raises(ImageError) as e:
        decode_image(encoded("RGB", (40, 30), "PNG"), max_pixels=1199)
    assert e.value.too_large and "40x30" in e.value.reason and "max_image_pixels (1199)" in e.value.reason


def test_a_bomb_costs_its_header_only():
    bomb = encoded("L", (30000, 30000), "PNG")  # 900 megapixels in well under a megabyte
    assert len(bomb) < 1_000_000
    start = time.process_time()
    with pytest.raises(ImageError) as e:
        decode_image(bomb, max_pixels=50_000_000)
    assert e.value.too_large and time.process_time() - start < 0.5  # decoding it would take seconds and 900 MB


def test_pillows_own_bomb_guard_is_too_large_too():
    bomb = encoded("1", (20000, 20000), "PNG")  # 400 megapixels: over twice Pillow's MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as e:
        decode_image(bomb, max_pixels=10**12)
    assert e.value.too_large and "Pillow's own limit" in e.value.reason  # not "more than max_image_pixels"
    with pytest.raises(ImageError) as e:
        decode_image(bomb, max_pixels=50_000_000)
    assert e.value.too_large and "more than max_image_pixels (50000000)" in e.value.reason


@pytest.mark.parametrize("data,reason", [
    (b"GIF89a....", "not a PNG or JPEG"),
    (b"", "not a PNG or JPEG"),
    (noisy("JPEG")[:len(noisy("JPEG")) // 2], "corrupt or truncated"),
    (noisy("PNG")[:len(noisy("PNG")) // 2], "corrupt or truncated"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "corrupt or truncated"),
])
def test_broken_files(data, reason):
    with pytest.raises(ImageError) as e:
        decode_image(data, max_pixels=10**6)
    assert reason in e.value.reason and not e.value.too_large


def test_image_format():
    assert image_format(encoded("RGB", (2, 2), "PNG")) == "PNG"
    assert image_format(encoded("RGB", (2, 2), "JPEG")) == "JPEG"
    assert image_format(b"BM....") is None


def test_require_pillow_names_the_extra(monkeypatch):
    require_pillow("the model")  # installed here
    import sys
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(StartupError) as e:
        require_pillow("the model x/y")
    assert "[vision]" in str(e.value) and "x/y" in str(e.value) and e.value.exit_code == 2


def test_image_document_is_its_digest_and_text():
    png = encoded("RGB", (3, 3), "PNG")
    a, b = ImageDocument(png, "t"), ImageDocument(bytes(bytearray(png)), "t")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != ImageDocument(png, "u") and a != ImageDocument(encoded("RGB", (3, 3), "PNG", (1, 1, 1)), "t")
    assert a != "t" and str(len(png)) in repr(a) and png.hex()[:16] not in repr(a)
