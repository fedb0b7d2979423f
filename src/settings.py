"""Worker settings, read once from the environment at start-up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BUCKET_VARIABLES = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY")


class StartupError(RuntimeError):
    """The worker cannot start as configured; the message says what to fix."""


class Settings(BaseSettings):
    """Every environment variable the worker reads (documented in README.md)."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, env_ignore_empty=True)

    models_dir: Path = Field(
        Path("/models"),
        description="Where the baked model weights live (`sdxl/`, `wan-t2v/`, `wan-vace/`, `wan-turbo/`, "
        "`prompt/`).",
    )
    worker_models: Annotated[list[str], NoDecode] = Field(
        default=["sdxl", "wan"],
        description="Model families to load and warm at start, comma-separated: `sdxl`, `wan`, and "
        "`prompt` (the LLM of prompt enhancement: the `*_enhanced` job types, `config.enhance_prompt`).",
    )
    ready_after: Literal["first", "all"] = Field(
        "first",
        description="`first`: the worker is ready once the first family named in WORKER_MODELS is loaded "
        "and warm (name first the family most jobs need); the others load behind it, and a job for one "
        "of them waits until it is warm. `all`: ready only when every family is (also what COMPILE `on` "
        "and `wait` do: their packages are compiled, or refused, before the worker is ready).",
    )
    model_profile: Literal["full", "tiny"] = Field(
        "full",
        description="`full`: real weights from MODELS_DIR, refuse to start if missing. `tiny`: small random "
        "models of the same classes, built on first use under MODELS_DIR/tiny (CPU development, tests).",
    )
    device: str = Field("auto", description="`auto` (CUDA when present), `cuda` or `cpu`.")

    bucket_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint URL, without the bucket (AWS, R2, MinIO, Spaces...)."
    )
    bucket_access_key_id: str | None = Field(None, description="Access key of the bucket.")
    bucket_secret_access_key: str | None = Field(None, description="Secret key of the bucket.")
    bucket_name: str = Field(
        "workspace-temp", description="Bucket the assets go to; the first part of every URL."
    )
    bucket_region: str | None = Field(None, description="Region for request signing (default us-east-1).")
    local_storage_dir: Path | None = Field(
        None, description="Write the same keys under this directory instead of a bucket (development)."
    )
    storage_timeout_s: float = Field(30.0, gt=0, description="Connect and read timeout of one S3 request.")
    storage_max_attempts: int = Field(
        5, ge=1, le=20, description="Attempts per S3 request; transient faults are retried with backoff."
    )
    storage_check: bool = Field(
        True,
        description="At start-up, check that the bucket answers (one HEAD request, a few seconds at most) "
        "and refuse to start with one line naming the endpoint and bucket if it does not.",
    )
    strict_payloads: bool = Field(
        False,
        description="Refuse jobs with unknown keys at the top level or in `config` (with a did-you-mean). "
        "Off: such jobs run, the job log warns and the result's metadata lists them as `ignored_keys`.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        description="Log level of the worker and the runpod SDK. Below DEBUG, library warnings that mean "
        "nothing to a user (transformers, diffusers, torch) and weight-loading progress bars are hidden.",
    )

    max_reference_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest reference image download.")
    max_reference_pixels: int = Field(
        40_000_000, gt=0, description="Largest reference image in pixels, checked before decoding."
    )
    reference_timeout_s: float = Field(20.0, gt=0, description="Time allowed for one reference download.")
    progress_interval_s: float = Field(
        2.0, ge=0, description="At most one progress update per interval (RunPod's /status shows it)."
    )

    wan_turbo: bool = Field(
        True,
        description="Load FastWan 2.1 T2V 1.3B (MODELS_DIR/wan-turbo) with the Wan family, for video_turbo "
        "jobs; off: those jobs are refused and its 2.8 GB of GPU memory stay free.",
    )
    wan_vae_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16",
        description="On CUDA, the Wan VAE's precision (encode and decode): `bfloat16` decodes faster than "
        "`float32`, within a small error of it (both measured: docs/PERFORMANCE.md). CPU runs float32.",
    )
    enhance_max_new_tokens: int = Field(
        256,
        ge=1,
        le=2048,
        description="Prompt enhancement: the most tokens the LLM writes (an answer cut off there keeps its "
        "complete sentences).",
    )
    enhance_max_input_tokens: int = Field(
        3072,
        ge=64,
        le=32768,
        description="Prompt enhancement: the longest chat (system prompt and job prompt) in tokens; a longer "
        "one is not enhanced (the job runs with its own prompt). Sizes the LLM's KV cache.",
    )
    max_loras: int = Field(4, ge=0, le=16, description="Most LoRAs one job may name in config.loras.")
    max_lora_bytes: int = Field(2**30, gt=0, description="Largest LoRA file a job may download, in bytes.")
    lora_timeout_s: float = Field(120.0, gt=0, description="Time allowed for one LoRA download, in seconds.")
    loras_dir: Path | None = Field(
        None,
        description="Where LoRAs named by `name` live, as <name>.safetensors (default MODELS_DIR/loras; "
        "a network volume, say). Nothing outside it is read.",
    )
    lora_cache_dir: Path = Field(
        Path("/tmp/lora-cache"),
        description="Downloaded LoRAs, kept by content: the same URL, or the same sha256, downloads "
        "nothing the second time. Not writable: each job downloads to a temporary file.",
    )
    lora_cache_gb: float = Field(
        20.0, gt=0, description="Largest size of LORA_CACHE_DIR in GB; least recently used files go first."
    )

    compile: Literal["auto", "background", "wait", "on", "off"] = Field(
        "auto",
        description="Run AOT-compiled code (AOTInductor packages): the Wan transformer blocks at every video "
        "size, and the SDXL UNet and VAE decode with COMPILE_SDXL. Packages are compiled once into "
        "COMPILE_CACHE_DIR, checked against the eager model, and loaded by later starts. `auto`: on CUDA "
        "only, as `background`; `background`: a missing package does not hold the start: the worker is "
        "ready and serves eagerly at once while a child process compiles it, then switches to it between "
        "jobs (each asset's `compiled` says which served it); `wait`: missing packages are compiled "
        "before the worker is ready; `on`: as `wait`, and the worker refuses to start if a package "
        "cannot serve; `off`: eager. Jobs never compile: what a package does not cover runs eagerly. "
        "Timings: docs/PERFORMANCE.md.",
    )
    compile_retries: int = Field(
        1,
        ge=0,
        le=5,
        description="Background compiles of a package that failed (the child crashed, ran out of memory, "
        "was killed, or its package disagreed with the eager model) retried on later starts, per "
        "package and machine (counted in COMPILE_CACHE_DIR); after that the package stays eager there.",
    )
    compile_sdxl: bool = Field(
        True,
        description="With COMPILE on, also run the SDXL UNet and VAE decode AOT-compiled for 1024x1024 "
        "images, every batch size; other sizes run eagerly.",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="Where the compiled packages and the records of their checks are saved and reloaded "
        "(default MODELS_DIR/compile-cache); point it at a network volume to share them between workers.",
    )
    cuda_graphs: bool = Field(
        True,
        description="On CUDA, replay the SDXL text encoders and the prompt LLM's decode step from CUDA "
        "graphs captured at start-up: the same kernels, without launching each from Python.",
    )
    attention_backend: Literal["auto", "cudnn", "flash", "native"] = Field(
        "auto",
        description="Wan attention kernel: `auto` (cuDNN on CUDA), `cudnn`, `flash`, `native` "
        "(PyTorch SDPA).",
    )

    @field_validator("worker_models", mode="before")
    @classmethod
    def _split_families(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @field_validator("worker_models")
    @classmethod
    def _dedupe_families(cls, value: list[str]) -> list[str]:
        if not set(value) - {"prompt"}:
            raise ValueError("name at least one of: sdxl, wan (prompt only enhances their jobs)")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _one_storage_backend(self) -> Settings:
        bucket = [self.bucket_endpoint_url, self.bucket_access_key_id, self.bucket_secret_access_key]
        if self.local_storage_dir is not None and any(bucket):
            raise ValueError("set either LOCAL_STORAGE_DIR or the BUCKET_* variables, not both")
        if self.local_storage_dir is None and not any(bucket):
            raise ValueError(
                "no storage configured: set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID and "
                "BUCKET_SECRET_ACCESS_KEY (and optionally BUCKET_NAME, BUCKET_REGION), "
                "or LOCAL_STORAGE_DIR for local development"
            )
        if self.local_storage_dir is None and not all(bucket):
            missing = [name for name, value in zip(BUCKET_VARIABLES, bucket, strict=True) if not value]
            raise ValueError(f"the bucket is only partly configured: set {' and '.join(missing)} too")
        return self

    @property
    def loras_path(self) -> Path:
        """LORAS_DIR, or MODELS_DIR/loras."""
        return self.loras_dir or self.models_dir / "loras"

    @property
    def compile_cache_path(self) -> Path:
        """COMPILE_CACHE_DIR, or MODELS_DIR/compile-cache."""
        return self.compile_cache_dir or self.models_dir / "compile-cache"

    def compile_cache_problem(self) -> str | None:
        """Why compiled packages cannot be saved in COMPILE_CACHE_DIR, or None when they can (made if
        missing, then a file written and removed there)."""
        cache_dir = self.compile_cache_path
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            probe = cache_dir / f".write-check-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            return (
                f"COMPILE_CACHE_DIR={cache_dir} is not writable for this user (uid {os.getuid()}: "
                f"{err.strerror}): packages compiled here are not saved, so every start compiles again; "
                "make it writable or point COMPILE_CACHE_DIR elsewhere"
            )
        return None

    @property
    def torch_device(self) -> str:
        """The torch device name the models run on."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def load_settings() -> Settings:
    """Read settings from the environment, turning validation errors into one clear message."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as err:
        problems = "; ".join(
            f"{str(e['loc'][0]).upper() + ': ' if e['loc'] else ''}{e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise StartupError(f"invalid worker settings: {problems}") from None
