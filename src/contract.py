"""The job contract: the payload a platform sends, validated with pydantic v2.

RunPod delivers ``{"id": <runpod id>, "input": <payload>}``. The payload carries
``id`` (the platform's job id), ``type``, ``prompt``, ``negative_prompt``,
``user_id``, ``config`` and ``metadata``. Each family validates ``config`` and
``metadata`` further with its own models (:func:`parse_section`); every field has a
``description``, which ``docs/job.schema.json`` (``make schema``) publishes.

Keys accepted in both ``config`` and ``metadata`` (``denoise_strength``,
``exact_copy_mode``, the Wan references) follow one rule: **metadata wins**
(:func:`metadata_first`).
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 10_000
MAX_URL_CHARS = 4096

T = TypeVar("T")


class JobError(Exception):
    """A job cannot run: ``field`` names the payload field at fault (or the stage)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (the type alone when there is no message)."""
    first = (str(err).strip().splitlines() or [""])[0][:limit]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


class Section(BaseModel):
    """Base for payload sections: JSON types only (no "3" for 3, no true for 1),
    unknown keys ignored here (the worker reports them), NaN and infinity refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True, strict=True)


class JobRequest(Section):
    """The top level of a job payload (RunPod's ``input``)."""

    id: str = Field(
        pattern=ID_PATTERN,
        description="Your job id, used in storage keys ({user_id}/{id}/...). Defaults to RunPod's job id.",
    )
    type: str = Field(
        min_length=1, max_length=64, description="The job type: what to generate, on which model."
    )
    prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="What to generate. Required, except in SDXL's exact copy mode.",
    )
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="What to steer away from. Optional."
    )
    user_id: str = Field(
        pattern=ID_PATTERN, description="Your user's id: the first part of every storage key."
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="Generation settings; the keys depend on the job type."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Reference images and their settings; any other key is yours and is ignored.",
    )


LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class LoraSpec(Section):
    """One LoRA of a job: a URL or a name in LORAS_DIR, and its scale."""

    url: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="http(s) URL of a .safetensors LoRA file (fetched like reference images, cached by "
        "content). Give url or name.",
    )
    name: str | None = Field(
        None,
        pattern=LORA_NAME_PATTERN,
        description="A LoRA file in LORAS_DIR, without its .safetensors extension. Give url or name.",
    )
    scale: float = Field(1.0, ge=-2, le=2, description="How strongly the LoRA applies, -2 to 2. Default 1.0.")
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9A-Fa-f]{64}$",
        description="The file's SHA-256 (64 hex digits): checked, and a cached file with it is reused "
        "whatever the URL (signed URLs change per request).",
    )

    @field_validator("name")
    @classmethod
    def _no_parent(cls, name: str | None) -> str | None:
        if name is not None and ".." in name:
            raise ValueError("must not contain '..': a file in LORAS_DIR, not a path")
        return name

    @model_validator(mode="after")
    def _one_source(self) -> LoraSpec:
        if (self.url is None) == (self.name is None):
            raise ValueError("give exactly one of url and name")
        return self


class GenerationConfig(Section):
    """``config`` keys shared by every family."""

    num_inference_steps: int | None = Field(
        None, ge=1, le=150, description="Denoising steps that run, 1-150. Default: per job type."
    )
    guidance_scale: float | None = Field(
        None, ge=0, le=30, description="Classifier-free guidance scale, 0-30. Default: per job type."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Random seed, 0-4294967295. Default: a random one, reported."
    )
    width: int | None = Field(None, gt=0, description="Output width in pixels; give height too.")
    height: int | None = Field(None, gt=0, description="Output height in pixels; give width too.")
    resolution: str | None = Field(
        None,
        pattern=r"^\d{1,5}x\d{1,5}$",
        description='Output size as "WIDTHxHEIGHT" (e.g. "1024x768"), instead of width and height.',
    )
    denoise_strength: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Reference jobs: how much is regenerated, 0-1 (metadata.denoise_strength wins).",
    )
    output_format: Literal["png", "webp", "jpeg"] = Field(
        "png",
        description="Image jobs: the file format, `png` (lossless), `webp` or `jpeg`; the key's extension "
        "and content type follow. Thumbnails stay 256 px WEBP; videos stay MP4.",
    )
    output_quality: int = Field(
        90, ge=1, le=100, description="Image jobs: `webp` and `jpeg` quality, 1-100 (PNG is lossless)."
    )
    enhance_prompt: bool = Field(
        False,
        description="Rewrite the prompt with the worker's LLM before generating (the Wan team's prompt "
        "extension for Wan jobs, tag-style for SDXL); the job's metadata has both prompts. Needs `prompt` "
        "in WORKER_MODELS. The `*_enhanced` job types always enhance.",
    )
    loras: list[LoraSpec] = Field(
        default_factory=list,
        description="LoRA adapters for this job, applied in order (at most MAX_LORAS, default 4). Each "
        "asset's metadata lists them.",
    )


