"""The Wan transformers' blocks compiled ahead of time (AOTInductor), at every video size.

- Blocks are grouped into kinds by class and weights (names, shapes, dtypes): the T2V blocks and
  VACE's main blocks are one kind, VACE's first control block (it has an input projection) and
  its other control blocks two more. One package (``src/aot_package.py``) per kind: each kind is
  a fast path (``src/fast_path.py``).
- A package takes the block's weights as inputs, so it serves every block of its kind; the
  number of tokens (latent frames x latent height x latent width / 4) is its dynamic dimension,
  so every size and frame count a job may ask for runs compiled.
- A kind's inputs (names, dtypes, shapes) are recorded from a pipeline's own call during the
  warm-up; the inputs named in TOKEN_INPUTS carry the tokens. Calls that differ from the
  recorded one, tokens aside, run the eager block.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from src.acceleration import sdpa_backends
from src.aot_package import AotPackage, DynamicDim
from src.compile_cache import package_identity
from src.fast_path import Route, UnavailableError, route
from src.timing import Phases

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
# The block inputs whose dimension 1 is the tokens (the rotary embedding's cos and sin too); the
# text states and the time embedding have fixed shapes.
TOKEN_INPUTS = frozenset({"hidden_states", "control_hidden_states", "rotary_emb"})
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
    """The blocks of one class and weight layout: a fast path served by one package.

    Its first block records the inputs of its first call (a forward pre-hook, removed when the
    kind is prepared): the warm-up's pipelines call every kind.
    """

    setting = "COMPILE"

    def __init__(
        self,
        blocks: list[torch.nn.Module],
        config: dict[str, Any],
        name: str,
        cache_dir: Path,
        tokens: tuple[int, int],
        attention: str | None,
        compile_missing: bool = True,
    ) -> None:
        """``tokens``: the size inductor tunes the kernels for, and the most a job may have;
        ``compile_missing``: compile a missing package when prepared (``AotPackage``)."""
        self.blocks = blocks
        self.config = config  # the transformer configuration the blocks' code depends on
        self.name = name
        self.cache_dir = cache_dir
        self.tuned_tokens, self.max_tokens = tokens
        self.attention = attention
        self.compile_missing = compile_missing
        tensors = _tensors(blocks[0])
        self.names = list(tensors)
        self.signature = [(name, list(t.shape), str(t.dtype)) for name, t in tensors.items()]
        self.device = next(iter(tensors.values())).device
        self.template: list[tuple[str, Shape, torch.dtype]] = []  # the recorded call's inputs, by name
        self.package: AotPackage | None = None
        self._hook = blocks[0].register_forward_pre_hook(self._record)

    @property
    def block_class(self) -> str:
        return type(self.blocks[0]).__name__

    def _record(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        """Keep the first call's input names, shapes and dtypes (the rotary embedding's cos and sin last)."""
        inputs = _flat(args)
        if self.template or inputs is None or not all(isinstance(t, torch.Tensor) for t in inputs):
            return
        names = list(inspect.signature(type(module).forward).parameters)[1 : len(args) + 1]
        names = [*names[:-1], names[-1], names[-1]]  # the last argument is (cos, sin)
        self.template = [(name, tuple(t.shape), t.dtype) for name, t in zip(names, inputs, strict=True)]

    def token_inputs(self) -> set[int]:
        """Positions of the recorded inputs that carry the tokens."""
        return {i for i, (name, _, _) in enumerate(self.template) if name in TOKEN_INPUTS}

    def example(self, tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Random inputs like the recorded call's at ``tokens`` tokens, and the first block's weights."""
        shapes = self._shapes(tokens)
        inputs = [
            torch.randn(shape, device=self.device, dtype=dtype)
            for shape, (_, _, dtype) in zip(shapes, self.template, strict=True)
        ]
        return inputs, self.weights(self.blocks[0])

    def weights(self, block: torch.nn.Module) -> list[torch.Tensor]:
        tensors = _tensors(block)
        return [tensors[name] for name in self.names]

    def serves(self, inputs: list[Any] | None) -> bool:
        """True when these inputs match the recorded call's, tokens aside (within the package's range)."""
        if inputs is None or len(inputs) != len(self.template) or self.package is None:
            return False
        tokens = inputs[0].shape[1] if isinstance(inputs[0], torch.Tensor) and inputs[0].ndim > 1 else -1
        if not self.package.dim.low <= tokens <= self.package.dim.high:
            return False
        for tensor, expected, (_, _, dtype) in zip(inputs, self._shapes(tokens), self.template, strict=True):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.shape != expected:
                return False
            if tensor.device != self.device:
                return False
        return True

    def prepare(self, phases: Phases) -> list[Route]:
        """Load the kind's package (or compile and save it), check it, route its blocks to it."""
        self._hook.remove()
        if not self.template:
            raise UnavailableError("not called during the warm-up")
        self.package = self._package()
        with sdpa_backends(self.attention):  # the kernel the compiled attention calls
            try:
                self.package.prepare(phases, "blocks_aot")
            except UnavailableError:
                self.package = None
                raise
        log.info("%s: %d blocks compiled, 2-%d tokens", self.name, len(self.blocks), self.max_tokens)
        return [route(block, "forward", _BlockRunner(self, block)) for block in self.blocks]

    def _shapes(self, tokens: int) -> list[Shape]:
        at = self.token_inputs()
        return [
            (shape[0], tokens, *shape[2:]) if i in at else shape
            for i, (_, shape, _) in enumerate(self.template)
        ]

    def _package(self) -> AotPackage:
        recorded = self.template[0][1][1]
        identity = package_identity(
            FORMAT,
            self.device,
            block=self.block_class,
            weights=self.signature,
            config=self.config,
            inputs=[[len(shape), str(dtype)] for _, shape, dtype in self.template],
            tokens=[self.tuned_tokens, self.max_tokens],
            attention=self.attention,
        )
        at = self.token_inputs()

        def dynamic_shapes(dim: torch.export.Dim) -> tuple[list[Any], list[None]]:
            """The tokens of the inputs that have them; the weights static."""
            inputs = [{1: dim} if i in at else None for i in range(len(self.template))]
            return inputs, [None] * len(self.names)

        return AotPackage(
            f"wan-{self.block_class}",
            _BlockCall(self.blocks[0], self.names),
            self.example,
            DynamicDim("tokens", 2, self.max_tokens, checked=(recorded, self.tuned_tokens)),
            dynamic_shapes,
            identity,
            self.cache_dir,
            self.device,
            compile_missing=self.compile_missing,
        )


