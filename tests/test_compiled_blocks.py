"""The AOT-compiled Wan blocks on CPU (tiny models, real AOTInductor): three packages serve every
block of both transformers, at every video size, with the eager blocks' results."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from src.fast_path import FastPaths, UnavailableError
from src.loras.apply import MergedLoras
from src.loras.files import LoraFile
from src.timing import Phases
from src.wan import family as wan
from src.wan.compiled_blocks import BlockKind, block_kinds
from tests import loras as kit
from tests.conftest import tiny_settings

STEPS = 2


class TokenSpy:
    """Wraps a block package's runner and records the tokens of every call it serves."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.tokens: list[int] = []

    def __call__(self, inputs: list[torch.Tensor], weights: list[torch.Tensor]) -> Any:
        self.tokens.append(inputs[0].shape[1])
        return self.runner(inputs, weights)


def _settings(tmp_path: Path, compile: str) -> Any:
    return tiny_settings("http://unused", ["wan"], compile=compile, compile_cache_dir=tmp_path)


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory, fast_aot_build: None) -> Iterator[tuple[Any, Any]]:
    """The tiny Wan family compiled (packages built once, at a small tuned size) and an eager twin."""
    patch = pytest.MonkeyPatch()
    patch.setattr(wan, "TUNED_FOR", (64, 64, 9))
    directory = tmp_path_factory.mktemp("wan-blocks")
    compiled = wan.WanFamily.load(_settings(directory, "on"))
    phases = Phases()
    compiled.warm_up(phases)
    assert "blocks_aot_compile" in phases.seconds and "blocks_aot_check" in phases.seconds
    yield compiled, wan.WanFamily.load(_settings(directory, "off"))
    patch.undo()


def _kinds(family: Any) -> list[BlockKind]:
    return family.fast_paths.candidates


@pytest.fixture
def spies(families: tuple[Any, Any]) -> Iterator[list[TokenSpy]]:
    """Every kind's runner spied on, restored afterwards."""
    kinds = _kinds(families[0])
    originals = [kind.package.runner for kind in kinds]
    spied = []
    for kind in kinds:
        kind.package.runner = TokenSpy(kind.package.runner)
        spied.append(kind.package.runner)
    yield spied
    for kind, runner in zip(kinds, originals, strict=True):
        kind.package.runner = runner


def _video(pipe: Any, width: int, height: int, frames: int, **kwargs: Any) -> np.ndarray:
    with torch.inference_mode():
        return pipe(
            "a red boat",
            width=width,
            height=height,
            num_frames=frames,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
            **kwargs,
        ).frames[0]


def test_blocks_are_grouped_into_three_kinds(families: tuple[Any, Any]) -> None:
    compiled = families[0]
    kinds = {(kind.block_class, len(kind.blocks)) for kind in _kinds(compiled)}
    main = sum(len(pipe.transformer.blocks) for pipe in (compiled.text2video, compiled.vace, compiled.turbo))
    controls = len(compiled.vace.transformer.vace_blocks)
    # T2V's blocks, VACE's main blocks and the turbo model's blocks share one package; VACE's first
    # control block (it has an input projection) has its own.
    assert kinds == {
        ("WanTransformerBlock", main),
        ("WanVACETransformerBlock", 1),
        ("WanVACETransformerBlock", controls - 1),
    }
    assert all(kind.package.runner.get_constant_fqns() == [] for kind in _kinds(compiled))
    assert set(compiled.fast_paths.status.values()) == {"serving"} and len(compiled.fast_paths.status) == 3


@pytest.mark.parametrize(("width", "height", "frames"), [(64, 64, 9), (96, 48, 5)])
def test_every_size_runs_through_the_package_like_eager(
    families: tuple[Any, Any], spies: list[TokenSpy], width: int, height: int, frames: int
) -> None:
    compiled, eager = families
    got = _video(compiled.text2video, width, height, frames)
    blocks = len(compiled.text2video.transformer.blocks)
    tokens = wan.video_tokens(compiled.text2video, width, height, frames)
    assert spies[0].tokens == [tokens] * (STEPS * 2 * blocks)  # every block, both CFG passes, each step
    np.testing.assert_allclose(got, _video(eager.text2video, width, height, frames), atol=1e-4)


def test_reference_video_runs_every_block_through_the_packages(
    families: tuple[Any, Any], spies: list[TokenSpy]
) -> None:
    compiled, eager = families
    gray = Image.new("RGB", (64, 64), (90, 140, 200))
    got = _video(compiled.vace, 64, 64, 9, reference_images=[gray])
    tokens = wan.video_tokens(compiled.text2video, 64, 64, 9 + 4)  # the reference adds a latent frame
    transformer = compiled.vace.transformer
    # Kinds: main blocks, the first control block, the other control blocks; each called per CFG
    # pass per step.
    blocks = [len(transformer.blocks), 1, len(transformer.vace_blocks) - 1]
    assert [len(spy.tokens) for spy in spies] == [STEPS * 2 * count for count in blocks]
    assert {token for spy in spies for token in spy.tokens} == {tokens}
    np.testing.assert_allclose(got, _video(eager.vace, 64, 64, 9, reference_images=[gray]), atol=1e-4)


