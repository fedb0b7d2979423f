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


@torch.inference_mode()
def _joined_error(mlp: torch.nn.Module, joined: JoinedGateUp) -> float:
    """The relative error of the joined product against the module's own forward on random rows."""
    weight = joined.weight
    generator = torch.Generator(device=weight.device).manual_seed(0)
    rows = torch.randn(2, 3, weight.shape[1], generator=generator, device=weight.device).to(weight.dtype)
    return relative_error(joined(rows), type(mlp).forward(mlp, rows))


def join_gate_up(model: torch.nn.Module) -> list[Route]:
    """Route every gated MLP of ``model`` whose class the joined product reproduces to it."""
    verdicts: dict[type, bool] = {}
    routes = []
    for module in model.modules():
        kind = type(module)
        if verdicts.get(kind) is False or not _shaped_like_gated_mlp(module):
            continue
        joined = JoinedGateUp(module)  # the module's own forward is unchanged by the join
        if kind not in verdicts:
            error = _joined_error(module, joined)
            verdicts[kind] = error <= MAX_RELATIVE_ERROR
            log.info("%s: gate and up joined vs its forward: relative error %.3g", kind.__name__, error)
        if verdicts[kind]:
            routes.append(route(module, "forward", joined))
    log.info("prompt LLM: %d MLPs with their gate and up projections joined", len(routes))
    return routes


def fuse_modules(model: torch.nn.Module) -> list[Route]:
    """Route ``model``'s RMSNorms and gated MLPs to their fused forms where they reproduce them."""
    return fuse_rms_norms(model) + join_gate_up(model)
