"""GPU speed paths: the CUDA allocator, the attention backend, whether to compile.

Compiling happens ahead of time (AOTInductor packages: ``src/aot_package.py``), at start-up or in a
child process (``src/background.py``), never on a request; everything here is a no-op on CPU
unless explicitly turned on (``COMPILE=on``, ``wait`` or ``background``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from src.settings import Settings

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = {"cudnn": "_native_cudnn", "flash": "_native_flash", "native": None}
# The PyTorch SDPA kernel each diffusers backend calls (what a compiled graph must call too).
SDPA_KERNELS = {"_native_cudnn": SDPBackend.CUDNN_ATTENTION, "_native_flash": SDPBackend.FLASH_ATTENTION}
ALLOCATOR_CONFIG = "expandable_segments:True"
ALLOCATOR_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def configure_cuda_allocator() -> None:
    """Expandable segments in PyTorch's CUDA allocator, unless its variables are set already.

    With both families resident, the SDXL and Wan jobs' differently sized buffers fragmented the
    cache; with this, the reserved peak is lower, allocated memory and speed unchanged
    (docs/PERFORMANCE.md). PyTorch reads the variable when CUDA first allocates, so this runs
    before any model loads.
    """
    if not any(name in os.environ for name in ALLOCATOR_VARIABLES):
        os.environ[ALLOCATOR_VARIABLES[0]] = ALLOCATOR_CONFIG


def compile_enabled(settings: Settings, device: str) -> bool:
    """``COMPILE``: ``auto`` compiles on CUDA only; ``off`` never; the others on any device."""
    if settings.compile == "auto":
        return device.startswith("cuda")
    return settings.compile != "off"


def compile_in_background(settings: Settings, device: str) -> bool:
    """True when a missing package is compiled by a child process while the worker serves eagerly
    (``COMPILE=background``, or ``auto`` on CUDA), not before the worker is ready."""
    return settings.compile == "background" or (settings.compile == "auto" and device.startswith("cuda"))


def required_settings(settings: Settings) -> frozenset[str]:
    """The fast-path settings explicitly on, whose paths must serve (``COMPILE=on``)."""
    return frozenset({"COMPILE"}) if settings.compile == "on" else frozenset()


def attention_backend(settings: Settings, device: str) -> str | None:
    """The diffusers attention backend to use for Wan, or None for PyTorch's default SDPA."""
    choice = settings.attention_backend
    if choice == "auto":
        return ATTENTION_BACKENDS["cudnn"] if device.startswith("cuda") else None
    return ATTENTION_BACKENDS[choice]


def set_attention_backend(models: Iterable[Any], backend: str | None) -> None:
    """Route the models' attention through ``backend`` (diffusers' attention dispatcher)."""
    if backend is None:
        return
    for model in models:
        model.set_attention_backend(backend)
    log.info("attention backend: %s", backend)


def sdpa_backends(backend: str | None) -> AbstractContextManager[Any]:
    """Within: PyTorch's SDPA uses the kernel of diffusers' ``backend`` (None: PyTorch's choice).

    Export keeps attention as one SDPA call and picks its kernel when it compiles, outside the
    context diffusers opens around each call: compiling within this one keeps the same kernel.
    """
    kernel = SDPA_KERNELS.get(backend) if backend else None
    return sdpa_kernel(kernel) if kernel is not None else nullcontext()


def conv3d_channels_last(model: torch.nn.Module) -> None:
    """Store the 3-D convolutions' weights channels-last (NDHWC); their other parameters stay.

    cuDNN then runs them without transposing each activation to NDHWC and back: the Wan VAE
    decode is faster (docs/PERFORMANCE.md).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
