"""PNG encoding (OpenCV's libpng): lossless RGB that any decoder reads back pixel-exact."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from src.media.images import encode_png


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_png_round_trips_pixel_exact_as_rgb(mode: str) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    decoded = Image.open(io.BytesIO(encode_png(image)))
    assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == (80, 48)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image.convert("RGB")))
