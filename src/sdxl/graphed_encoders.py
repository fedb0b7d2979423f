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

from src.aot_package import relative_error

log = logging.getLogger(__name__)

TEXT_TOKENS = 77  # CLIP's context length: SDXL tokenizes every prompt to 77 ids
MAX_RELATIVE_ERROR = 1e-3  # replay vs eager on the same ids: the same kernels, so ~0


class GraphedTextEncoder:
    """One text encoder's pipeline call, ``(1, 77)`` ids with hidden states, from a CUDA graph."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.encoder = encoder
        self.eager = encoder.forward  # what serves every other call
        self.ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device=encoder.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Any = None

    def prepare(self) -> bool:
        """Capture the call, check a replay against the eager call, and route matching calls.

        False (logged) when capturing fails or the replay disagrees: the eager encoder serves.
        """
        name = type(self.encoder).__name__
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
            log.warning("%s not captured in a CUDA graph (%s: %s): eager", name, type(err).__name__, err)
            return False
        if error > MAX_RELATIVE_ERROR:  # infinite when not finite
            log.warning(
                "%s: CUDA graph replay disagrees with eager (relative error %.3g): eager", name, error
            )
            return False
        log.info("%s: replayed from a CUDA graph (relative error vs eager %.3g)", name, error)
        self.graph = graph
        self.encoder.forward = self.forward
        return True

    def covers(self, input_ids: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """True for the pipelines' call: ``(1, 77)`` ids on the encoder's device, hidden states on."""
        return (
            not args
            and kwargs == {"output_hidden_states": True}
            and isinstance(input_ids, torch.Tensor)
            and input_ids.shape == self.ids.shape
            and input_ids.dtype == self.ids.dtype
            and input_ids.device == self.ids.device
        )

    def forward(self, input_ids: Any = None, *args: Any, **kwargs: Any) -> Any:
        """The encoder's forward: the graph for the pipelines' call, eager for any other."""
        if self.graph is None or not self.covers(input_ids, args, kwargs):
            return self.eager(input_ids, *args, **kwargs)
        self.ids.copy_(input_ids)
        self.graph.replay()
        # The graph writes into the same tensors at every replay: the negative prompt's would
        # overwrite the prompt's embeddings, which the pipeline still holds.
        return pytree.tree_map(torch.Tensor.clone, self.output)
