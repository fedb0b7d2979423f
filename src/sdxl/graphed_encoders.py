"""The SDXL text encoders replayed from CUDA graphs (CUDA only).

The pipelines call each encoder with one shape, ``(1, 77)`` token ids and
``output_hidden_states=True`` (the prompt, then the negative prompt). A prompt with down-weighted
tokens comes as ``(2, 77)`` ids with an ``attention_mask``: the prompt and a copy with those tokens
masked, encoded together (``src/sdxl/weighting.py``). Eager, each call is bound by launching a few
hundred small kernels from Python; replayed from a graph captured at start-up (one without the
mask, one with it) it runs the same kernels without the launches. Other calls run the eager encoder.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from src.fast_path import Route, UnavailableError, check_graph_replay, relative_error, route
from src.sdxl import TEXT_TOKENS
from src.timing import Phases

log = logging.getLogger(__name__)

MASKED_ROWS = 2  # rows of the masked call: a prompt and one masked copy of it, which cost one row's time


class GraphedTextEncoder:
    """One text encoder's call with hidden states, ``(1, 77)`` ids without an attention mask or
    ``(MASKED_ROWS, 77)`` ids with one, from CUDA graphs (``ids``/``graphs``/``outputs`` keyed by
    ``masked``)."""

    setting = "CUDA_GRAPHS"

    def __init__(self, encoder: torch.nn.Module, name: str) -> None:
        self.encoder = encoder
        self.name = name
        self.eager = type(encoder).forward.__get__(encoder)  # what serves every other call
        self.ids = {
            masked: torch.zeros(rows, TEXT_TOKENS, dtype=torch.long, device=encoder.device)
            for masked, rows in ((False, 1), (True, MASKED_ROWS))
        }
        self.mask = torch.ones(MASKED_ROWS, TEXT_TOKENS, dtype=torch.long, device=encoder.device)
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[bool, Any] = {}

    def prepare(self, phases: Phases) -> list[Route]:
        """Capture both calls, check each replay against the eager call, and route matching calls.

        Raises UnavailableError when capturing fails or a replay disagrees.
        """
        with phases.phase("graphs"):
            self.graphs[False] = self._capture(masked=False)
            try:
                self.graphs[True] = self._capture(masked=True)
            except UnavailableError as err:  # the unmasked calls still replay
                log.warning("%s: chunks with masked tokens run eagerly: %s", self.name, err)
        log.info(
            "%s: replayed from CUDA graphs (%s)",
            self.name,
            "with and without a mask" if True in self.graphs else "without a mask",
        )
        return [route(self.encoder, "forward", self)]

    def _inputs(self, masked: bool, mask: torch.Tensor | None = None) -> dict[str, Any]:
        """The call's keyword arguments: the mask buffer (or ``mask``) when ``masked``."""
        return {"attention_mask": self.mask if mask is None else mask} if masked else {}

    def _capture(self, masked: bool) -> torch.cuda.CUDAGraph:
        buffer = self.ids[masked]
        ids = torch.randint(0, self.encoder.config.vocab_size, buffer.shape, device=buffer.device)
        mask = torch.ones_like(self.mask)
        mask[1:, 3:9] = 0  # a prompt, and its copy with a down-weighted fragment masked
        try:
            with torch.inference_mode():
                self.mask.fill_(1)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # first-call work (cuBLAS handles) outside the capture
                    self.eager(buffer, **self._inputs(masked), output_hidden_states=True)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.outputs[masked] = self.eager(
                        buffer, **self._inputs(masked), output_hidden_states=True
                    )
                expected = self.eager(ids, **self._inputs(masked, mask), output_hidden_states=True)
                buffer.copy_(ids)
                self.mask.copy_(mask)
                graph.replay()
                error = relative_error(self.outputs[masked], expected)
        except Exception as err:  # a speed path: the eager encoder serves without it
            raise UnavailableError(f"not captured in a CUDA graph ({type(err).__name__}: {err})") from None
        check_graph_replay(self.name, error)
        return graph

    def serves(self, input_ids: Any = None, *args: Any, **kwargs: Any) -> bool:
        """True for the pipelines' call (``(1, 77)`` ids on the encoder's device, hidden states on)
        and for a prompt with its masked copy (``(2, 77)`` ids and attention mask)."""
        mask = kwargs.pop("attention_mask", None)
        masked = mask is not None
        buffer = self.ids[masked]
        return (
            masked in self.graphs
            and not args
            and kwargs == {"output_hidden_states": True}
            and isinstance(input_ids, torch.Tensor)
            and input_ids.shape == buffer.shape
            and input_ids.dtype == buffer.dtype
            and input_ids.device == buffer.device
            and (
                not masked
                or (
                    isinstance(mask, torch.Tensor)
                    and mask.shape == self.mask.shape
                    and mask.device == self.mask.device
                )
            )
        )

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """The encoder's forward, replayed from the graph of its kind."""
        masked = attention_mask is not None
        self.ids[masked].copy_(input_ids)
        if masked:
            self.mask.copy_(attention_mask)
        self.graphs[masked].replay()
        # The graph writes into the same tensors at every replay: the negative prompt's would
        # overwrite the prompt's embeddings, which the pipeline still holds.
        return _copy(self.outputs[masked])


def _copy(output: Any) -> Any:
    """A copy of an encoder's output (a ``ModelOutput`` of tensors and a tuple of hidden states),
    built directly: ``pytree.tree_map`` took about 0.7 ms a call on the H100 host, more than the
    copies themselves."""
    return type(output)(
        **{
            key: tuple(t.clone() for t in value) if isinstance(value, tuple) else value.clone()
            for key, value in output.items()
        }
    )