def test_a_lora_runs_through_the_packages_like_eager(
    families: tuple[Any, Any], spies: list[TokenSpy], tmp_path: Path
) -> None:
    """The LoRA is merged into each block's own weights, which the package takes as inputs."""
    compiled, eager = families
    path = tmp_path / "lora.safetensors"
    factors = kit.factors(compiled.text2video.transformer, kit.WAN_TARGETS, 4, 9, "transformer.")
    path.write_bytes(kit.to_bytes(kit.peft_layout(factors)))
    lora = [LoraFile(path, "0" * 64, 1.0, "config.loras[0]", {"name": "lora"})]
    plain = _video(compiled.text2video, 64, 64, 9)
    videos = []
    for family in (compiled, eager):
        merged = MergedLoras(family.text2video, ["transformer"], "Wan")
        merged.use(lora)
        videos.append(_video(family.text2video, 64, 64, 9))
        merged.use([])
    assert len(spies[0].tokens) == 2 * STEPS * 2 * len(compiled.text2video.transformer.blocks)
    np.testing.assert_allclose(videos[0], videos[1], atol=1e-4)
    assert np.abs(videos[0] - plain).max() > 0.05  # the LoRA changed the video
    np.testing.assert_array_equal(_video(compiled.text2video, 64, 64, 9), plain)  # and left nothing


def test_the_turbo_model_runs_through_the_t2v_package_like_eager(
    families: tuple[Any, Any], spies: list[TokenSpy]
) -> None:
    """FastWan has the T2V blocks' shapes: the T2V kind's package serves it, nothing new compiles."""
    videos = []
    for family in families:
        generator = torch.Generator().manual_seed(3)
        family.turbo.scheduler.generator = generator
        with torch.inference_mode():
            frames = family.turbo("a red boat", width=64, height=64, num_frames=9, guidance_scale=1.0,
                                  generator=generator, output_type="np").frames[0]  # fmt: skip
        videos.append(frames)
    tokens = wan.video_tokens(families[0].turbo, 64, 64, 9)
    assert spies[0].tokens == [tokens] * (3 * len(families[0].turbo.transformer.blocks))  # 3 steps, no CFG
    np.testing.assert_allclose(videos[0], videos[1], atol=1e-4)


def test_calls_unlike_the_recorded_ones_run_the_eager_block(
    families: tuple[Any, Any], spies: list[TokenSpy]
) -> None:
    compiled, eager = families
    block, twin = compiled.text2video.transformer.blocks[1], eager.text2video.transformer.blocks[1]
    kind = _kinds(compiled)[0]
    inputs = kind.example(40)[0]
    hidden, text, time, cos, sin = (t.repeat(2, *[1] * (t.ndim - 1)) for t in inputs)  # batch 2
    with torch.inference_mode():
        torch.testing.assert_close(
            block(hidden, text, time, (cos, sin)), twin(hidden, text, time, (cos, sin))
        )
        block(*inputs[:3], (inputs[3], inputs[4]))  # as recorded, 40 tokens: the package
    assert spies[0].tokens == [40]


def test_a_kind_never_called_in_the_warm_up_stays_eager(families: tuple[Any, Any], tmp_path: Path) -> None:
    transformer = families[1].text2video.transformer
    paths = FastPaths(block_kinds([transformer], tmp_path, (32, 64), None))
    paths.prepare(Phases())
    assert paths.status == {"wan-WanTransformerBlock": "eager: not called during the warm-up"}
    assert paths.routes == []  # nothing recorded: nothing compiled, nothing routed
    assert all("forward" not in vars(block) for block in transformer.blocks)
    assert not list(tmp_path.iterdir())
    with pytest.raises(UnavailableError):
        paths.candidates[0].prepare(Phases())


def test_blocks_of_the_same_shapes_but_other_heads_get_their_own_package(families: tuple[Any, Any]) -> None:
    transformer = families[1].text2video.transformer
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    other = type(transformer)(**{**config, "num_attention_heads": 4, "attention_head_dim": 6})  # same widths
    kinds = block_kinds([transformer, other], Path("unused"), (32, 64), None)
    assert [len(kind.blocks) for kind in kinds] == [len(transformer.blocks), len(other.blocks)]
    assert [kind.config["num_attention_heads"] for kind in kinds] == [2, 4]
    assert [kind.name for kind in kinds] == ["wan-WanTransformerBlock", "wan-WanTransformerBlock-2"]
    FastPaths(kinds).prepare(Phases())  # never called: each stays eager, its recording hook removed
    assert all(not block._forward_pre_hooks for block in (transformer.blocks[0], other.blocks[0]))
