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


def test_to_uint8_matches_diffusers_pil_conversion() -> None:
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from src.media.images import to_uint8

    # Values on every rounding boundary (k + 0.5) / 255, plus random ones, in fp16 as the VAE gives them.
    boundaries = (torch.arange(256, dtype=torch.float32) + 0.5) / 255
    rng = torch.Generator().manual_seed(0)
    images = torch.cat([boundaries.repeat(2 * 3 * 8), torch.rand(2 * 3 * 8 * 256, generator=rng)])
    images = images.reshape(4, 3, 32, 64).half()
    expected = [
        np.asarray(image) for image in VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
    ]
    got = to_uint8(images)
    assert got.dtype == np.uint8 and got.shape == (4, 32, 64, 3)
    np.testing.assert_array_equal(got, np.stack(expected))
