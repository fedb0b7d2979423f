"""Wan 2.1 job rules: defaults per type, size and length, reference modes.

Every rule lives here, as a pure function of the validated request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from src.contract import (
    MAX_URL_CHARS,
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
from src.wan.turbo import STEPS as TURBO_STEPS

TURBO = "video_turbo"  # FastWan 2.1 T2V 1.3B (src/wan/turbo.py)
# The Wan team's default negative prompt, used when a job sends none (their reference code's
# ``wan_shared_cfg.sample_neg_prompt``, wan/configs/shared_config.py in Wan-Video/Wan2.1).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
TEXT_TOKENS = 512  # what UMT5 reads of a prompt; the rest is cut
DEFAULTS = {  # job type -> (steps, guidance_scale, produces a video)
    "video_fast": (25, 6.5, True),
    "video_high": (50, 7.5, True),
    "image_fast": (25, 6.5, False),
    "image_high": (50, 7.5, False),
    TURBO: (TURBO_STEPS, 1.0, True),  # fixed by the distillation: 3 steps, no classifier-free guidance
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

# Where each reference comes from: mode -> (metadata key, config key); metadata wins.
REFERENCE_KEYS = {
    "single": ("reference_image_url", "image"),
    "start": ("start_reference_url", "first_frame"),
    "end": ("end_reference_url", "last_frame"),
}


def _url(description: str) -> Any:
    return Field(None, min_length=1, max_length=MAX_URL_CHARS, description=description)


class WanConfig(GenerationConfig):
    """Wan ``config``: the shared keys plus length and reference URLs."""

    num_frames: int | None = Field(
        None,
        ge=1,
        le=MAX_FRAMES,
        description=f"Video frames at {FPS} fps, normalised to the nearest 4k+1, 5-{MAX_FRAMES}. "
        f"Default {DEFAULT_FRAMES}. Video types only.",
    )
    duration_seconds: float | None = Field(
        None,
        gt=0,
        le=(MAX_FRAMES - 1) / FPS,
        description=f"Video length in seconds, instead of num_frames (duration x {FPS} + 1 frames).",
    )
    image: str | None = _url("Reference image URL (single mode); metadata.reference_image_url wins.")
    first_frame: str | None = _url("First-frame image URL (start mode); metadata.start_reference_url wins.")
    last_frame: str | None = _url("Last-frame image URL (end mode); metadata.end_reference_url wins.")


class WanMetadata(ReferenceMetadata):
    """Wan ``metadata``: the reference keys plus the start and end frames."""

    start_reference_url: str | None = _url("URL of the image the video starts with (start mode).")
    end_reference_url: str | None = _url("URL of the image the video ends with (end mode).")


@dataclass(frozen=True)
class Reference:
    """A reference image to fetch: its URL and the payload field it came from."""

    url: str
    field: str


@dataclass(frozen=True)
class WanPlan:
    """Everything needed to run one Wan job."""

    model: str  # "t2v", "vace" or "turbo": which transformer runs it
    is_video: bool
    prompt: str
    negative_prompt: str | None  # the one used: the job's, the Wan default, or none (turbo)
    size: tuple[int, int]
    num_frames: int
    seed: int
    steps: int
    guidance_scale: float
    reference_mode: str = "none"
    references: dict[str, Reference] = field(default_factory=dict)
    denoise_strength: float | None = None
    loras: list[LoraSpec] = field(default_factory=list)
    negative_prompt_ignored: bool = False  # turbo: the job sent one, and it was not used
    output: ImageOutput = field(default_factory=ImageOutput)

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


def _references(config: WanConfig, metadata: WanMetadata) -> dict[str, Reference]:
    found: dict[str, Reference] = {}
    for mode, (metadata_key, config_key) in REFERENCE_KEYS.items():
        from_metadata = getattr(metadata, metadata_key)
        url = metadata_first(from_metadata, getattr(config, config_key))
        if url is not None:
            where = f"metadata.{metadata_key}" if from_metadata is not None else f"config.{config_key}"
            found[mode] = Reference(url, where)
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


def _check_turbo(config: WanConfig, references: dict[str, Reference]) -> None:
    """What the distilled model cannot do is refused, not silently changed."""
    if config.num_inference_steps not in (None, TURBO_STEPS):
        raise JobError(
            "config.num_inference_steps",
            f"video_turbo runs exactly {TURBO_STEPS} steps, as it was distilled; leave it out",
        )
    if config.guidance_scale not in (None, 1.0):
        raise JobError(
            "config.guidance_scale", "video_turbo runs without classifier-free guidance (1); leave it out"
        )
    if references:
        raise JobError(
            next(iter(references.values())).field,
            "video_turbo takes no reference images (there is no distilled VACE model); use video_fast",
        )


def plan_wan(request: JobRequest) -> WanPlan:
    """Apply the Wan rules to a validated request."""
    default_steps, default_guidance, is_video = DEFAULTS[request.type]
    config = parse_section(WanConfig, request.config, "config")
    metadata = parse_section(WanMetadata, request.metadata, "metadata")
    size = resolve_size(config, **SIZE_BOUNDS) or DEFAULT_SIZE
    if size[0] * size[1] > MAX_AREA:
        raise JobError("config.width", f"{size[0]}x{size[1]} is more than {MAX_AREA} pixels (1280x720)")
    num_frames = _frames(config, is_video)
    prompt = (request.prompt or "").strip()
    if not prompt:
        raise JobError("prompt", "is required")
    references = _references(config, metadata)
    if request.type == TURBO:
        _check_turbo(config, references)
    if is_video and "output_format" in request.config:
        raise JobError("config.output_format", "videos are stored as MP4; output_format is for image jobs")
    negative = (request.negative_prompt or "").strip() or DEFAULT_NEGATIVE_PROMPT
    mode = _reference_mode(references, is_video)
    denoise = resolve_denoise(metadata, config, DEFAULT_DENOISE) if references else None
    return WanPlan(
        model="turbo" if request.type == TURBO else ("vace" if references else "t2v"),
        is_video=is_video,
        prompt=prompt,
        negative_prompt=None if request.type == TURBO else negative,
        negative_prompt_ignored=request.type == TURBO and bool((request.negative_prompt or "").strip()),
        size=size,
        num_frames=num_frames,
        seed=pick_seed(config),
        steps=config.num_inference_steps or default_steps,
        guidance_scale=default_guidance if config.guidance_scale is None else config.guidance_scale,
        reference_mode=mode,
        references=references,
        denoise_strength=denoise,
        loras=config.loras,
        output=ImageOutput(config.output_format, config.output_quality),
    )
