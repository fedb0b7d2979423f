r"""SDXL prompt embeddings through Compel: weighting, prompts past CLIP's 77 tokens (embedded in
77-token chunks, not cut), and clip skip.

Weighting reads A1111's syntax, which platforms' users write, and Compel's own: ``(word:1.3)``,
``(word)`` (1.1), ``[word]`` (1/1.1), nested brackets multiplying, ``word+`` / ``word-`` (1.1 /
0.9 each), ``(a b)++``. A1111's forms are rewritten into Compel's (``(word)1.3``) before Compel
parses the prompt; ``\(`` and ``\)`` stay literal.

Compel (``CompelForSDXL``: both text encoders, the pooled embedding of the second) calls each
encoder through ``_Encoder``, which answers with the pipeline's own call, ``(1, 77)`` ids with
hidden states, so the CUDA-graphed text encoders serve every chunk; a chunk with masked (down-
weighted) tokens has its own graph. Clip skip drops the last hidden states before Compel takes
the penultimate one: ``hidden_states[-(clip_skip + 2)]``, as diffusers' ``clip_skip`` does. With
weighting off, Compel's syntax characters are escaped: the prompt is read literally, still in
chunks. Compel's parser runs with pyparsing's packrat memoisation, once per distinct prompt, and
not for flat prompts: plain words and weighted items of plain words (``parse``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import pyparsing
import torch
from compel import CompelForSDXL
from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment, PromptParser

from src.sdxl.graphed_encoders import MASKED_ROWS
from src.sdxl.weighting import batched

# Compel's prompt grammar backtracks; pyparsing's packrat memoisation (unbounded: the cache is
# emptied at each parse) halves the parse time of each prompt (docs/PERFORMANCE.md).
pyparsing.ParserElement.enable_packrat(None)
_PARSER = PromptParser()

_SYNTAX = re.compile(r"([()\[\]:+\-\\])")  # what Compel's parser reads as weighting
_ESCAPED = re.compile(r"\\[()\[\]]")
_WEIGHTED = re.compile(r"\(([^()\[\]]*?):\s*([0-9]*\.?[0-9]+)\s*\)")  # (text:1.3)
_EMPHASIS = re.compile(r"\(([^()\[\]:]*)\)(?![0-9.+\-])")  # (text): A1111's 1.1, not Compel's (a b)++
_DEEMPHASIS = re.compile(r"\[([^()\[\]]*)\]")  # [text]: A1111's 1/1.1
_ATOM = re.compile(r"\x00(\d+)\x00")
# Flat prompts: ASCII words and digits, single spaces, a comma only before a space or at the end,
# and weighted items of such words, Compel's ``(a b)1.3`` (what A1111's forms are rewritten into),
# ``(a b)++`` and ``word-``: the language ``parse`` reads without Compel's grammar
_WORD = r"[A-Za-z0-9]+"
_WEIGHTED_ITEM = rf"\(({_WORD}(?: {_WORD})*)\)([0-9]+(?:\.[0-9]+)?|\++|-+)|({_WORD})(\++|-+)"
_ITEM = rf"(?:{_WEIGHTED_ITEM}|{_WORD})"
_FLAT = re.compile(rf"{_ITEM}(?:,? {_ITEM})*,?")
_WEIGHTED_ITEMS = re.compile(rf"(?:(?<= )|^)(?:{_WEIGHTED_ITEM})(?=,? |,?$)")
_LORA = re.compile(r"(?:use|with)Lora \(")  # Compel's LoRA syntax, which a flat prompt can spell


def compel_syntax(prompt: str) -> str:
    """``prompt`` with A1111's weighting forms rewritten into Compel's, innermost first."""
    atoms: list[str] = []

    def keep(text: str) -> str:
        atoms.append(text)
        return f"\x00{len(atoms) - 1}\x00"

    prompt = _ESCAPED.sub(lambda m: keep(m.group(0)), prompt)
    while True:
        rewritten = _WEIGHTED.sub(lambda m: keep(f"({m.group(1)}){m.group(2)}"), prompt)
        rewritten = _EMPHASIS.sub(lambda m: keep(f"({m.group(1)})1.1"), rewritten)
        rewritten = _DEEMPHASIS.sub(lambda m: keep(f"({m.group(1)})0.9091"), rewritten)
        if rewritten == prompt:
            break
        prompt = rewritten
    while _ATOM.search(prompt):
        prompt = _ATOM.sub(lambda m: atoms[int(m.group(1))], prompt)
    return prompt


@functools.lru_cache(maxsize=256)
def parse(text: str) -> Conjunction:
    """Compel's parse of ``text`` (Compel only reads it), once per distinct text. Compel itself
    builds its grammar again for every parse and parses each prompt once per text encoder; here a
    job parses each of its prompts once, and a prompt seen lately (a platform's fixed negative
    prompt) not at all. Flat prompts (``_FLAT``) are read without Compel's grammar (``flat``),
    into what its parse gives (tests/test_prompt_controls.py checks it against Compel's parser),
    without its 6-18 ms a prompt pair (docs/PERFORMANCE.md)."""
    if _FLAT.fullmatch(text) and not _LORA.search(text):
        return Conjunction([FlattenedPrompt([Fragment(t, w) for t, w in flat(text)])])
    return _PARSER.parse_conjunction(text)


def flat(text: str) -> list[tuple[str, float]]:
    """A flat prompt's fragments as Compel's parse gives them: the words between weighted items
    (stripped of spaces) at weight 1, each item at its weight (a number, or 1.1 per ``+`` and 0.9
    per ``-``), neighbours of equal weight joined by a space."""
    fragments: list[tuple[str, float]] = []
    start = 0
    for item in _WEIGHTED_ITEMS.finditer(text):
        words, weight = (item.group(1), item.group(2)) if item.group(1) else item.group(3, 4)
        between = text[start : item.start()].strip(" ")
        if between:
            fragments.append((between, 1.0))
        if weight[0] in "+-":
            fragments.append((words, pow(1.1 if weight[0] == "+" else 0.9, len(weight))))
        else:
            fragments.append((words, float(weight)))
        start = item.end()
    if text[start:].strip(" "):
        fragments.append((text[start:].strip(" "), 1.0))
    merged: list[tuple[str, float]] = []
    for words, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (f"{merged[-1][0]} {words}", weight)
        else:
            merged.append((words, weight))
    return merged


@dataclass(frozen=True)
class PromptEmbeddings:
    """The pipeline's ``prompt_embeds`` keyword arguments for one job."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    negative: torch.Tensor | None
    negative_pooled: torch.Tensor | None

    def as_kwargs(self) -> dict[str, Any]:
        """No ``negative_*`` without a negative prompt: SDXL then uses zeros, as diffusers does."""
        kwargs = {"prompt_embeds": self.embeds, "pooled_prompt_embeds": self.pooled}
        if self.negative is not None:
            kwargs.update(
                negative_prompt_embeds=self.negative, negative_pooled_prompt_embeds=self.negative_pooled
            )
        return kwargs


class _Encoder:
    """A text encoder as Compel calls it, answered by the pipeline's own call or, with an attention
    mask, by calls of ``MASKED_ROWS`` rows (see the module)."""

    def __init__(self, encoder: torch.nn.Module, clip_skip: int) -> None:
        self.encoder = encoder
        self.clip_skip = clip_skip

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        ids = ids.long()  # Compel makes some ids int32; the pipelines' call (and its graph) takes int64
        if attention_mask is None or (len(ids) == 1 and bool(attention_mask.all())):
            output = self.encoder(ids, output_hidden_states=True)
        else:
            output = self._masked(ids, attention_mask)
        if self.clip_skip:
            output.hidden_states = output.hidden_states[: -self.clip_skip]
        return output

    def _masked(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        """The encoder's output for masked rows, encoded ``MASKED_ROWS`` at a time (the last group
        filled up with copies of its last row, whose outputs are dropped)."""
        outputs = []
        for start in range(0, len(ids), MASKED_ROWS):
            group, group_mask = ids[start : start + MASKED_ROWS], mask[start : start + MASKED_ROWS]
            if len(group) < MASKED_ROWS:
                fill = MASKED_ROWS - len(group)
                group = torch.cat([group, group[-1:].expand(fill, -1)])
                group_mask = torch.cat([group_mask, group_mask[-1:].expand(fill, -1)])
            outputs.append(self.encoder(group, attention_mask=group_mask, output_hidden_states=True))
        first, rows = outputs[0], len(ids)

        def join(parts: list[torch.Tensor]) -> torch.Tensor:
            return parts[0][:rows] if len(parts) == 1 else torch.cat(parts)[:rows]

        return type(first)(
            **{
                key: tuple(map(join, zip(*(o[key] for o in outputs), strict=True)))
                if isinstance(value, tuple)
                else join([o[key] for o in outputs])
                for key, value in first.items()
            }
        )


@dataclass
class _Pipe:
    """What ``CompelForSDXL`` reads of a pipeline."""

    tokenizer: Any
    text_encoder: _Encoder
    tokenizer_2: Any
    text_encoder_2: _Encoder


class PromptEncoder:
    """Both prompts' embeddings through Compel over one pipeline's text encoders (the img2img
    pipeline shares them).

    Compel embeds the empty prompt once per instance and weights every chunk with weights from it:
    one instance per clip skip is kept while the encoders' weights stay (``weights_key``: the
    LoRAs merged into them), so only the first weighted job after a change pays for it.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.weights_key: object = ()
        self._compels: dict[int, CompelForSDXL] = {}

    def _compel(self, clip_skip: int, weights_key: object) -> CompelForSDXL:
        if weights_key != self.weights_key:
            self._compels, self.weights_key = {}, weights_key
        if clip_skip not in self._compels:
            pipe = self.pipe
            shim = _Pipe(
                pipe.tokenizer,
                _Encoder(pipe.text_encoder, clip_skip),
                pipe.tokenizer_2,
                _Encoder(pipe.text_encoder_2, clip_skip),
            )
            compel = CompelForSDXL(shim, device=pipe.text_encoder.device)
            for each in (compel.compel_1, compel.compel_2):
                each.parse_prompt_string = parse  # over Compel's classmethod, for this instance
                provider = each.conditioning_provider
                provider.get_embeddings_for_weighted_prompt_fragments = batched(provider)
            self._compels[clip_skip] = compel
        return self._compels[clip_skip]

    def embed(
        self,
        prompt: str,
        negative_prompt: str | None,
        *,
        weighting: bool,
        clip_skip: int,
        weights_key: object = (),
    ) -> PromptEmbeddings:
        """Both prompts' embeddings, chunked past 77 tokens, weighted unless ``weighting`` is off."""
        rewrite = compel_syntax if weighting else (lambda text: _SYNTAX.sub(r"\\\1", text))
        prompt = rewrite(prompt)
        negative_prompt = None if negative_prompt is None else rewrite(negative_prompt)
        with torch.inference_mode():
            result = self._compel(clip_skip, weights_key)(prompt, negative_prompt=negative_prompt)
        return PromptEmbeddings(
            result.embeds, result.pooled_embeds, result.negative_embeds, result.negative_pooled_embeds
        )
