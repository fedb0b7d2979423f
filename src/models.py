"""Where each model's weights live, and building the tiny profile's models on first use."""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from src.settings import Settings, StartupError

TINY_SUBDIR = "tiny"
DEFINITION_FILE = ".tiny-definition"  # the digest of the tiny models' source they were built from


def family_dir_names(family: str, settings: Settings) -> list[str]:
    """The directories under MODELS_DIR (or MODELS_DIR/tiny) that the family ``family`` loads."""
    if family == "wan":
        return ["wan-t2v", "wan-vace", *(["wan-turbo"] if settings.wan_turbo else [])]
    return [family]


def models_root(settings: Settings) -> Path:
    """Where the model directories are for MODEL_PROFILE: MODELS_DIR, or MODELS_DIR/tiny."""
    return settings.models_dir if settings.model_profile == "full" else settings.models_dir / TINY_SUBDIR


def family_dirs(family: str, settings: Settings) -> list[Path]:
    """The family's directories for MODEL_PROFILE (they may not exist yet)."""
    return [models_root(settings) / name for name in family_dir_names(family, settings)]


def device_map_kwargs(device: str) -> dict[str, str]:
    """``from_pretrained`` arguments that load weights straight onto the GPU (diffusers' and
    transformers' ``device_map``) instead of into CPU memory first; none elsewhere."""
    return {"device_map": device} if device == "cuda" else {}


def model_dirs(
    settings: Settings,
    names: list[str],
    build_tiny: Callable[..., None],
    hints: dict[str, str] | None = None,
    marker: str = "model_index.json",
) -> list[Path]:
    """The model directories for ``names`` under MODELS_DIR (diffusers' layout, or transformers' with
    ``marker="config.json"``).

    ``full``: they must exist (the worker never falls back to tiny models); ``hints`` add to the
    refusal, by directory name.
    ``tiny``: missing ones, or ones built from another definition (``tiny_definition``), are built
    by ``build_tiny(*dirs)`` and cached under ``MODELS_DIR/tiny``.
    """
    root = models_root(settings)
    dirs = [root / name for name in names]
    if settings.model_profile == "full":
        for path in dirs:
            if not (path / marker).is_file():
                hint = (hints or {}).get(path.name, "")
                raise StartupError(
                    f"model weights missing: {path} has no {marker}. Bake them with "
                    "builder/download_models.py, point MODELS_DIR at them, or use "
                    f"MODEL_PROFILE=tiny for CPU development{'; ' + hint if hint else ''}"
                )
        return dirs
    definition = tiny_definition(build_tiny)
    if not all(_built_from(path, definition, marker) for path in dirs):
        try:
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
        except OSError as err:
            raise StartupError(
                f"MODEL_PROFILE=tiny builds its models under MODELS_DIR/{TINY_SUBDIR}, but {root} cannot be "
                f"written ({err.strerror}): set MODELS_DIR to a writable directory (uid {os.getuid()})"
            ) from None
        try:
            build_tiny(*(staging / name for name in names))
            for name, path in zip(names, dirs, strict=True):
                (staging / name / DEFINITION_FILE).write_text(definition)
                shutil.rmtree(path, ignore_errors=True)
                (staging / name).replace(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dirs


def tiny_definition(build_tiny: Callable[..., None]) -> str:
    """A digest of the source that defines the tiny models, and of the data files it reads (its
    module's ``TINY_INPUTS``): a changed definition rebuilds them."""
    module = inspect.getmodule(build_tiny)
    paths = [Path(inspect.getsourcefile(build_tiny) or ""), *getattr(module, "TINY_INPUTS", ())]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _built_from(path: Path, definition: str, marker: str) -> bool:
    try:
        return (path / marker).is_file() and (path / DEFINITION_FILE).read_text() == definition
    except OSError:
        return False
