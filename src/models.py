"""Where each model's weights live, and building the tiny profile's models on first use."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from src.settings import Settings, StartupError

TINY_SUBDIR = "tiny"


def device_map_kwargs(device: str) -> dict[str, str]:
    """``from_pretrained`` arguments that load weights straight onto the GPU (diffusers' and
    transformers' ``device_map``) instead of into CPU memory first; none elsewhere."""
    return {"device_map": device} if device == "cuda" else {}


def model_dirs(settings: Settings, names: list[str], build_tiny: Callable[..., None]) -> list[Path]:
    """The diffusers directories for ``names`` under MODELS_DIR.

    ``full``: they must exist (the worker never falls back to tiny models).
    ``tiny``: missing ones are built by ``build_tiny(*dirs)`` and cached under
    ``MODELS_DIR/tiny``.
    """
    if settings.model_profile == "full":
        dirs = [settings.models_dir / name for name in names]
        for path in dirs:
            if not (path / "model_index.json").is_file():
                raise StartupError(
                    f"model weights missing: {path} has no model_index.json. Bake them with "
                    "builder/download_models.py, point MODELS_DIR at them, or use "
                    "MODEL_PROFILE=tiny for CPU development"
                )
        return dirs
    root = settings.models_dir / TINY_SUBDIR
    dirs = [root / name for name in names]
    if not all((path / "model_index.json").is_file() for path in dirs):
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
        try:
            build_tiny(*(staging / name for name in names))
            for name, path in zip(names, dirs, strict=True):
                shutil.rmtree(path, ignore_errors=True)
                (staging / name).replace(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dirs
