"""Image files to RGB pixels, within limits: an image document's bytes (PNG or JPEG) are decoded only after the file's
own header has shown that its pixels fit `max_pixels`, so a decompression bomb (a small file that declares a huge
image) costs its header, never its pixels. Pillow is the decoder; it is an optional dependency (the `vision` extra)
that only a vision-language model needs, imported when first used."""

from __future__ import annotations

import io

from .errors import EXIT_CONFIG, StartupError

VISION_EXTRA = "pip install 'openvino-reranker[vision]' (in a checkout: pip install '.[vision]')"
FORMATS = ("PNG", "JPEG")  # what decode_image opens; any other file is refused before a decoder sees it
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # an A4 page scanned at 600 dpi is 35 million (the option max_image_pixels)
MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


class ImageError(ValueError):
    """An image that cannot be served: `reason` says why in words (no content, no path); `too_large` when it is
    over a limit (a 413) rather than broken (a 400)."""

    def __init__(self, reason: str, too_large: bool = False):
        super().__init__(reason)
        self.reason, self.too_large = reason, too_large


def require_pillow(what: str) -> None:
    """A StartupError (exit 2) naming the extra when Pillow cannot be imported; `what` says who needs it."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        raise StartupError(f"{what} needs Pillow to decode images, which is not installed: {VISION_EXTRA}",
                           EXIT_CONFIG) from None


def image_format(data: bytes) -> str | None:
    """"PNG" or "JPEG" from the file's first bytes, or None."""
    return next((name for magic, name in MAGIC.items() if data.startswith(magic)), None)


def decode_image(data: bytes, max_pixels: int):
    """The image as a PIL RGB image. ImageError when it is not a PNG or JPEG file, declares more than `max_pixels`
    pixels (checked from its header, before any pixel is decoded), or is corrupt or truncated."""
    from PIL import Image, UnidentifiedImageError

    if image_format(data) is None:
        raise ImageError("not a PNG or JPEG file")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:  # reads the header only
            width, height = image.size
            if width < 1 or height < 1:
                raise ImageError(f"the image declares {width}x{height} pixels")
            if width * height > max_pixels:
                raise ImageError(f"the image declares {width}x{height} = {width * height} pixels, more than "
                                 f"max_image_pixels ({max_pixels})", too_large=True)
            image.load()  # a truncated or corrupt file raises here (LOAD_TRUNCATED_IMAGES stays False)
            return image.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS, fires in open()
        guard = Image.MAX_IMAGE_PIXELS * 2
        over = f"more than max_image_pixels ({max_pixels})" if max_pixels < guard else \
            f"more than Pillow's own limit, whatever max_image_pixels ({max_pixels}) allows"
        raise ImageError(f"the image declares more than {guard} pixels, {over}", too_large=True) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"the {image_format(data)} file is corrupt or truncated ({type(e).__name__})") from None
