"""Helpers of the AOT-compiled SDXL tests: a call spy and a two-image pipeline run."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from src.sdxl.family import COMPILED_SIZE

LATENT = (COMPILED_SIZE[1] // 8, COMPILED_SIZE[0] // 8)  # what SdxlFamily compiles for


class CallSpy:
    """Wraps a compiled package's runner and records the batch of every call it serves."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.batches: list[int] = []

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.batches.append(inputs[0].shape[0])
        return self.runner(*inputs)


def pipe_images(pipe: Any, size: tuple[int, int], **kwargs: Any) -> np.ndarray:
    """Two images (seeds 1 and 2, three steps) as int16 arrays."""
    width, height = size
    with torch.inference_mode():
        images = pipe(
            "a red boat",
            width=width,
            height=height,
            num_inference_steps=3,
            num_images_per_prompt=2,
            generator=[torch.Generator().manual_seed(seed) for seed in (1, 2)],
            **kwargs,
        ).images
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])
