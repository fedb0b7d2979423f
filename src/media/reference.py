"""Reference images: fetched SSRF-safely, capped, decoded and normalised to RGB."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError
from requests import RequestException
from runpod.serverless.utils.rp_ssrf import SSRFError, iter_content_capped, safe_get

from src.contract import JobError

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchLimits:
    """Caps on one reference download."""

    max_bytes: int
    max_pixels: int
    timeout_s: float


def fetch_reference(url: str, field: str, limits: FetchLimits) -> Image.Image:
    """Download ``url`` and return it as an RGB image; failures name ``field``.

    The runpod SDK's ``safe_get`` refuses private, loopback and metadata
    addresses (unless ``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true``), pins the
    resolved address and re-checks every redirect. The body is capped in bytes
    and in total time, and the pixel count is checked before decoding.
    """
    data = _download(url, field, limits)
    return decode_image(data, field, limits.max_pixels)


def _download(url: str, field: str, limits: FetchLimits) -> bytes:
    deadline = time.monotonic() + limits.timeout_s
    try:
        response = safe_get(url, timeout=limits.timeout_s, max_bytes=limits.max_bytes)
    except SSRFError as err:
        raise JobError(field, f"refused to fetch the reference image: {err}") from None
    except RequestException as err:
        raise JobError(field, f"could not fetch the reference image: {type(err).__name__}") from None
    with response:
        if response.status_code != 200:
            raise JobError(field, f"could not fetch the reference image: HTTP {response.status_code}")
        chunks = []
        try:
            for chunk in iter_content_capped(response, _CHUNK, limits.max_bytes):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise JobError(field, f"reference download took longer than {limits.timeout_s:g} s")
        except SSRFError:
            raise JobError(field, f"reference image is larger than {limits.max_bytes} bytes") from None
        except RequestException as err:
            raise JobError(field, f"could not fetch the reference image: {type(err).__name__}") from None
    return b"".join(chunks)


def decode_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decode ``data`` into an upright RGB image (EXIF orientation applied, alpha on white)."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise JobError(field, f"reference image has {width}x{height} pixels, more than {max_pixels}")
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, EOFError):
        raise JobError(field, "reference is not a readable image") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
