"""The SDXL text encoders replayed from CUDA graphs (CUDA only).

The pipelines call each encoder with one shape, ``(1, 77)`` token ids and
``output_hidden_states=True`` (the prompt, then the negative prompt). Eager, that call is bound
by launching a few hundred small kernels from Python; replayed from a graph captured at start-up
it runs the same kernels without the launches. Other calls run the eager encoder.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.utils._pytree as pytree

from src.fast_path import Route, UnavailableError, check_graph_replay, relative_error, route
from src.sdxl import TEXT_TOKENS
from src.timing import Phases

log = logging.getLogger(__name__)


class GraphedTextEncoder:
    """One text encoder's pipeline call, ``(1, 77)`` ids with hidden states, from a CUDA graph."""

    setting = "CUDA_GRAPHS"

    def __init__(self, encoder: torch.nn.Module, name: str) -> None:
        self.encoder = encoder
        self.name = name
        self.eager = type(encoder).forward.__get__(encoder)  # what serves every other call
        self.ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device=encoder.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Any = None

    def prepare(self, phases: Phases) -> list[Route]:
        """Capture the call, check a replay against the eager call, and route matching calls.

        Raises UnavailableError when capturing fails or the replay disagrees.
        """
        with phases.phase("graphs"):
            self.graph = self._capture()
        log.info("%s: replayed from a CUDA graph", self.name)
        return [route(self.encoder, "forward", self)]

    def _capture(self) -> torch.cuda.CUDAGraph:
        ids = torch.randint(0, self.encoder.config.vocab_size, self.ids.shape, device=self.ids.device)
        try:
            with torch.inference_mode():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # first-call work (cuBLAS handles) outside the capture
                    self.eager(self.ids, output_hidden_states=True)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.output = self.eager(self.ids, output_hidden_states=True)
                expected = self.eager(ids, output_hidden_states=True)
                self.ids.copy_(ids)
                graph.replay()
                error = relative_error(self.output, expected)
        except Exception as err:  # a speed path: the eager encoder serves without it
            raise UnavailableError(f"not captured in a CUDA graph ({type(err).__name__}: {err})") from None
        check_graph_replay(self.name, error)
        return graph

    def serves(self, input_ids: Any = None, *args: Any, **kwargs: Any) -> bool:
        """True for the pipelines' call: ``(1, 77)`` ids on the encoder's device, hidden states on."""
        return (
            self.graph is not None
            and not args
            and kwargs == {"output_hidden_states": True}
            and isinstance(input_ids, torch.Tensor)
            and input_ids.shape == self.ids.shape
            and input_ids.dtype == self.ids.dtype
            and input_ids.device == self.ids.device
        )

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """The encoder's forward, replayed from the graph."""
        self.ids.copy_(input_ids)
        self.graph.replay()
        # The graph writes into the same tensors at every replay: the negative prompt's would
        # overwrite the prompt's embeddings, which the pipeline still holds.
        return pytree.tree_map(torch.Tensor.clone, self.output)
