"""The prompt LLM's RMSNorms computed by PyTorch's ``F.rms_norm`` (one fused kernel on CUDA).

transformers' ``Qwen2RMSNorm`` (and Llama's, Mistral's, Qwen3's: the same code) normalises in
float32 in eight kernels: cast, square, mean, add, rsqrt, multiply, cast back, scale. A decode
step of Qwen2.5-7B runs 57 of them (two per layer and the final one) on a ``(1, 1, 3584)`` row, so
they are hundreds of kernels of almost no work each in the step's CUDA graph. ``F.rms_norm``
computes the same in one kernel on CUDA (PyTorch's fused kernel, pytorch/pytorch#153666, since
2.9), scaling before it rounds back to bfloat16 instead of after (a difference of bfloat16
rounding).

A norm class is routed only where its own forward has the shape above (a 1-D ``weight`` and a
``variance_epsilon``) and ``F.rms_norm`` gives its output on random rows within ``MAX_RELATIVE_ERROR``:
Gemma's RMSNorm, which scales by ``1 + weight``, keeps its own forward.
"""

from __future__ import annotations

import logging

import torch

from src.fast_path import Route, relative_error, route

log = logging.getLogger(__name__)

MAX_RELATIVE_ERROR = 1e-2  # bfloat16 rounds to 2**-9 relative: one rounding more or less is ~2e-3


class FusedRmsNorm:
    """One RMSNorm module's forward as ``F.rms_norm`` with its weight and epsilon."""

    def __init__(self, norm: torch.nn.Module) -> None:
        self.weight: torch.Tensor = norm.weight
        self.eps: float = norm.variance_epsilon

    def serves(self, hidden_states: object = None, *args: object, **kwargs: object) -> bool:
        """True for the module's call: one tensor of the weight's dtype, its last dimension the weight's."""
        return (
            not args
            and not kwargs
            and isinstance(hidden_states, torch.Tensor)
            and hidden_states.shape[-1:] == self.weight.shape
            and hidden_states.dtype == self.weight.dtype
        )

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.eps)


def _shaped_like_qwen(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.nn.Parameter)
        and weight.ndim == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


@torch.inference_mode()
def _fused_error(norm: torch.nn.Module) -> float:
    """The relative error of ``F.rms_norm`` against the module's own forward on random rows."""
    weight = norm.weight
    generator = torch.Generator(device=weight.device).manual_seed(0)
    rows = torch.randn(2, 3, weight.shape[0], generator=generator, device=weight.device) * 4
    rows = rows.to(weight.dtype)
    own = type(norm).forward(norm, rows)
    return relative_error(FusedRmsNorm(norm)(rows), own)


def fuse_rms_norms(model: torch.nn.Module) -> list[Route]:
    """Route every RMSNorm of ``model`` whose class ``F.rms_norm`` reproduces to it (see the module)."""
    verdicts: dict[type, bool] = {}
    routes = []
    for module in model.modules():
        kind = type(module)
        if kind not in verdicts and _shaped_like_qwen(module):
            error = _fused_error(module)
            verdicts[kind] = error <= MAX_RELATIVE_ERROR
            log.info("%s: F.rms_norm vs its forward: relative error %.3g", kind.__name__, error)
        if verdicts.get(kind):
            routes.append(route(module, "forward", FusedRmsNorm(module)))
    kept = sorted(kind.__name__ for kind, fused in verdicts.items() if not fused)
    kept_text = f" ({kept} kept)" if kept else ""
    log.info("prompt LLM: %d RMSNorms computed by F.rms_norm%s", len(routes), kept_text)
    return routes
