"""Greedy decoding over a static KV cache, and its decode step replayed from a CUDA graph.

``GreedyDecoder`` runs the prompt through the model once (the prefill), then one model call per new
token: ``(1, 1)`` ids at one cache position, over a ``StaticCache`` allocated once. That call has
one shape for every token of every job, so ``GraphedDecodeStep`` (CUDA only) captures it at start-up
and replays it: the same kernels, without launching each from Python, which is what bounds
``generate`` on a 7B model (measured: docs/PERFORMANCE.md). Nothing is compiled.

The model attends through ``grouped_decode_attention`` (registered with transformers'
``AttentionInterface``): transformers' SDPA attention, except that a decode step's query heads are
grouped onto their key/value head, and that it attends over the cache's first ``attend_length``
positions only. Qwen2.5-7B has 28 query heads over 4 key/value heads, and with the static cache's
mask transformers' SDPA path repeats each layer's whole cache 7 times per step (1.3 GB written and
read again per token at 3328 positions) where grouping reads it once. A decode step's attention
takes time in proportion to the positions it reads, masked or not (a fifth of the step at 3328
positions), so each call attends over the positions the job can fill, rounded up to a
multiple of ``ATTEND_STEP``, and the step has one graph per such length (at most 16). Its
RMSNorms run as ``F.rms_norm`` and its MLPs' gate and up projections as one product
(``src/prompt/fused_modules.py``).
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
from src.prompt.fused_modules import fuse_modules
from src.timing import Phases

log = logging.getLogger(__name__)


GROUPED_DECODE = "sdpa_grouped_decode"  # the attention implementation's name in transformers' registries
ATTEND_STEP = 256  # calls attend over the cache's first positions, a multiple of this many
MAX_ATTEND_LENGTHS = 16  # or of a multiple of it, so that there are at most this many (graphs)


def attend_lengths(cache_length: int) -> list[int]:
    """The lengths calls attend over: multiples of ATTEND_STEP (or of the multiple of it that
    keeps them to MAX_ATTEND_LENGTHS) below ``cache_length``, and it."""
    step = ATTEND_STEP * -(-cache_length // (ATTEND_STEP * MAX_ATTEND_LENGTHS))
    return [*range(step, cache_length, step), cache_length]


def attend_length(positions: int, cache_length: int) -> int:
    """The shortest of ``attend_lengths(cache_length)`` that holds ``positions`` positions."""
    return min(length for length in attend_lengths(cache_length) if length >= positions)


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    attend_length: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward`` over the first ``attend_length`` cache positions
    (all when None; the caller's promise: no later position is unmasked), except for one query
    token over grouped key/value heads: there the ``h`` query heads, ``(b, h, 1, d)``, are viewed
    as ``h / kv`` query rows of each key/value head, ``(b, kv, h / kv, d)`` (query head ``i`` uses
    key/value head ``i // (h / kv)``, as transformers' ``repeat_kv`` orders them), and the mask
    broadcasts over the rows. Returns ``(b, 1, h, d)`` as the SDPA path does."""
    if attend_length is not None:
        key, value = key[:, :, :attend_length], value[:, :, :attend_length]
        if attention_mask is not None:
            attention_mask = attention_mask[..., :attend_length]
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
        self.routes = fuse_modules(model)
        self.model = model
        self.max_input_tokens = max_input_tokens
        self.max_new_tokens = max_new_tokens
        self.cache_length = max_input_tokens + max_new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=self.cache_length)
        end = model.generation_config.eos_token_id
        self.end_ids = set(end if isinstance(end, list) else [end])

    @contextmanager
    def as_shipped(self) -> Iterator[None]:
        """Within: the model attends (SDPA) and normalises as transformers ships it (baselines)."""
        self.model.set_attn_implementation("sdpa")
        for installed in self.routes:
            installed.undo()
        try:
            yield
        finally:
            self.model.set_attn_implementation(GROUPED_DECODE)
            self.routes = [route(r.module, r.method, r.runner) for r in self.routes]

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, stop_at_end: bool = True, limit: int | None = None) -> Decoded:
        """Decode after ``ids`` (``(1, n)``, n <= max_input_tokens), at most ``limit`` (default
        ``max_new_tokens``) tokens. ``stop_at_end`` off: always the limit (benchmarks, whose random
        weights would rarely stop anyway)."""
        length = ids.shape[1]
        limit = self.max_new_tokens if limit is None else min(limit, self.max_new_tokens)
        device = ids.device
        attend = attend_length(length + limit, self.cache_length)  # every position this call fills
        self.cache.reset()
        logits = self.model(
            ids,
            past_key_values=self.cache,
            cache_position=torch.arange(length, device=device),
            logits_to_keep=1,
            attend_length=attend,
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
                token,
                past_key_values=self.cache,
                cache_position=positions[step : step + 1],
                attend_length=attend,
            ).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
        return Decoded(new, cut_off=True)


