"""The SDXL text encoders' CUDA-graph path, on CPU (tiny pipeline): which calls it serves, and
that a replay's outputs stay the caller's when the next replay overwrites the graph's tensors.

Capturing needs CUDA; the GPU run checks each replay against the eager call at start-up.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree

from src.fast_path import route
from src.sdxl import TEXT_TOKENS
from src.sdxl.graphed_encoders import MASKED_ROWS, GraphedTextEncoder
from src.worker import Worker


class _StaticGraph:
    """Stands in for a captured graph: replay recomputes the eager call (masked or not) into the
    same tensors."""

    def __init__(self, graphed: GraphedTextEncoder, masked: bool) -> None:
        self.graphed = graphed
        self.masked = masked

    def replay(self) -> None:
        mask = {"attention_mask": self.graphed.mask} if self.masked else {}
        fresh = self.graphed.eager(self.graphed.ids[self.masked], **mask, output_hidden_states=True)
        for static, value in zip(
            pytree.tree_leaves(self.graphed.outputs[self.masked]), pytree.tree_leaves(fresh), strict=True
        ):
            static.copy_(value)


def _leaves(output: Any) -> list[torch.Tensor]:
    return pytree.tree_leaves(output)


@pytest.fixture(params=["text_encoder", "text_encoder_2"])
def graphed(request: pytest.FixtureRequest, sdxl_pipe: Any) -> Any:
    encoder = getattr(sdxl_pipe, request.param)
    graphed = GraphedTextEncoder(encoder, request.param)
    with torch.inference_mode():
        for masked in (False, True):
            mask = {"attention_mask": graphed.mask} if masked else {}
            graphed.outputs[masked] = graphed.eager(graphed.ids[masked], **mask, output_hidden_states=True)
            graphed.graphs[masked] = _StaticGraph(graphed, masked)  # type: ignore[assignment]
    installed = route(encoder, "forward", graphed)  # as prepare() routes it after a real capture
    yield graphed
    installed.undo()
    assert "forward" not in vars(encoder)


def _ids(seed: int, vocab: int, rows: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, TEXT_TOKENS), generator=torch.Generator().manual_seed(seed))


def test_pipeline_calls_replay_and_keep_their_outputs(graphed: GraphedTextEncoder) -> None:
    vocab = graphed.encoder.config.vocab_size
    prompt, negative = _ids(1, vocab), _ids(2, vocab)
    with torch.inference_mode():
        got_prompt = graphed.encoder(prompt, output_hidden_states=True)
        got_negative = graphed.encoder(negative, output_hidden_states=True)
        want_prompt = graphed.eager(prompt, output_hidden_states=True)
        want_negative = graphed.eager(negative, output_hidden_states=True)
    # the prompt's embeddings survive the negative prompt's replay, which rewrote the graph's tensors
    assert type(got_prompt) is type(want_prompt) and len(got_prompt.hidden_states) == len(
        want_prompt.hidden_states
    )
    assert all(torch.equal(a, b) for a, b in zip(_leaves(got_prompt), _leaves(want_prompt), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_leaves(got_negative), _leaves(want_negative), strict=True))
    assert not torch.equal(got_prompt[0], got_negative[0])
    assert all(
        a.data_ptr() != b.data_ptr()
        for a, b in zip(_leaves(got_prompt), _leaves(graphed.outputs[False]), strict=True)
    )


def test_masked_chunks_replay_their_own_graph(graphed: GraphedTextEncoder) -> None:
    """A prompt and its copy with a down-weighted fragment masked out (``src/sdxl/weighting.py``):
    the masked graph of two rows, its mask copied in."""
    vocab = graphed.encoder.config.vocab_size
    ids = _ids(3, vocab)
    rows = torch.cat([ids, ids])
    mask = torch.ones(MASKED_ROWS, TEXT_TOKENS, dtype=torch.long)
    mask[1:, 4:7] = 0
    assert graphed.serves(rows, attention_mask=mask, output_hidden_states=True)
    assert not graphed.serves(ids, attention_mask=mask[1:], output_hidden_states=True)  # one row: eager
    with torch.inference_mode():
        got_plain = graphed.encoder(ids, output_hidden_states=True)
        got = graphed.encoder(rows, attention_mask=mask, output_hidden_states=True)
        want = graphed.eager(rows, attention_mask=mask, output_hidden_states=True)
    assert all(torch.equal(a, b) for a, b in zip(_leaves(got), _leaves(want), strict=True))
    assert not torch.allclose(got.hidden_states[-1][1], got_plain.hidden_states[-1][0])  # the mask reached it
    assert torch.equal(graphed.mask, mask)
    del graphed.graphs[True]  # not captured (its capture failed): masked calls run eagerly
    assert not graphed.serves(rows, attention_mask=mask, output_hidden_states=True)
    assert graphed.serves(ids, output_hidden_states=True)


@pytest.mark.parametrize(
    "ids_shape, kwargs",
    [
        ((2, TEXT_TOKENS), {"output_hidden_states": True}),  # a batch of prompts without a mask
        ((1, 20), {"output_hidden_states": True}),  # other length
        ((1, TEXT_TOKENS), {}),  # no hidden states
        ((1, TEXT_TOKENS), {"output_hidden_states": True, "return_dict": False}),
    ],
)
def test_other_calls_run_eagerly(
    graphed: GraphedTextEncoder, ids_shape: tuple[int, int], kwargs: dict
) -> None:
    ids = torch.randint(0, graphed.encoder.config.vocab_size, ids_shape)
    assert not graphed.serves(ids, **kwargs)
    before = [t.clone() for t in _leaves(graphed.outputs)]
    with torch.inference_mode():
        got = graphed.encoder(ids, **kwargs)
        want = graphed.eager(ids, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(_leaves(got), _leaves(want), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_leaves(graphed.outputs), before, strict=True))  # no replay


def test_serves_only_the_encoders_device_and_dtype(graphed: GraphedTextEncoder) -> None:
    ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long)
    assert graphed.serves(ids, output_hidden_states=True)
    assert not graphed.serves(ids.int(), output_hidden_states=True)
    assert not graphed.serves(ids, None, output_hidden_states=True)
    assert not graphed.serves(None, output_hidden_states=True)
    assert not graphed.serves(
        ids, attention_mask=torch.ones(1, 20, dtype=torch.long), output_hidden_states=True
    )


def test_cpu_worker_graphs_nothing(sdxl_worker: Worker) -> None:
    (family,) = sdxl_worker.families
    assert family.fast_paths.candidates == [] and sdxl_worker.startup["fast_paths"] == {}
    assert "forward" not in vars(family.text2img.text_encoder)