class _BlockRunner:
    """One block's calls that its kind's package serves, with this block's weights."""

    def __init__(self, kind: BlockKind, block: torch.nn.Module) -> None:
        self.kind = kind
        self.weights = kind.weights(block)

    def serves(self, *args: Any, **kwargs: Any) -> bool:
        return not kwargs and self.kind.serves(_flat(args))

    def __call__(self, *args: Any) -> Any:
        assert self.kind.package is not None
        return self.kind.package.run((_flat(args), self.weights), f"Wan {self.kind.block_class}")


def block_kinds(
    transformers: Sequence[torch.nn.Module],
    cache_dir: Path,
    tokens: tuple[int, int],
    attention: str | None,
    compile_missing: bool = True,
) -> list[BlockKind]:
    """Every block of the Wan transformers, grouped into kinds (each kind's first block recording).

    ``tokens``: the size inductor tunes the kernels for, and the most a job may have.
    """
    groups: dict[str, tuple[list[torch.nn.Module], dict[str, Any]]] = {}
    for transformer in transformers:
        config = {k: transformer.config[k] for k in BLOCK_CONFIG if k in transformer.config}
        for block in (*transformer.blocks, *getattr(transformer, "vace_blocks", ())):
            layout = [(name, t.shape, t.dtype) for name, t in _tensors(block).items()]
            key = repr([type(block).__name__, layout, config])
            groups.setdefault(key, ([], config))[0].append(block)
    kinds: list[BlockKind] = []
    for blocks, config in groups.values():
        name = f"wan-{type(blocks[0]).__name__}"
        taken = sum(kind.block_class == type(blocks[0]).__name__ for kind in kinds)
        kinds.append(
            BlockKind(
                blocks,
                config,
                f"{name}-{taken + 1}" if taken else name,
                cache_dir,
                tokens,
                attention,
                compile_missing,
            )
        )
    return kinds