class GraphedDecodeStep:
    """The decoder's step call (``(1, 1)`` ids, its cache, one position, an attend length)
    replayed from a CUDA graph, one per length of ``attend_lengths`` (``graphs``/``logits``)."""

    name = "prompt-decode"
    setting = "CUDA_GRAPHS"

    def __init__(self, decoder: GreedyDecoder) -> None:
        self.decoder = decoder
        self.model = decoder.model
        self.eager = type(self.model).forward.__get__(self.model)  # what serves every other call
        device = self.model.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def prepare(self, phases: Phases) -> list[Route]:
        """Capture the step for each attend length after a prefill, check each replay against the
        eager step, route steps.

        Raises UnavailableError when capturing fails or a replay disagrees.
        """
        with phases.phase("graphs"):
            self._capture()
        log.info("%s: decode steps replayed from %d CUDA graphs", self.name, len(self.graphs))
        return [route(self.model, "forward", self)]

    def _call(self, token: torch.Tensor, position: torch.Tensor, attend: int) -> torch.Tensor:
        cache = self.decoder.cache
        return self.eager(token, past_key_values=cache, cache_position=position, attend_length=attend).logits

    def _prefill(self, prompt: torch.Tensor) -> None:
        """An empty cache holding ``prompt``: the state a step's graph and its check start from."""
        self.decoder.cache.reset()  # in place: the graph keeps the cache's tensors
        positions = torch.arange(prompt.shape[1], device=prompt.device)
        self.model(prompt, past_key_values=self.decoder.cache, cache_position=positions)
        self.position.fill_(prompt.shape[1])

    def _capture(self) -> None:
        prompt = torch.randint(0, self.model.config.vocab_size, (1, 16), device=self.token.device)
        lengths = attend_lengths(self.decoder.cache_length)
        graphs: dict[int, torch.cuda.CUDAGraph] = {}
        try:
            with torch.inference_mode():
                self._prefill(prompt)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # first-call work (cuBLAS handles, SDPA plans) outside
                    for attend in lengths:
                        self._call(self.token, self.position, attend)
                torch.cuda.current_stream().wait_stream(side)
                pool = None  # one memory pool: the graphs never run at the same time
                for attend in lengths:  # recorded, not run: the cache is left as it was
                    graphs[attend] = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graphs[attend], pool=pool):
                        self.logits[attend] = self._call(self.token, self.position, attend)
                    pool = graphs[attend].pool()
                error = self.replay_error(prompt, graphs)
        except Exception as err:  # a speed path: the eager step serves without it
            raise UnavailableError(f"not captured in a CUDA graph ({type(err).__name__}: {err})") from None
        check_graph_replay(self.name, error)
        self.graphs = graphs

    @torch.inference_mode()
    def replay_error(self, prompt: torch.Tensor, graphs: dict[int, Any]) -> float:
        """The largest relative error of each graph's replay against the eager step, both on token 7
        after ``prompt`` fills an empty cache. Each starts from its own prefill: transformers'
        ``StaticCache`` writes at its own count and the model takes positions and mask from it,
        not from ``cache_position``, so a second call at "the same" position is the next token."""
        self.token.fill_(7)
        error = 0.0
        for attend, graph in graphs.items():
            self._prefill(prompt)
            expected = self._call(self.token, self.position, attend).clone()
            self._prefill(prompt)
            graph.replay()
            error = max(error, relative_error(self.logits[attend], expected))
        self.decoder.cache.reset()
        return error

    def serves(self, input_ids: Any = None, *args: Any, **kwargs: Any) -> bool:
        """True for the decoder's step: ``(1, 1)`` ids on the model's device over its cache, at an
        attend length with a graph."""
        position = kwargs.get("cache_position")
        return (
            not args
            and set(kwargs) == {"past_key_values", "cache_position", "attend_length"}
            and kwargs["attend_length"] in self.graphs
            and kwargs["past_key_values"] is self.decoder.cache
            and isinstance(input_ids, torch.Tensor)
            and input_ids.shape == self.token.shape
            and input_ids.device == self.token.device
            and isinstance(position, torch.Tensor)
            and position.shape == self.position.shape
        )

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """The model's forward for one step, replayed from its attend length's graph (logits only)."""
        attend = kwargs["attend_length"]
        self.token.copy_(input_ids)
        self.position.copy_(kwargs["cache_position"])
        self.graphs[attend].replay()
        return CausalLMOutputWithPast(logits=self.logits[attend].clone(), past_key_values=self.decoder.cache)