class ReferenceMetadata(Section):
    """``metadata`` keys every family reads; everything else is the platform's own."""

    reference_image_url: str | None = Field(
        None, min_length=1, max_length=MAX_URL_CHARS, description="URL of a reference image (http or https)."
    )
    denoise_strength: float | None = Field(
        None, ge=0, le=1, description="Reference jobs: how much is regenerated, 0-1 (wins over config)."
    )
    reference_strength: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Deprecated: used as denoise_strength = 1 - reference_strength when no "
        "denoise_strength is given (logged).",
    )


Model = TypeVar("Model", bound=BaseModel)


_PATTERN_HINTS = {
    "id": "must be 1-128 characters of A-Z a-z 0-9 _ -, starting with a letter or digit",
    "user_id": "must be 1-128 characters of A-Z a-z 0-9 _ -, starting with a letter or digit",
    "resolution": "must look like 1024x768 (WIDTHxHEIGHT)",
    "name": "must be a file name in LORAS_DIR without its extension: 1-128 characters of A-Z a-z 0-9 _ . -, "
    "starting with a letter or digit (no / or ..)",
    "sha256": "must be 64 hexadecimal digits",
}


def field_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    """``config`` + ``("loras", 1, "url")`` -> ``config.loras[1].url``."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "":
            path = f"{path}.{part}" if path else str(part)
    return path


def _describe(err: ValidationError, prefix: str) -> JobError:
    """The first validation error as ``field: reason``."""
    first = err.errors()[0]
    path = field_path(prefix, first["loc"])
    reason = first["msg"].removeprefix("Value error, ")
    if first["type"] == "string_pattern_mismatch":
        reason = _PATTERN_HINTS.get(str(first["loc"][-1]), reason)
    elif first["type"] == "dict_type":
        reason = "must be a JSON object"
    return JobError(path or "input", reason)


def parse_section(model: type[Model], data: Any, prefix: str = "") -> Model:
    """Validate ``data`` as ``model``; errors name the field under ``prefix``."""
    if not isinstance(data, dict):
        raise JobError(prefix or "input", "must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise _describe(err, prefix) from None


def parse_request(job: dict[str, Any]) -> JobRequest:
    """Validate a RunPod job; the platform's ``input.id`` wins over RunPod's ``id``."""
    payload = job.get("input")
    if not isinstance(payload, dict):
        raise JobError("input", "must be a JSON object")
    if payload.get("id") in (None, ""):
        payload = {**payload, "id": job.get("id")}
    return parse_section(JobRequest, payload)


def unknown_keys(job: dict[str, Any], config_model: type[BaseModel]) -> list[JobError]:
    """Keys the worker does not read at the top level and in ``config``, each with a did-you-mean.

    ``metadata`` stays open: platforms keep their own fields there.
    """
    payload = job.get("input") if isinstance(job.get("input"), dict) else {}
    config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    found = []
    sections: list[tuple[str, Any, type[BaseModel]]] = [
        ("", payload, JobRequest),
        ("config.", config, config_model),
    ]
    loras = config.get("loras")
    if isinstance(loras, list):
        sections += [
            (f"config.loras[{i}].", lora, LoraSpec) for i, lora in enumerate(loras) if isinstance(lora, dict)
        ]
    for prefix, keys, model in sections:
        known = list(model.model_fields)
        for key in keys:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]}?" if close else ""
                found.append(JobError(f"{prefix}{key}", f"unknown key{hint}"))
    return found


def metadata_first(metadata_value: T | None, config_value: T | None) -> T | None:
    """The one precedence rule for keys accepted in both sections: metadata wins over config."""
    return config_value if metadata_value is None else metadata_value


def resolve_size(
    config: GenerationConfig, *, multiple: int, lowest: int, highest: int
) -> tuple[int, int] | None:
    """The requested (width, height), or None when the config names no size."""
    if config.resolution is not None:
        if config.width is not None or config.height is not None:
            raise JobError("config.resolution", "give either resolution or width/height, not both")
        field = "config.resolution"
        width, height = (int(part) for part in config.resolution.split("x"))
    elif config.width is None and config.height is None:
        return None
    elif config.width is None or config.height is None:
        missing = "width" if config.width is None else "height"
        raise JobError(f"config.{missing}", "width and height must be given together")
    else:
        field = ""
        width, height = config.width, config.height
    for name, value in (("width", width), ("height", height)):
        if value % multiple or not lowest <= value <= highest:
            raise JobError(
                field or f"config.{name}",
                f"{name} must be a multiple of {multiple} between {lowest} and {highest}, got {value}",
            )
    return width, height


def resolve_denoise(metadata: ReferenceMetadata, config: GenerationConfig, default: float) -> float:
    """``denoise_strength`` (metadata first), else the legacy ``reference_strength``, else ``default``."""
    denoise = metadata_first(metadata.denoise_strength, config.denoise_strength)
    if denoise is not None:
        return denoise
    if metadata.reference_strength is None:
        return default
    denoise = round(1.0 - metadata.reference_strength, 6)
    log.warning(
        "DEPRECATED: metadata.reference_strength=%s converted to denoise_strength=%s; "
        "send denoise_strength instead",
        metadata.reference_strength,
        denoise,
    )
    return denoise


def pick_seed(config: GenerationConfig) -> int:
    """The job's base seed: the configured one, or a fresh random one to report."""
    if config.seed is not None:
        return config.seed
    import secrets

    return secrets.randbelow(MAX_SEED + 1)
