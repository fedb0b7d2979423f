"""Wan 2.1 job rules: defaults per type, size and length, reference modes.

Every rule lives here, as a pure function of the validated request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import Field

from src.contract import (
    GenerationConfig,
    JobError,
    JobRequest,
    ReferenceMetadata,
    parse_section,
    pick_seed,
    resolve_denoise,
    resolve_size,
)

DEFAULTS = {  # job type -> (steps, guidance_scale, produces a video)
    "video_fast": (25, 6.5, True),
    "video_high": (50, 7.5, True),
    "image_fast": (25, 6.5, False),
    "image_high": (50, 7.5, False),
}
FPS = 16
DEFAULT_SIZE = (832, 480)
DEFAULT_FRAMES = 81
MIN_VIDEO_FRAMES = 5
MAX_FRAMES = 161
SIZE_BOUNDS = {"multiple": 16, "lowest": 256, "highest": 1280}
MAX_AREA = 1280 * 720
DEFAULT_DENOISE = 0.15
HIGH_RES_AREA = 1280 * 720  # from this area on, Wan uses flow shift 5.0 instead of 3.0

# Where each reference comes from: mode -> ((section, key), ...), first present wins.
REFERENCE_SOURCES = {
    "single": (("config", "image"), ("metadata", "reference_image_url")),
    "start": (("metadata", "start_reference_url"), ("config", "first_frame")),
    "end": (("metadata", "end_reference_url"), ("config", "last_frame")),
}


class WanConfig(GenerationConfig):
    """Wan ``config``: the shared keys plus length and reference URLs."""

    num_frames: int | None = Field(None, ge=1, le=MAX_FRAMES)
    duration_seconds: float | None = Field(None, gt=0, le=(MAX_FRAMES - 1) / FPS)
    image: str | None = Field(None, min_length=1, max_length=4096)
    first_frame: str | None = Field(None, min_length=1, max_length=4096)
    last_frame: str | None = Field(None, min_length=1, max_length=4096)


@dataclass(frozen=True)
class Reference:
    """A reference image to fetch: its URL and the payload field it came from."""

    url: str
    field: str


@dataclass(frozen=True)
class WanPlan:
    """Everything needed to run one Wan job."""

    job_type: str
    is_video: bool
    prompt: str
    negative_prompt: str | None
    size: tuple[int, int]
    num_frames: int
    seed: int
    steps: int
    guidance_scale: float
    reference_mode: str = "none"
    references: dict[str, Reference] = field(default_factory=dict)
    denoise_strength: float | None = None

    @property
    def conditioning_scale(self) -> float:
        """How strongly the references steer: ``1 - denoise_strength`` (VACE conditioning scale)."""
        return 1.0 - (self.denoise_strength or 0.0)

    @property
    def flow_shift(self) -> float:
        """Wan's sampling shift: 3.0 at 480p, 5.0 at 720p."""
        return 5.0 if self.size[0] * self.size[1] >= HIGH_RES_AREA else 3.0


def normalise_frames(requested: int) -> int:
    """The nearest frame count Wan accepts (4k + 1); halfway counts round up."""
    return 4 * math.floor((requested - 1) / 4 + 0.5) + 1


def _frames(config: WanConfig, is_video: bool) -> int:
    if not is_video:
        for name in ("num_frames", "duration_seconds"):
            if getattr(config, name) is not None:
                raise JobError(f"config.{name}", "image jobs produce a single frame; use a video_* type")
        return 1
    if config.num_frames is not None and config.duration_seconds is not None:
        raise JobError("config.duration_seconds", "give either num_frames or duration_seconds, not both")
    if config.num_frames is not None:
        requested, name = config.num_frames, "num_frames"
    elif config.duration_seconds is not None:
        requested, name = math.floor(config.duration_seconds * FPS + 0.5) + 1, "duration_seconds"
    else:
        return DEFAULT_FRAMES
    frames = normalise_frames(requested)
    if frames < MIN_VIDEO_FRAMES:
        raise JobError(f"config.{name}", f"a video needs at least {MIN_VIDEO_FRAMES} frames, got {requested}")
    return frames


def _references(config: WanConfig, metadata: ReferenceMetadata) -> dict[str, Reference]:
    sections = {"config": config, "metadata": metadata}
    found: dict[str, Reference] = {}
    for mode, sources in REFERENCE_SOURCES.items():
        for section, key in sources:
            url = getattr(sections[section], key)
            if url is not None:
                found[mode] = Reference(url, f"{section}.{key}")
                break
    return found


def _reference_mode(references: dict[str, Reference], is_video: bool) -> str:
    if "single" in references and len(references) > 1:
        raise JobError(
            references["single"].field, "give either a reference image or start/end frames, not both"
        )
    if not is_video and references.keys() - {"single"}:
        first = next(ref for mode, ref in references.items() if mode != "single")
        raise JobError(first.field, "start and end frames need a video_* job type")
    if {"start", "end"} <= references.keys():
        return "both"
    return next(iter(references), "none")


def plan_wan(request: JobRequest) -> WanPlan:
    """Apply the Wan rules to a validated request."""
    default_steps, default_guidance, is_video = DEFAULTS[request.type]
    config = parse_section(WanConfig, request.config, "config")
    metadata = parse_section(ReferenceMetadata, request.metadata, "metadata")
    size = resolve_size(config, **SIZE_BOUNDS) or DEFAULT_SIZE
    if size[0] * size[1] > MAX_AREA:
        raise JobError("config.width", f"{size[0]}x{size[1]} is more than {MAX_AREA} pixels (1280x720)")
    num_frames = _frames(config, is_video)
    prompt = (request.prompt or "").strip()
    if not prompt:
        raise JobError("prompt", "is required")
    references = _references(config, metadata)
    mode = _reference_mode(references, is_video)
    denoise = resolve_denoise(metadata, config, DEFAULT_DENOISE) if references else None
    return WanPlan(
        job_type=request.type,
        is_video=is_video,
        prompt=prompt,
        negative_prompt=request.negative_prompt,
        size=size,
        num_frames=num_frames,
        seed=pick_seed(config),
        steps=config.num_inference_steps or default_steps,
        guidance_scale=default_guidance if config.guidance_scale is None else config.guidance_scale,
        reference_mode=mode,
        references=references,
        denoise_strength=denoise,
    )
