"""Reference images: fetched SSRF-safely, capped, decoded and normalised to RGB."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from src.contract import JobError
from src.media.download import Download, download
from src.settings import Settings


@dataclass(frozen=True)
class FetchLimits:
    """Caps on one reference download."""

    max_bytes: int
    max_pixels: int
    timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchLimits:
        """MAX_REFERENCE_BYTES, MAX_REFERENCE_PIXELS and REFERENCE_TIMEOUT_S."""
        return cls(settings.max_reference_bytes, settings.max_reference_pixels, settings.reference_timeout_s)


def fetch_reference(url: str, field: str, limits: FetchLimits) -> Image.Image:
    """Download ``url`` (SSRF-safe, capped: ``src/media/download.py``) and return it as an RGB
    image; failures name ``field``. The pixel count is checked before decoding."""
    body = io.BytesIO()
    download(url, field, Download("reference image", limits.max_bytes, limits.timeout_s), body.write)
    return decode_image(body.getvalue(), field, limits.max_pixels)


def decode_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB image.

    The pixel count is checked from the header before any pixel is decoded.
    EXIF orientation is applied, transparency is flattened on white, palette,
    CMYK, 16-bit and float images are converted, and an animation gives its
    first frame.
    """
    try:
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise JobError(field, f"reference image has more than {max_pixels} pixels") from None
        width, height = image.size
        if width * height > max_pixels:
            raise JobError(field, f"reference image has {width}x{height} pixels, more than {max_pixels}")
        image.seek(0)
        image.load()
        image = _to_8bit(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError):
        raise JobError(field, "reference is not a readable image") from None
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale scaled to 8 bits (a plain convert would clip them)."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    peak = float(pixels.max(initial=0.0))
    if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255):
        pixels = pixels / 257.0
    elif image.mode == "F" and peak <= 1.0:
        pixels = pixels * 255.0
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), mode="L")
