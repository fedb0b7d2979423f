"""VACE conditioning for each reference mode.

- ``single``: the image steers subject and style (``reference_images``).
- ``start`` / ``end`` / ``both``: the first and/or last frame is pinned. VACE takes
  a conditioning video plus a mask: known frames carry the image with a black
  mask, frames to generate are gray with a white mask.

``conditioning_scale`` is the reference strength, ``1 - denoise_strength``.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from src.media.images import fit_cover
from src.wan.plan import WanPlan

GRAY = (128, 128, 128)  # 0 after VACE's [-1, 1] normalisation: "nothing known here"
KNOWN, GENERATE = 0, 255  # mask values


def vace_inputs(plan: WanPlan, images: dict[str, Image.Image]) -> dict[str, Any]:
    """The WanVACEPipeline keyword arguments for ``plan.reference_mode``."""
    inputs: dict[str, Any] = {"conditioning_scale": plan.conditioning_scale}
    if "single" in images:
        inputs["reference_images"] = [images["single"]]
        return inputs
    size = plan.size
    video = [Image.new("RGB", size, GRAY) for _ in range(plan.num_frames)]
    mask = [Image.new("L", size, GENERATE) for _ in range(plan.num_frames)]
    pinned = {"start": 0, "end": plan.num_frames - 1}
    for mode, index in pinned.items():
        if mode in images:
            video[index] = fit_cover(images[mode], size)
            mask[index] = Image.new("L", size, KNOWN)
    inputs.update(video=video, mask=mask)
    return inputs
