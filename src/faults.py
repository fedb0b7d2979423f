"""Which failures mean the GPU may be in a bad state (so RunPod should replace the worker)."""

from __future__ import annotations

import contextlib

import torch

_GPU_MARKERS = ("CUDA", "cuDNN", "CUBLAS", "cublas", "NCCL", "device-side assert", "illegal memory access")


def is_gpu_fault(err: BaseException) -> bool:
    """True for CUDA out-of-memory and other CUDA/driver errors."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _GPU_MARKERS)


def describe_gpu_fault(err: BaseException) -> str:
    """A one-line reason for the error string."""
    kind = "out of memory" if isinstance(err, torch.OutOfMemoryError) else "CUDA error"
    message = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return f"GPU {kind}, this worker will be replaced: {message}"


def release_gpu_memory() -> None:
    """Free cached blocks after a failure, best effort."""
    if torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.empty_cache()
