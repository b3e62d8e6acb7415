"""A page image to the vision encoder's input, as nvidia/llama-nemotron-rerank-vl-1b-v2's own processor prepares it
(its remote code, `processing_llama_nemotron_vl.py`: `dynamic_preprocess` and `build_transform`): the image cut into
square tiles on the grid whose aspect ratio fits it best (at most `max_input_tiles` tiles), plus a thumbnail of the
whole image when there is more than one tile; each tile resized with Pillow's bicubic filter, scaled to 0..1 and
normalised with SigLIP's mean and std (0.5). Kept as uint8 tiles until a batch runs (`pixel_values`), so a waiting
image costs a quarter of its float size. Pillow (the `vision` extra) does the resizing; numpy the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .images import decode_image

SIGLIP_MEAN = 0.5  # the processor's norm_type "siglip": (x - 0.5) / 0.5 on every channel
SIGLIP_STD = 0.5


@dataclass(frozen=True)
class TilingSettings:
    """How images become tiles, from the model's config.json (the checkpoint's own keys)."""

    image_size: int  # force_image_size (else vision_config.image_size): a tile's side in pixels
    max_input_tiles: int  # tiles of the grid at most (the thumbnail comes on top)
    use_thumbnail: bool  # add the whole image as one more tile when the grid has more than one
    dynamic_image_size: bool  # False: the whole image resized to one tile
    tokens_per_tile: int  # (image_size // patch_size)^2 * downsample_ratio^2: <IMG_CONTEXT> tokens per tile

    @property
    def max_tiles(self) -> int:
        """The most tiles one image can give: the grid's maximum plus the thumbnail."""
        if not self.dynamic_image_size:
            return 1
        return self.max_input_tiles + (1 if self.use_thumbnail and self.max_input_tiles > 1 else 0)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TilingSettings:
        """From a llama_nemotron_vl_rerank config.json; a ValueError names a key that is missing or wrong."""
        vision = config.get("vision_config")
        if not isinstance(vision, Mapping):
            raise ValueError("config.json has no vision_config object")
        size = config.get("force_image_size") or vision.get("image_size")
        patch = vision.get("patch_size")
        ratio = config.get("downsample_ratio", 0.5)
        tiles = config.get("max_input_tiles", 2)
        for name, value in (("force_image_size", size), ("vision_config.patch_size", patch),
                            ("max_input_tiles", tiles)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer (it is {value!r})")
        if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"downsample_ratio must be a number in (0, 1] (it is {ratio!r})")
        if size % patch or (size // patch) * ratio != int((size // patch) * ratio):
            raise ValueError(f"force_image_size {size} is not a whole number of patches of {patch} that "
                             f"downsample_ratio {ratio} divides")
        tokens = int((size // patch) ** 2 * ratio ** 2)
        return cls(size, tiles, bool(config.get("use_thumbnail", True)),
                   bool(config.get("dynamic_image_size", True)), tokens)


def closest_aspect_ratio(aspect_ratio: float, target_ratios, width: int, height: int, image_size: int
                         ) -> tuple[int, int]:
    """The grid (columns, rows) the processor picks: the best product of the area kept (capped at 60 % of the
    image's) and the closeness of the aspect ratios; the first in `target_ratios`' order wins a tie."""
    best_factor, best_ratio = float("-inf"), (1, 1)
    area = width * height
    for ratio in target_ratios:
        target = ratio[0] / ratio[1]
        area_ratio = (ratio[0] * ratio[1] * image_size * image_size) / area
        factor = min(area_ratio, 0.6) * min(target / aspect_ratio, aspect_ratio / target)
        if factor > best_factor:
            best_factor, best_ratio = factor, ratio
    return best_ratio


def target_ratios(max_num: int, min_num: int = 1) -> list[tuple[int, int]]:
    """The grids of min_num..max_num tiles, in the processor's order (a set sorted by tile count: ties keep the
    set's iteration order, which for small int tuples is the same in every CPython process)."""
    ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                 if min_num <= i * j <= max_num)
    return sorted(ratios, key=lambda x: x[0] * x[1])


def tile_image(image, settings: TilingSettings) -> list:
    """The PIL tiles of an RGB image, as the processor cuts them."""
    from PIL import Image

    bicubic = Image.Resampling.BICUBIC
    size = settings.image_size
    if not settings.dynamic_image_size:
        return [image.resize((size, size), bicubic)]
    width, height = image.size
    columns, rows = closest_aspect_ratio(width / height, target_ratios(settings.max_input_tiles), width, height,
                                         size)
    resized = image.resize((size * columns, size * rows), bicubic)
    tiles = [resized.crop(((i % columns) * size, (i // columns) * size, (i % columns + 1) * size,
                           (i // columns + 1) * size)) for i in range(columns * rows)]
    if settings.use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size), bicubic))
    return tiles


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """An image document's tiles, ready for the vision encoder: `tiles` uint8 [n, size, size, 3] (RGB), `digest` the
    image file's sha256 (the vision embeddings are cached by it), `tokens` its <IMG_CONTEXT> tokens."""

    digest: str
    tiles: np.ndarray = field(repr=False)
    tokens: int

    @property
    def count(self) -> int:
        return int(self.tiles.shape[0])


def prepare_image(data: bytes, digest: str, settings: TilingSettings, max_pixels: int) -> PreparedImage:
    """Decode (images.decode_image: ImageError when broken or over max_pixels) and tile an image file."""
    image = decode_image(data, max_pixels)
    tiles = np.stack([np.asarray(tile, dtype=np.uint8) for tile in tile_image(image, settings)])
    return PreparedImage(digest, tiles, tiles.shape[0] * settings.tokens_per_tile)


def pixel_values(tiles: np.ndarray) -> np.ndarray:
    """uint8 tiles [n, size, size, 3] as the vision IR's pixel_values: float32 [n, 3, size, size], x / 255 then
    (x - 0.5) / 0.5, in float32 as torchvision's ToTensor and Normalize compute it."""
    x = tiles.astype(np.float32) / np.float32(255)
    x = (x - np.float32(SIGLIP_MEAN)) / np.float32(SIGLIP_STD)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def synthetic_page(width: int, height: int, seed: int) -> bytes:
    """A PNG of a made-up page (seeded bands, blocks and noise), for the startup checks' image documents: it
    exercises the tiling and the vision encoder without shipping an image file."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * (3 + c) + y * (5 - c)) % 256 for c in range(3)], axis=-1).astype(np.float64)
    for _ in range(6):
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        pixels[top:top + height // 5, left:left + width // 3] = rng.integers(0, 256, 3)
    pixels += rng.normal(0, 6, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
