"""Worker settings, read once from the environment at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Family = Literal["sdxl", "wan"]


class StartupError(RuntimeError):
    """The worker cannot start as configured; the message says what to fix."""


class Settings(BaseSettings):
    """Every environment variable the worker reads (documented in README.md)."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, env_ignore_empty=True)

    models_dir: Path = Field(Path("/models"), description="Where the baked model weights live.")
    worker_models: Annotated[list[Family], NoDecode] = Field(
        default=["sdxl", "wan"], description="Model families to load and warm, comma-separated."
    )
    model_profile: Literal["full", "tiny"] = Field(
        "full", description="`full`: real weights from MODELS_DIR. `tiny`: small random models."
    )
    device: str = Field("auto", description="`auto` (CUDA when present), `cuda` or `cpu`.")

    bucket_endpoint_url: str | None = None
    bucket_access_key_id: str | None = None
    bucket_secret_access_key: str | None = None
    bucket_name: str = "workspace-temp"
    bucket_region: str | None = None
    local_storage_dir: Path | None = None
    storage_timeout_s: float = Field(30.0, gt=0, description="Connect/read timeout of one S3 request.")
    storage_max_attempts: int = Field(5, ge=1, le=20, description="Attempts per S3 request (with backoff).")

    max_reference_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_reference_pixels: int = Field(40_000_000, gt=0)
    reference_timeout_s: float = Field(20.0, gt=0)
    progress_interval_s: float = Field(2.0, ge=0)

    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Run AOT-compiled code (AOTInductor packages; `auto`: on CUDA only): the Wan "
        "transformer blocks at every video size, and the SDXL UNet and VAE decode with COMPILE_SDXL. The "
        "first start compiles the packages into COMPILE_CACHE_DIR and checks each against the eager model; "
        "later starts load them, unchecked. Jobs never compile: what a package does not cover runs eagerly.",
    )
    compile_sdxl: bool = Field(
        True,
        description="With COMPILE on, also run the SDXL UNet and VAE decode AOT-compiled at 1024x1024, "
        "every batch size: 1.6x faster end to end than plain diffusers on an H200, 2.0-2.7x on an H100; the "
        "first start compiles them (4-9 minutes, once per GPU type and version), later starts load them in "
        "under a second from COMPILE_CACHE_DIR.",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="Where the compiled packages and the records of their checks are saved and reloaded "
        "(default MODELS_DIR/compile-cache); point it at a network volume to share them between workers.",
    )
    cuda_graphs: bool = Field(
        True,
        description="On CUDA, replay the SDXL text encoders from CUDA graphs captured at start-up: the "
        "same kernels, without launching each from Python (51 -> 7 ms per SDXL job on an H100).",
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
    def _dedupe_families(cls, value: list[Family]) -> list[Family]:
        if not value:
            raise ValueError("name at least one of: sdxl, wan")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _one_storage_backend(self) -> Settings:
        bucket = [self.bucket_endpoint_url, self.bucket_access_key_id, self.bucket_secret_access_key]
        if self.local_storage_dir is not None and any(bucket):
            raise ValueError("set either LOCAL_STORAGE_DIR or the BUCKET_* variables, not both")
        if self.local_storage_dir is None and not all(bucket):
            raise ValueError(
                "no storage configured: set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID and "
                "BUCKET_SECRET_ACCESS_KEY (and optionally BUCKET_NAME, BUCKET_REGION), "
                "or LOCAL_STORAGE_DIR for local development"
            )
        return self

    @property
    def compile_cache_path(self) -> Path:
        """COMPILE_CACHE_DIR, or MODELS_DIR/compile-cache."""
        return self.compile_cache_dir or self.models_dir / "compile-cache"

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
