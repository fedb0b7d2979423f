"""Image geometry and encoding: sizes, fitting, PNG and WEBP thumbnails."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageOps

THUMBNAIL_EDGE = 256
THUMBNAIL_QUALITY = 85


def size_for_aspect(
    width: int, height: int, *, area: int, multiple: int, lowest: int, highest: int
) -> tuple[int, int]:
    """A size of about ``area`` pixels with the aspect of ``width`` x ``height``.

    Both sides are multiples of ``multiple`` within ``lowest``..``highest``; the
    aspect is clamped to what those bounds allow.
    """
    aspect = min(max(width / height, lowest / highest), highest / lowest)
    out_w = math.sqrt(area * aspect)
    out_h = out_w / aspect

    def snap(value: float) -> int:
        return min(max(round(value / multiple) * multiple, lowest), highest)

    return snap(out_w), snap(out_h)


def fit_cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``image`` to exactly ``size``, center-cropping if the aspect differs."""
    if image.size == size:
        return image
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` (fast compression: PNG is lossless either way)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def thumbnail_webp(image: Image.Image) -> bytes:
    """A WEBP thumbnail: longest edge 256 px, aspect kept, quality 85."""
    width, height = image.size
    scale = THUMBNAIL_EDGE / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="WEBP", quality=THUMBNAIL_QUALITY, method=4)
    return buffer.getvalue()
