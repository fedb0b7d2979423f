"""SDXL job rules: defaults per type, text-to-image vs image-to-image, exact copy mode.

Every rule of the original system's contract lives here, as a pure function of the validated
request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from src.contract import (
    GenerationConfig,
    JobError,
    JobRequest,
    LoraSpec,
    ReferenceMetadata,
    metadata_first,
    parse_section,
    pick_seed,
    resolve_denoise,
    resolve_size,
)
from src.media.images import ImageOutput
from src.sdxl.schedulers import DEFAULT as DEFAULT_SCHEDULER
from src.sdxl.schedulers import SCHEDULERS

DEFAULTS = {  # job type -> (steps, guidance_scale)
    "sdxl_image_fast": (15, 6.0),
    "sdxl_image_high": (25, 7.5),
}
DEFAULT_SIZE = (1024, 1024)
SIZE_BOUNDS = {"multiple": 8, "lowest": 512, "highest": 2048}
DEFAULT_DENOISE = 0.5  # = 1 - the legacy reference_strength default of 0.5
EXACT_COPY_MAX_DENOISE = 0.05
MIN_DENOISE = 0.01  # below this no denoising step would run
TRAIN_TIMESTEPS = 1000


class SdxlConfig(GenerationConfig):
    """SDXL ``config``: the shared keys plus images, sampler, prompt controls and ``exact_copy_mode``."""

    num_images: int = Field(1, ge=1, le=8, description="Images to generate, 1-8; image i uses seed + i.")
    scheduler: Literal[tuple(SCHEDULERS)] = Field(  # type: ignore[valid-type]
        DEFAULT_SCHEDULER,
        description="The sampler, by its A1111 name: "
        + ", ".join(SCHEDULERS)
        + ". Default euler (SDXL's own).",
    )
    clip_skip: int = Field(
        0, ge=0, le=2, description="Text encoder layers to skip from the end, 0-2 (diffusers' clip_skip)."
    )
    prompt_weighting: bool = Field(
        True,
        description="Read (word:1.3), word+, word- and (a b)++ as weights (Compel). Off: the prompts are "
        "read literally, parentheses included. Either way prompts past 77 tokens are embedded in chunks.",
    )
    exact_copy_mode: bool | None = Field(
        None, description="Promptless copy of the reference (metadata.exact_copy_mode wins)."
    )


class SdxlMetadata(ReferenceMetadata):
    """SDXL ``metadata``: the reference keys plus ``exact_copy_mode``."""

    exact_copy_mode: bool | None = Field(
        None,
        description="Promptless copy of the reference: denoise_strength at most 0.05, guidance 1.0, "
        "no negative prompt, 6-10 steps. Default false.",
    )


@dataclass(frozen=True)
class SdxlPlan:
    """Everything needed to run one SDXL job."""

    prompt: str
    negative_prompt: str | None
    size: tuple[int, int] | None  # None: derived from the reference image
    seeds: list[int]
    steps: int  # denoising steps that actually run
    guidance_scale: float
    reference_url: str | None = None
    denoise_strength: float | None = None
    exact_copy: bool = False
    loras: list[LoraSpec] = field(default_factory=list)
    scheduler: str = DEFAULT_SCHEDULER
    clip_skip: int = 0
    prompt_weighting: bool = True
    output: ImageOutput = field(default_factory=ImageOutput)

    @property
    def schedule_steps(self) -> int:
        """``num_inference_steps`` to pass to diffusers so that exactly ``steps`` run."""
        if self.denoise_strength is None:
            return self.steps
        return img2img_schedule(self.steps, self.denoise_strength)


def img2img_schedule(steps: int, strength: float) -> int:
    """The schedule length for which diffusers' img2img runs ``int(length * strength) == steps``."""
    length = max(steps, math.ceil(steps / strength))
    while int(length * strength) < steps:
        length += 1
    while length > steps and int((length - 1) * strength) >= steps:
        length -= 1
    return length


def plan_sdxl(request: JobRequest) -> SdxlPlan:
    """Apply the SDXL rules to a validated request."""
    default_steps, default_guidance = DEFAULTS[request.type]
    config = parse_section(SdxlConfig, request.config, "config")
    metadata = parse_section(SdxlMetadata, request.metadata, "metadata")
    size = resolve_size(config, **SIZE_BOUNDS)
    exact_copy = bool(metadata_first(metadata.exact_copy_mode, config.exact_copy_mode))
    reference_url = metadata.reference_image_url
    prompt = (request.prompt or "").strip()
    base_seed = pick_seed(config)
    seeds = [base_seed + i for i in range(config.num_images)]

    if reference_url is None:
        if exact_copy:
            raise JobError("metadata.exact_copy_mode", "needs metadata.reference_image_url")
        if not prompt:
            raise JobError("prompt", "is required")
        return SdxlPlan(
            prompt=prompt,
            negative_prompt=request.negative_prompt,
            size=size or DEFAULT_SIZE,
            seeds=seeds,
            steps=config.num_inference_steps or default_steps,
            guidance_scale=_or(config.guidance_scale, default_guidance),
            **_controls(config),
        )

    denoise = resolve_denoise(metadata, config, DEFAULT_DENOISE)
    if exact_copy:  # the original system's rules, exactly
        denoise = min(denoise, EXACT_COPY_MAX_DENOISE)
        guidance = 1.0
        negative_prompt = None
        steps = min(max(6, int(denoise * 100)), 10)
    else:  # reference modify mode: values as provided, no clamping
        if not prompt:
            raise JobError("prompt", "is required (only exact_copy_mode may omit it)")
        guidance = _or(config.guidance_scale, default_guidance)
        negative_prompt = request.negative_prompt
        steps = config.num_inference_steps or default_steps
    denoise = max(denoise, MIN_DENOISE)
    return SdxlPlan(
        prompt=prompt,
        negative_prompt=negative_prompt,
        size=size,
        seeds=seeds,
        steps=min(steps, int(TRAIN_TIMESTEPS * denoise)),
        guidance_scale=guidance,
        reference_url=reference_url,
        denoise_strength=denoise,
        exact_copy=exact_copy,
        **_controls(config),
    )


def _controls(config: SdxlConfig) -> dict[str, Any]:
    """The plan's fields that come straight from ``config``."""
    return {
        "loras": config.loras,
        "scheduler": config.scheduler,
        "clip_skip": config.clip_skip,
        "prompt_weighting": config.prompt_weighting,
        "output": ImageOutput(config.output_format, config.output_quality),
    }


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
