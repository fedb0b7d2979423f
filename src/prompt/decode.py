"""Greedy decoding over a static KV cache, and its decode step replayed from a CUDA graph.

``GreedyDecoder`` runs the prompt through the model once (the prefill), then one model call per new
token: ``(1, 1)`` ids at one cache position, over a ``StaticCache`` allocated once. That call has
one shape for every token of every job, so ``GraphedDecodeStep`` (CUDA only) captures it at start-up
and replays it: the same kernels, without launching each from Python, which is what bounds
``generate`` on a 7B model (measured: docs/PERFORMANCE.md). Nothing is compiled.

The model attends through ``grouped_decode_attention`` (registered with transformers'
``AttentionInterface``): transformers' SDPA attention, except that a decode step's query heads are
grouped onto their key/value head. Qwen2.5-7B has 28 query heads over 4 key/value heads, and with
the static cache's mask transformers' SDPA path repeats each layer's whole cache 7 times per step
(1.3 GB written and read again per token at 3328 positions) where grouping reads it once. Its
RMSNorms run as ``F.rms_norm`` (``src/prompt/fused_norms.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from src.fast_path import Route, UnavailableError, check_graph_replay, relative_error, route
from src.prompt.fused_norms import fuse_rms_norms
from src.timing import Phases

log = logging.getLogger(__name__)


GROUPED_DECODE = "sdpa_grouped_decode"  # the attention implementation's name in transformers' registries


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward``, except for one query token over grouped key/value
    heads: there the ``h`` query heads, ``(b, h, 1, d)``, are viewed as ``h / kv`` query rows of
    each key/value head, ``(b, kv, h / kv, d)`` (query head ``i`` uses key/value head
    ``i // (h / kv)``, as transformers' ``repeat_kv`` orders them), and the mask broadcasts over
    the rows. Returns ``(b, 1, h, d)`` as the SDPA path does."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, dim = query.shape
    if length != 1 or groups == 1 or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    grouped = query.view(batch, key.shape[1], groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, scale=scaling
    )
    return out.view(batch, 1, heads, dim), None


AttentionInterface.register(GROUPED_DECODE, grouped_decode_attention)
AttentionMaskInterface.register(GROUPED_DECODE, sdpa_mask)  # the masks SDPA gets


@dataclass(frozen=True)
class Decoded:
    """New token ids, and whether decoding stopped at the limit rather than at an end-of-turn token."""

    ids: list[int]
    cut_off: bool


class GreedyDecoder:
    """Greedy decoding of at most ``max_new_tokens`` after prompts of at most ``max_input_tokens``."""

    def __init__(self, model: torch.nn.Module, max_input_tokens: int, max_new_tokens: int) -> None:
        model.set_attn_implementation(GROUPED_DECODE)
        self.norm_routes = fuse_rms_norms(model)
        self.model = model
        self.max_input_tokens = max_input_tokens
        self.max_new_tokens = max_new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=max_input_tokens + max_new_tokens)
        end = model.generation_config.eos_token_id
        self.end_ids = set(end if isinstance(end, list) else [end])

    @contextmanager
    def as_shipped(self) -> Iterator[None]:
        """Within: the model attends (SDPA) and normalises as transformers ships it (baselines)."""
        self.model.set_attn_implementation("sdpa")
        for installed in self.norm_routes:
            installed.undo()
        try:
            yield
        finally:
            self.model.set_attn_implementation(GROUPED_DECODE)
            self.norm_routes = fuse_rms_norms(self.model)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, stop_at_end: bool = True, limit: int | None = None) -> Decoded:
        """Decode after ``ids`` (``(1, n)``, n <= max_input_tokens), at most ``limit`` (default
        ``max_new_tokens``) tokens. ``stop_at_end`` off: always the limit (benchmarks, whose random
        weights would rarely stop anyway)."""
        length = ids.shape[1]
        limit = self.max_new_tokens if limit is None else min(limit, self.max_new_tokens)
        device = ids.device
        self.cache.reset()
        logits = self.model(
            ids,
            past_key_values=self.cache,
            cache_position=torch.arange(length, device=device),
            logits_to_keep=1,
        ).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        positions = torch.arange(length, length + limit, device=device)
        new: list[int] = []
        for step in range(limit):
            value = int(token)
            if stop_at_end and value in self.end_ids:
                return Decoded(new, cut_off=False)
            new.append(value)
            if step + 1 == limit:
                break
            logits = self.model(
                token, past_key_values=self.cache, cache_position=positions[step : step + 1]
            ).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
        return Decoded(new, cut_off=True)


class GraphedDecodeStep:
    """The decoder's step call (``(1, 1)`` ids, its cache, one position) replayed from a CUDA graph."""

    name = "prompt-decode"
    setting = "CUDA_GRAPHS"

    def __init__(self, decoder: GreedyDecoder) -> None:
        self.decoder = decoder
        self.model = decoder.model
        self.eager = type(self.model).forward.__get__(self.model)  # what serves every other call
        device = self.model.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def prepare(self, phases: Phases) -> list[Route]:
        """Capture the step after a prefill, check a replay against the eager step, route steps.

        Raises UnavailableError when capturing fails or the replay disagrees.
        """
        with phases.phase("graphs"):
            self._capture()
        log.info("%s: decode steps replayed from a CUDA graph", self.name)
        return [route(self.model, "forward", self)]

    def _call(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.eager(token, past_key_values=self.decoder.cache, cache_position=position).logits

    def _prefill(self, prompt: torch.Tensor) -> None:
        """An empty cache holding ``prompt``: the state a step's graph and its check start from."""
        self.decoder.cache.reset()  # in place: the graph keeps the cache's tensors
        positions = torch.arange(prompt.shape[1], device=prompt.device)
        self.model(prompt, past_key_values=self.decoder.cache, cache_position=positions)
        self.position.fill_(prompt.shape[1])

    def _capture(self) -> None:
        # The cache counts what it holds (a step appends at that count), so the check runs the
        # eager step and the replay from the same state: the same prompt, then token 7.
        prompt = torch.randint(0, self.model.config.vocab_size, (1, 16), device=self.token.device)
        try:
            with torch.inference_mode():
                self._prefill(prompt)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # first-call work (cuBLAS handles) outside the capture
                    for _ in range(2):
                        self._call(self.token, self.position)
                torch.cuda.current_stream().wait_stream(side)
                self._prefill(prompt)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # recorded, not run: the cache is left as it was
                    self.logits = self._call(self.token, self.position)
                self._prefill(prompt)
                self.token.fill_(7)
                expected = self._call(self.token, self.position).clone()
                self._prefill(prompt)
                graph.replay()
                error = relative_error(self.logits, expected)
                self.decoder.cache.reset()
        except Exception as err:  # a speed path: the eager step serves without it
            raise UnavailableError(f"not captured in a CUDA graph ({type(err).__name__}: {err})") from None
        check_graph_replay(self.name, error)
        self.graph = graph

    def serves(self, input_ids: Any = None, *args: Any, **kwargs: Any) -> bool:
        """True for the decoder's step: ``(1, 1)`` ids on the model's device over its cache."""
        position = kwargs.get("cache_position")
        return (
            self.graph is not None
            and not args
            and set(kwargs) == {"past_key_values", "cache_position"}
            and kwargs["past_key_values"] is self.decoder.cache
            and isinstance(input_ids, torch.Tensor)
            and input_ids.shape == self.token.shape
            and input_ids.device == self.token.device
            and isinstance(position, torch.Tensor)
            and position.shape == self.position.shape
        )

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """The model's forward for one step, replayed from the graph (its logits only)."""
        self.token.copy_(input_ids)
        self.position.copy_(kwargs["cache_position"])
        self.graph.replay()
        return CausalLMOutputWithPast(logits=self.logits.clone(), past_key_values=self.decoder.cache)
