"""The prompt LLM's modules computed in fewer kernels: RMSNorms by ``F.rms_norm``, and gated MLPs'
gate and up projections as one matrix product.

**RMSNorm.** transformers' ``Qwen2RMSNorm`` (and Llama's, Mistral's, Qwen3's: the same code)
normalises in float32 in eight kernels: cast, square, mean, add, rsqrt, multiply, cast back, scale.
A decode step of Qwen2.5-7B runs 57 of them (two per layer and the final one) on a ``(1, 1, 3584)``
row, so they are hundreds of kernels of almost no work each in the step's CUDA graph.
``F.rms_norm`` computes the same in one kernel on CUDA (PyTorch's fused kernel,
pytorch/pytorch#153666, since 2.9), scaling before it rounds back to bfloat16 instead of after (a
difference of bfloat16 rounding). A norm class is routed only where its own forward has the shape
above (a 1-D ``weight`` and a ``variance_epsilon``) and ``F.rms_norm`` gives its output on random
rows within ``MAX_RELATIVE_ERROR``: Gemma's RMSNorm, which scales by ``1 + weight``, keeps its own.

**Gated MLP.** ``Qwen2MLP`` (Llama's, Mistral's: the same code) computes
``down(act(gate(x)) * up(x))``: two matrix-vector products of one row per decode step, each
reading a ``(18944, 3584)`` weight. Read as one ``(37888, 3584)`` weight in one product they took
12% less time on an H100 (28 layers: 2.70 against 3.08 ms; docs/PERFORMANCE.md). The two
projections' weights become the halves of the joined weight (views: nothing is held twice), so
the module's own forward still computes from them. A class is routed where it has those three
bias-free projections and ``act_fn``, and the joined product gives its output on random rows
within ``MAX_RELATIVE_ERROR``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

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


def fuse_rms_norms(model: torch.nn.Module) -> list[Route]:
    """Route every RMSNorm of ``model`` whose class ``F.rms_norm`` reproduces to it (see the module)."""
    routes, verdicts = _route_where_reproduced(model, _shaped_like_qwen, FusedRmsNorm, "F.rms_norm", 4.0)
    kept = sorted(kind.__name__ for kind, fused in verdicts.items() if not fused)
    kept_text = f" ({kept} kept)" if kept else ""
    log.info("prompt LLM: %d RMSNorms computed by F.rms_norm%s", len(routes), kept_text)
    return routes


class JoinedGateUp:
    """One gated MLP's forward with its gate and up projections joined into one weight."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        gate, up = mlp.gate_proj, mlp.up_proj
        self.weight = torch.cat([gate.weight.detach(), up.weight.detach()])
        self.intermediate = gate.out_features
        gate.weight = torch.nn.Parameter(self.weight[: self.intermediate], requires_grad=False)
        up.weight = torch.nn.Parameter(self.weight[self.intermediate :], requires_grad=False)
        self.act_fn = mlp.act_fn
        self.down_proj = mlp.down_proj

    def serves(self, x: object = None, *args: object, **kwargs: object) -> bool:
        """True for the module's call: one tensor of the weight's dtype and device, its last
        dimension the weight's."""
        return (
            not args
            and not kwargs
            and isinstance(x, torch.Tensor)
            and x.shape[-1:] == self.weight.shape[1:]
            and x.dtype == self.weight.dtype
            and x.device == self.weight.device
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        joined = torch.nn.functional.linear(x, self.weight)
        gate, up = joined[..., : self.intermediate], joined[..., self.intermediate :]
        return self.down_proj(self.act_fn(gate) * up)


def _shaped_like_gated_mlp(module: torch.nn.Module) -> bool:
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (
        all(isinstance(p, torch.nn.Linear) and p.bias is None for p in projections)
        and projections[0].in_features == projections[1].in_features
        and projections[0].out_features == projections[1].out_features
        and callable(getattr(module, "act_fn", None))
    )


def join_gate_up(model: torch.nn.Module) -> list[Route]:
    """Route every gated MLP of ``model`` whose class the joined product reproduces to it (the
    module's own forward is unchanged by the join, whatever the verdict)."""
    routes, _ = _route_where_reproduced(
        model, _shaped_like_gated_mlp, JoinedGateUp, "gate and up joined", 1.0
    )
    log.info("prompt LLM: %d MLPs with their gate and up projections joined", len(routes))
    return routes


def _route_where_reproduced(
    model: torch.nn.Module,
    shaped: Callable[[torch.nn.Module], bool],
    runner_for: Callable[[torch.nn.Module], Any],
    what: str,
    scale: float,
) -> tuple[list[Route], dict[type, bool]]:
    """Route each module of ``model`` that is ``shaped`` to ``runner_for(module)`` where the first
    runner of its class gives the class's own forward within MAX_RELATIVE_ERROR on random rows
    (standard normal times ``scale``); the routes, and each class's verdict."""
    verdicts: dict[type, bool] = {}
    routes = []
    for module in model.modules():
        kind = type(module)
        if verdicts.get(kind) is False or not shaped(module):
            continue
        runner = runner_for(module)
        if kind not in verdicts:
            error = _error_on_random_rows(module, runner, scale)
            verdicts[kind] = error <= MAX_RELATIVE_ERROR
            log.info("%s: %s vs its forward: relative error %.3g", kind.__name__, what, error)
        if verdicts[kind]:
            routes.append(route(module, "forward", runner))
    return routes, verdicts


@torch.inference_mode()
def _error_on_random_rows(module: torch.nn.Module, runner: Any, scale: float) -> float:
    """The relative error of ``runner`` against ``module``'s own forward on random rows as wide as
    the runner's weight (its last dimension)."""
    weight = runner.weight
    generator = torch.Generator(device=weight.device).manual_seed(0)
    rows = torch.randn(2, 3, weight.shape[-1], generator=generator, device=weight.device) * scale
    rows = rows.to(weight.dtype)
    return relative_error(runner(rows), type(module).forward(module, rows))


def fuse_modules(model: torch.nn.Module) -> list[Route]:
    """Route ``model``'s RMSNorms and gated MLPs to their fused forms where they reproduce them."""
    return fuse_rms_norms(model) + join_gate_up(model)
