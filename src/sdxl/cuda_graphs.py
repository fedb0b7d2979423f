"""CUDA graphs around the compiled UNet: one step's ~1,000 kernel launches replayed as one.

A graph is captured at start-up for each batch size of a one-image job (1 row without CFG,
2 with it) and replayed whenever a call has exactly those input shapes; other calls go to the
package directly. Inputs are copied into the graph's own buffers and the output is copied out,
so callers see ordinary tensors. The graphs share one memory pool (they never run at once):
the GPU memory of one UNet step at batch 2 stays reserved for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

log = logging.getLogger(__name__)

Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


def signature(inputs: Iterable[torch.Tensor]) -> Signature:
    """What a captured graph is specific to: each input's shape and dtype."""
    return tuple((tuple(t.shape), t.dtype) for t in inputs)


class _Graph:
    """One captured call: its input buffers, its output buffer, the graph."""

    def __init__(
        self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], pool: object
    ) -> None:
        self.inputs = tuple(t.clone() for t in inputs)
        # A first run outside capture, on a side stream as PyTorch asks (lazy initialisation).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # "relaxed": the package's runtime queries its own completion event while it runs.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="relaxed"):
            self.output = fn(*self.inputs)

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for buffer, value in zip(self.inputs, inputs, strict=True):
            buffer.copy_(value)
        self.graph.replay()
        return self.output.clone()


class GraphedCall:
    """``fn`` (GPU tensors in, one tensor out) replayed from CUDA graphs captured for given inputs."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[Signature, _Graph] = {}

    def capture(
        self, inputs: tuple[torch.Tensor, ...], fn: Callable[..., torch.Tensor] | None = None
    ) -> None:
        """Capture a graph for calls with the shapes and dtypes of ``inputs``.

        ``fn``: what the graph captures, when it must be another instance of the function
        (one never called outside its graph); by default the function itself.
        """
        with torch.inference_mode():
            self.graphs[signature(inputs)] = _Graph(fn or self.fn, inputs, self.pool)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        graph = self.graphs.get(signature(inputs))
        if graph is None:
            return self.fn(*inputs)
        with torch.inference_mode():
            return graph.replay(inputs)
