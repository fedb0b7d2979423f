"""The Wan transformers' blocks compiled ahead of time (AOTInductor), at every video size.

- Blocks are grouped into kinds by class and weights (names, shapes, dtypes): the T2V blocks and
  VACE's main blocks are one kind, VACE's first control block (it has an input projection) and
  its other control blocks two more. One package (``src/aot_package.py``) per kind.
- A package takes the block's weights as inputs, so it serves every block of its kind; the
  number of tokens (latent frames x latent height x latent width / 4) is its dynamic dimension,
  so every size and frame count a job may ask for runs compiled.
- A kind's inputs (dtypes, shapes but the tokens) are recorded from a pipeline's own call during
  the warm-up; calls that differ from them run the eager block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from src.acceleration import sdpa_backends
from src.aot_package import AotPackage, DynamicDim, package_identity

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the exported signature changes
# The transformer configuration a block's code depends on (beyond its weights' shapes).
BLOCK_CONFIG = (
    "num_attention_heads",
    "attention_head_dim",
    "qk_norm",
    "cross_attn_norm",
    "eps",
    "added_kv_proj_dim",
)
Shape = tuple[int, ...]


def _tensors(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(block.named_parameters()), **dict(block.named_buffers())}


def _flat(args: tuple[Any, ...]) -> list[Any] | None:
    """A block call's inputs as one list, the rotary embedding's (cos, sin) last; None if unusual."""
    if not args or not isinstance(args[-1], tuple) or len(args[-1]) != 2:
        return None
    return [*args[:-1], *args[-1]]


class _ClassForward(torch.nn.Module):
    """The block's own forward, never a routing forward installed on the instance."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> Any:
        return type(self.block).forward(self.block, *args)


