"""GPU speed paths: attention backend, start-up compilation and its cache.

Rules:
- Compilation happens only at start-up (warm-up), never on a request: after warm-up the
  compiler's stance is ``eager_on_recompile``, so a job whose shapes were not warmed runs
  the eager model instead of waiting for a compile, and warmed shapes run compiled code.
- Compile artifacts (``torch.compiler.save_cache_artifacts``: inductor graphs, Triton
  kernels, autotuning results) are saved after the first warm-up under
  ``COMPILE_CACHE_DIR`` (default ``MODELS_DIR/compile-cache``) and loaded by the next
  worker before it warms up, so it skips the code generation.
- Everything here is a no-op on CPU unless explicitly turned on (``COMPILE=on``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from src.settings import Settings

log = logging.getLogger(__name__)

CUDNN_BACKEND = "_native_cudnn"
ATTENTION_BACKENDS = {"cudnn": "_native_cudnn", "flash": "_native_flash", "native": None}
SERVE_STANCE = "eager_on_recompile"
ALLOCATOR_CONFIG = "expandable_segments:True"
ALLOCATOR_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
BACKEND: Any = "inductor"  # torch.compile backend (tests swap in a counting one)


def configure_cuda_allocator() -> None:
    """Expandable segments in PyTorch's CUDA allocator, unless its variables are set already.

    With both families resident, the SDXL and Wan jobs' differently sized buffers fragmented the
    cache: on the H100 the reserved peak went from 39.24 GiB (42.1 GB) to 35.49 GiB with this,
    allocated memory and speed unchanged (docs/PERFORMANCE.md). PyTorch reads the variable when
    CUDA first allocates, so this runs before any model loads.
    """
    if not any(name in os.environ for name in ALLOCATOR_VARIABLES):
        os.environ[ALLOCATOR_VARIABLES[0]] = ALLOCATOR_CONFIG


def compile_enabled(settings: Settings, device: str) -> bool:
    """``COMPILE``: ``auto`` compiles on CUDA only; ``on`` / ``off`` force it."""
    if settings.compile == "auto":
        return device.startswith("cuda")
    return settings.compile == "on"


def attention_backend(settings: Settings, device: str) -> str | None:
    """The diffusers attention backend to use for Wan, or None for PyTorch's default SDPA."""
    choice = settings.attention_backend
    if choice == "auto":
        return CUDNN_BACKEND if device.startswith("cuda") else None
    return ATTENTION_BACKENDS[choice]


def set_attention_backend(models: Iterable[Any], backend: str | None) -> None:
    """Route the models' attention through ``backend`` (diffusers' attention dispatcher)."""
    if backend is None:
        return
    for model in models:
        model.set_attention_backend(backend)
    log.info("attention backend: %s", backend)


def compile_repeated_blocks(model: Any) -> None:
    """Regional compilation: the model's repeated transformer blocks (shared compiled code)."""
    model.compile_repeated_blocks(backend=BACKEND)


def serve_without_compiling() -> None:
    """From now on, reuse compiled code whose guards match and run eagerly otherwise."""
    torch.compiler.set_stance(SERVE_STANCE)


class CompileCache:
    """Compile artifacts for one (torch, diffusers, GPU, models, settings) combination."""

    def __init__(self, directory: Path, identity: dict[str, Any]) -> None:
        self.directory = directory
        self.identity = identity
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.path = directory / f"torch-compile-{digest}.bin"
        self.loaded = False

    @classmethod
    def for_worker(cls, settings: Settings, device: str, extra: dict[str, Any]) -> CompileCache:
        """The cache file for this worker's settings and the machine it runs on."""
        import diffusers

        gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
        identity = {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "device": gpu,
            "capability": list(torch.cuda.get_device_capability()) if device.startswith("cuda") else None,
            "families": list(settings.worker_models),
            "attention": settings.attention_backend,
            **extra,
        }
        return cls(settings.compile_cache_path, identity)

    def load(self) -> bool:
        """Preload the compiler's caches from the file, if present; True when loaded."""
        if not self.path.is_file():
            log.info("no compile cache at %s: warm-up compiles (slow, once)", self.path)
            return False
        started = time.perf_counter()
        try:
            torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as err:  # a stale or corrupt file must never stop the worker
            log.warning("ignoring compile cache %s: %s: %s", self.path, type(err).__name__, err)
            return False
        self.loaded = True
        log.info("compile cache loaded from %s in %.1f s", self.path, time.perf_counter() - started)
        return True

    def save(self) -> bool:
        """Write this process's compile artifacts (atomically); False when there is nothing or no room."""
        try:
            artifacts = torch.compiler.save_cache_artifacts()
        except Exception as err:
            log.warning("could not collect compile artifacts: %s: %s", type(err).__name__, err)
            return False
        if not artifacts:
            return False
        data, _info = artifacts
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{self.path.name}.")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, self.path)
            (self.directory / f"{self.path.stem}.json").write_text(json.dumps(self.identity, indent=2))
        except OSError as err:
            log.warning("could not save the compile cache under %s: %s", self.directory, err)
            return False
        log.info("compile cache saved: %s (%.1f MB)", self.path, len(data) / 1e6)
        return True
