"""The prompt LLM's decoder on a tiny random Qwen2: the attend lengths, attention over the cache's
first positions against attention over all of them, and the decode step's graphs, one per attend
length (on CPU a stand-in replays the eager step into the graph's logits; the GPU run checks each
real replay against the eager step at start-up)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import src.prompt.decode as decode
from src.fast_path import GRAPH_MAX_RELATIVE_ERROR, route
from src.prompt.decode import (
    GraphedDecodeStep,
    GreedyDecoder,
    attend_length,
    attend_lengths,
    grouped_decode_attention,
)

VOCAB = 97


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def prompt(length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))


def test_attend_lengths_are_multiples_of_the_step_and_the_cache() -> None:
    assert attend_lengths(3328) == [*range(256, 3328, 256), 3328]
    assert attend_lengths(4096) == [*range(256, 4096, 256), 4096]  # 16 lengths, the most
    assert attend_lengths(4097) == [*range(512, 4097, 512), 4097]
    assert attend_lengths(32768 + 256) == [*range(2304, 33024, 2304), 33024]
    assert all(len(attend_lengths(n)) <= 16 for n in range(64, 40000, 97))
    assert attend_lengths(256) == [256] and attend_lengths(100) == [100]
    assert attend_length(1, 3328) == 256
    assert attend_length(256, 3328) == 256 and attend_length(257, 3328) == 512
    assert attend_length(1803 + 256, 3328) == 2304  # the benchmark's chat and its 256 tokens
    assert attend_length(3100, 3328) == 3328


@pytest.mark.parametrize("queries", [1, 5])
def test_attending_over_the_first_positions_is_attending_over_all(queries: int) -> None:
    """With every position past ``attend_length`` masked, attending over the first
    ``attend_length`` positions gives what attending over the whole cache gives (a decode step's
    grouped path and the prefill's SDPA path)."""
    generator = torch.Generator().manual_seed(7)
    kv_heads, groups, cache, dim = 2, 3, 40, 8
    query = torch.randn(1, kv_heads * groups, queries, dim, generator=generator)
    key, value = (torch.randn(1, kv_heads, cache, dim, generator=generator) for _ in range(2))
    mask = torch.zeros(1, 1, queries, cache, dtype=torch.bool)
    mask[..., :13] = True
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    whole, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.3)
    first, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.3, attend_length=16)
    torch.testing.assert_close(first, whole)
    key[:, :, 16:] = torch.nan  # positions past the attend length are not read at all
    first, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.3, attend_length=16)
    torch.testing.assert_close(first, whole)


def test_the_decoder_attends_over_the_positions_its_call_fills(
    model: Qwen2ForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every call of a decode attends over the shortest attend length holding the prompt and the
    new tokens, and writes the tokens it writes attending over the whole cache."""
    decoder = GreedyDecoder(model, max_input_tokens=640, max_new_tokens=60)
    seen: Counter[int] = Counter()
    real = decode.grouped_decode_attention

    def spy(module: Any, query: Any, key: Any, value: Any, mask: Any, **kwargs: Any) -> Any:
        seen[kwargs.get("attend_length")] += 1
        return real(module, query, key, value, mask, **kwargs)

    monkeypatch.setitem(decode.AttentionInterface._global_mapping, decode.GROUPED_DECODE, spy)
    for length, limit, attend in [(9, 20, 256), (300, 20, 512), (600, 60, 700)]:
        seen.clear()
        ids = decoder(prompt(length), stop_at_end=False, limit=limit).ids
        assert dict(seen) == {attend: 3 * limit}  # 3 layers: the prefill and limit - 1 steps
        with monkeypatch.context() as whole:  # attend lengths ignored: the whole cache of 700
            whole.setattr(decode, "attend_length", lambda positions, cache_length: None)
            assert decoder(prompt(length), stop_at_end=False, limit=limit).ids == ids


class StandInGraph:
    """Stands in for a captured graph: replay runs the eager step at its attend length into the
    graph's logits."""

    def __init__(self, step: GraphedDecodeStep, attend: int) -> None:
        self.step, self.attend = step, attend
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.step.logits[self.attend].copy_(self.step._call(self.step.token, self.step.position, self.attend))


def test_each_step_replays_the_graph_of_its_attend_length(model: Qwen2ForCausalLM) -> None:
    decoder = GreedyDecoder(model, max_input_tokens=640, max_new_tokens=60)
    expected = {length: decoder(prompt(length), stop_at_end=False, limit=12).ids for length in (9, 300)}
    step = GraphedDecodeStep(decoder)
    for attend in attend_lengths(decoder.cache_length):
        step.graphs[attend] = StandInGraph(step, attend)  # type: ignore[assignment]
        step.logits[attend] = torch.zeros(1, 1, VOCAB)
    assert step.graphs.keys() == {256, 512, 700}
    installed = route(model, "forward", step)
    try:
        for length, attend in [(9, 256), (300, 512)]:
            assert decoder(prompt(length), stop_at_end=False, limit=12).ids == expected[length]
            assert step.graphs[attend].replays == 11  # every step but the prefill
        assert step.graphs[700].replays == 0 and installed.served == 22
        assert not step.serves(prompt(1), past_key_values=decoder.cache, cache_position=torch.zeros(1))
        other = {"past_key_values": decoder.cache, "cache_position": torch.zeros(1), "attend_length": 300}
        assert not step.serves(prompt(1), **other)  # no graph attends over 300 positions
    finally:
        installed.undo()


class SecondTokenGraph(StandInGraph):
    """A wrong replay: the step of the token after the one it was given."""

    def replay(self) -> None:
        self.step._call(self.step.token, self.step.position, self.attend)
        super().replay()


def test_the_replay_check_starts_the_eager_step_and_the_replay_from_one_state(
    model: Qwen2ForCausalLM,
) -> None:
    """A replay that is the eager step checks without error at every attend length (the cache
    counts its own positions: a check that ran the replay after the eager step on one prefill saw
    the next token's step, 0.05-0.3 off, and served every step eagerly); a wrong replay is caught."""
    decoder = GreedyDecoder(model, max_input_tokens=640, max_new_tokens=60)
    step = GraphedDecodeStep(decoder)
    for attend in attend_lengths(decoder.cache_length):
        step.logits[attend] = torch.zeros(1, 1, VOCAB)
    faithful = {attend: StandInGraph(step, attend) for attend in step.logits}
    assert step.replay_error(prompt(16), faithful) == 0.0
    assert all(graph.replays == 1 for graph in faithful.values())
    wrong = {attend: SecondTokenGraph(step, attend) for attend in step.logits}
    assert step.replay_error(prompt(16), wrong) > GRAPH_MAX_RELATIVE_ERROR
