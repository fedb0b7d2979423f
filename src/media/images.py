"""Image geometry and encoding: sizes, fitting, PNG and WEBP thumbnails."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

THUMBNAIL_EDGE = 256
THUMBNAIL_QUALITY = 85
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}  # format -> storage key extension


@dataclass(frozen=True)
class ImageOutput:
    """How a job's images are stored: ``format`` (``png``, ``webp``, ``jpeg``) and its quality."""

    format: str = "png"
    quality: int = 90  # webp and jpeg; PNG is lossless

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    def encode(self, image: Image.Image) -> bytes:
        """The image's file in this format."""
        if self.format == "png":
            return encode_png(image)
        buffer = io.BytesIO()
        options = {"method": 4} if self.format == "webp" else {"optimize": True}
        image.convert("RGB").save(buffer, format=self.format.upper(), quality=self.quality, **options)
        return buffer.getvalue()


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


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` floats in [0, 1] (on any device) -> ``[N, H, W, 3]`` uint8 on the host.

    The same arithmetic as diffusers' ``output_type="pil"`` (float32, x255, round half to even),
    done where the tensor is, so only uint8 pixels cross from the GPU and no float32 copy is made
    on the host.
    """
    pixels = images.float().clamp(0.0, 1.0).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def fit_cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``image`` to exactly ``size``, center-cropping if the aspect differs."""
    if image.size == size:
        return image
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)


def encode_png(image: Image.Image) -> bytes:
    """RGB PNG bytes of ``image``: Paeth row filter, zlib level 1 with run-length matching (libpng).

    PNG is lossless either way: this is faster than Pillow's level 1 for no larger files, and the
    Paeth filter alone (instead of libpng's per-row choice) is faster still for the same size on
    photographs (measured: docs/PERFORMANCE.md).
    """
    bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    params = [
        cv2.IMWRITE_PNG_COMPRESSION,
        1,
        cv2.IMWRITE_PNG_STRATEGY,
        cv2.IMWRITE_PNG_STRATEGY_RLE,
        cv2.IMWRITE_PNG_FILTER,
        cv2.IMWRITE_PNG_FILTER_PAETH,
    ]
    ok, encoded = cv2.imencode(".png", bgr, params)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for a {image.size} image")
    return encoded.tobytes()


def thumbnail_webp(image: Image.Image) -> bytes:
    """A WEBP thumbnail: longest edge 256 px, aspect kept, quality 85."""
    width, height = image.size
    scale = THUMBNAIL_EDGE / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="WEBP", quality=THUMBNAIL_QUALITY, method=4)
    return buffer.getvalue()
