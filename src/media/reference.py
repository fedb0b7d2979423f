"""Reference images: fetched SSRF-safely, capped, decoded and normalised to RGB."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from requests import RequestException, Response

from src.contract import JobError
from src.runpod_sdk import rp_ssrf
from src.settings import Settings

_CHUNK = 64 * 1024


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
    """Download ``url`` and return it as an RGB image; failures name ``field``.

    The runpod SDK's ``safe_get`` refuses private, loopback and metadata
    addresses (unless ``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true``), pins the
    resolved address and re-checks every redirect. The body is capped in bytes
    and in total time, and the pixel count is checked before decoding.
    """
    data = _download(url, field, limits)
    return decode_image(data, field, limits.max_pixels)


def _download(url: str, field: str, limits: FetchLimits) -> bytes:
    try:
        response = rp_ssrf.safe_get(url, timeout=limits.timeout_s, max_bytes=limits.max_bytes)
    except rp_ssrf.SSRFError as err:
        raise JobError(field, _refusal(err, limits)) from None
    except RequestException as err:
        raise JobError(field, f"could not fetch the reference image: {type(err).__name__}") from None
    # A server that drips bytes never trips a per-read timeout: cut the socket at the deadline.
    timed_out = threading.Event()
    watchdog = threading.Timer(limits.timeout_s, _abort, args=(response, timed_out))
    watchdog.start()
    try:
        with response:
            if response.status_code != 200:
                raise JobError(field, f"could not fetch the reference image: HTTP {response.status_code}")
            return b"".join(rp_ssrf.iter_content_capped(response, _CHUNK, limits.max_bytes))
    except rp_ssrf.SSRFError as err:
        raise JobError(field, _refusal(err, limits)) from None
    except (RequestException, OSError) as err:
        if timed_out.is_set():
            raise JobError(field, f"reference download took longer than {limits.timeout_s:g} s") from None
        raise JobError(field, f"could not fetch the reference image: {type(err).__name__}") from None
    finally:
        watchdog.cancel()


def _refusal(err: rp_ssrf.SSRFError, limits: FetchLimits) -> str:
    if "size cap" in str(err):
        return f"reference image is larger than {limits.max_bytes} bytes"
    return f"refused to fetch the reference image: {err}"


def _abort(response: Response, timed_out: threading.Event) -> None:
    """Shut the response's socket so a blocked read returns at once."""
    timed_out.set()
    socket_io = getattr(getattr(getattr(response.raw, "_fp", None), "fp", None), "raw", None)
    sock = getattr(socket_io, "_sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


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