class _BlockCall(torch.nn.Module):
    """A block's forward as a function of its inputs and its weights (what torch.export takes)."""

    def __init__(self, block: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.keys = [f"block.{name}" for name in names]
        self.blocks = [_ClassForward(block)]  # in a list: not a submodule, the export owns no weights

    def forward(self, inputs: list[torch.Tensor], weights: list[torch.Tensor]) -> Any:
        *tensors, cos, sin = inputs
        params = dict(zip(self.keys, weights, strict=True))
        return torch.func.functional_call(self.blocks[0], params, (*tensors, (cos, sin)))


class BlockKind:
    """The blocks of one class and weight layout, and their package once a call was recorded.

    The tokens are dimension 1 of every input but the text states (input 1) and the time
    embedding (third from last): hidden states, control states (VACE), the rotary cos and sin.
    """

    def __init__(self, blocks: list[torch.nn.Module], config: dict[str, Any]) -> None:
        self.blocks = blocks
        self.config = config  # the transformer configuration the blocks' code depends on
        tensors = _tensors(blocks[0])
        self.names = list(tensors)
        self.signature = [(name, list(t.shape), str(t.dtype)) for name, t in tensors.items()]
        self.device = next(iter(tensors.values())).device
        self.template: list[tuple[Shape, torch.dtype]] = []  # the recorded call's inputs
        self.package: AotPackage | None = None

    @property
    def name(self) -> str:
        return type(self.blocks[0]).__name__

    def record(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook: keep the first call's input shapes and dtypes."""
        inputs = _flat(args)
        if not self.template and inputs is not None and all(isinstance(t, torch.Tensor) for t in inputs):
            self.template = [(tuple(t.shape), t.dtype) for t in inputs]

    def token_inputs(self) -> list[int]:
        count = len(self.template)
        return [i for i in range(count) if i not in (1, count - 3)]

    def example(self, tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Random inputs like the recorded call's at ``tokens`` tokens, and the first block's weights."""
        at = set(self.token_inputs())
        inputs = [
            torch.randn((shape[0], tokens, *shape[2:]) if i in at else shape, device=self.device, dtype=dtype)
            for i, (shape, dtype) in enumerate(self.template)
        ]
        return inputs, self.weights(self.blocks[0])

    def weights(self, block: torch.nn.Module) -> list[torch.Tensor]:
        tensors = _tensors(block)
        return [tensors[name] for name in self.names]

    def covers(self, inputs: list[Any] | None) -> bool:
        """True when these inputs match the recorded call's, tokens aside (within the package's range)."""
        if inputs is None or len(inputs) != len(self.template) or self.package is None:
            return False
        tokens = inputs[0].shape[1] if isinstance(inputs[0], torch.Tensor) and inputs[0].ndim > 1 else -1
        if not self.package.dim.low <= tokens <= self.package.dim.high:
            return False
        at = self.token_inputs()
        for i, (tensor, (shape, dtype)) in enumerate(zip(inputs, self.template, strict=True)):
            expected = (shape[0], tokens, *shape[2:]) if i in at else shape
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.shape != expected:
                return False
            if tensor.device != self.device:
                return False
        return True

    def route(self, block: torch.nn.Module) -> Callable[..., Any]:
        """The block's forward: the package where it applies, the block's own forward elsewhere."""
        eager = type(block).forward.__get__(block)
        weights = self.weights(block)
        package = self.package
        assert package is not None

        def forward(*args: Any, **kwargs: Any) -> Any:
            inputs = None if kwargs else _flat(args)
            if not self.covers(inputs):
                return eager(*args, **kwargs)
            return package.run((inputs, weights), f"Wan {self.name}")

        return forward


class CompiledBlocks:
    """Every block of the Wan transformers, grouped into kinds, each kind served by its package."""

    def __init__(
        self,
        transformers: list[torch.nn.Module],
        cache_dir: Path,
        tokens: tuple[int, int],
        attention: str | None,
    ) -> None:
        """``tokens``: the size inductor tunes the kernels for, and the most a job may have."""
        kinds: dict[str, tuple[list[torch.nn.Module], dict[str, Any]]] = {}
        for transformer in transformers:
            config = {k: transformer.config[k] for k in BLOCK_CONFIG if k in transformer.config}
            for block in (*transformer.blocks, *getattr(transformer, "vace_blocks", ())):
                layout = [(name, t.shape, t.dtype) for name, t in _tensors(block).items()]
                key = repr([type(block).__name__, layout, config])
                kinds.setdefault(key, ([], config))[0].append(block)
        self.kinds = [BlockKind(blocks, config) for blocks, config in kinds.values()]
        self.cache_dir = cache_dir
        self.tuned_tokens, self.max_tokens = tokens
        self.attention = attention

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Within: each kind records its first call's inputs (run the pipelines once)."""
        handles = [kind.blocks[0].register_forward_pre_hook(kind.record) for kind in self.kinds]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def prepare(self) -> dict[str, float]:
        """Load each recorded kind's package (or compile and save it), check it, route its blocks to it.

        Returns the seconds of each phase, summed over the kinds. A kind that was not recorded or
        whose package fails stays eager.
        """
        timings: dict[str, float] = {}
        with sdpa_backends(self.attention):  # the kernel the compiled attention calls
            for kind in self.kinds:
                if not kind.template:
                    log.warning("Wan %s was not called during the warm-up: it runs eagerly", kind.name)
                    continue
                kind.package = self._package(kind)
                if kind.package.prepare(timings, "blocks_aot"):
                    for block in kind.blocks:
                        block.forward = kind.route(block)
                    log.info(
                        "Wan %s: %d blocks compiled, 2-%d tokens",
                        kind.name,
                        len(kind.blocks),
                        self.max_tokens,
                    )
                else:
                    kind.package = None
        return timings

    def _package(self, kind: BlockKind) -> AotPackage:
        recorded = kind.template[0][0][1]
        identity = package_identity(
            FORMAT,
            kind.device,
            block=kind.name,
            weights=kind.signature,
            config=kind.config,
            inputs=[[len(shape), str(dtype)] for shape, dtype in kind.template],
            tokens=[self.tuned_tokens, self.max_tokens],
            attention=self.attention,
        )
        at = set(kind.token_inputs())

        def dynamic_shapes(dim: torch.export.Dim) -> tuple[list[Any], list[None]]:
            """The tokens of the inputs that have them; the weights static."""
            inputs = [{1: dim} if i in at else None for i in range(len(kind.template))]
            return inputs, [None] * len(kind.names)

        return AotPackage(
            f"wan-{kind.name}",
            _BlockCall(kind.blocks[0], kind.names),
            kind.example,
            DynamicDim("tokens", 2, self.max_tokens, checked=(recorded, self.tuned_tokens)),
            dynamic_shapes,
            identity,
            self.cache_dir,
            kind.device,
        )
