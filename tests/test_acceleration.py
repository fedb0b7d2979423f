"""GPU speed paths, checked on CPU: settings, no compile on a job, the compile cache, exact frames."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ModelMixin

from src import acceleration
from src.settings import Settings


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(models_dir=tmp_path, local_storage_dir=tmp_path / "out", **values)


def test_gpu_paths_are_off_on_cpu_by_default(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert not acceleration.compile_enabled(settings, "cpu")
    assert acceleration.compile_enabled(settings, "cuda")
    assert acceleration.attention_backend(settings, "cpu") is None
    assert acceleration.attention_backend(settings, "cuda") == "_native_cudnn"
    assert settings.compile_sdxl
    assert settings.compile_cache_path == tmp_path / "compile-cache"
    assert _settings(tmp_path, compile="on").compile == "on"
    assert acceleration.attention_backend(_settings(tmp_path, attention_backend="native"), "cuda") is None


@pytest.mark.parametrize(
    "preset", [None, ("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync"), ("PYTORCH_ALLOC_CONF", "")]
)
def test_cuda_allocator_uses_expandable_segments_unless_configured(
    monkeypatch: pytest.MonkeyPatch, preset: tuple[str, str] | None
) -> None:
    for name in acceleration.ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if preset:
        monkeypatch.setenv(*preset)
    acceleration.configure_cuda_allocator()
    if preset:  # the operator's choice stands, and nothing else is added
        assert {name: os.environ.get(name) for name in acceleration.ALLOCATOR_VARIABLES} == {
            name: preset[1] if name == preset[0] else None for name in acceleration.ALLOCATOR_VARIABLES
        }
    else:
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


class _Counter:
    """A torch.compile backend that counts compilations and compiled calls."""

    def __init__(self) -> None:
        self.compiles = 0
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.compiles += 1

        def run(*args: Any) -> Any:
            self.calls += 1
            return gm.forward(*args)

        return run


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).relu()


class _Blocks(ModelMixin):
    """A model with repeated blocks, as the Wan transformers declare them."""

    _repeated_blocks = ("_Block",)

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> _Counter:
    backend = _Counter()
    monkeypatch.setattr(acceleration, "BACKEND", backend)
    torch._dynamo.reset()
    yield backend
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


def test_unwarmed_shape_runs_eagerly_without_compiling(counter: _Counter) -> None:
    model = _Blocks()
    acceleration.compile_repeated_blocks(model)
    with torch.inference_mode():
        model(torch.randn(2, 4, 8))  # warm-up: the blocks compile
        compiles = counter.compiles
        assert compiles >= 1
        acceleration.serve_without_compiling()
        calls = counter.calls
        model(torch.randn(2, 4, 8))  # the warmed shape: compiled code, both blocks
        assert counter.calls == calls + 2
        x = torch.randn(3, 5, 8)
        out = model(x)  # a shape never warmed: eager, no compile
        torch.testing.assert_close(out, model.blocks[1].linear(model.blocks[0].linear(x).relu()).relu())
    assert counter.compiles == compiles
    assert counter.calls == calls + 2


def test_compile_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[bytes] = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    cache = acceleration.CompileCache(tmp_path / "cache", {"torch": "x", "families": ["sdxl"]})
    assert not cache.load() and not cache.loaded
    assert cache.save()
    assert cache.path.read_bytes() == b"artifacts"
    assert not list(cache.directory.glob(".*"))  # written atomically, no temporary left
    again = acceleration.CompileCache(tmp_path / "cache", {"torch": "x", "families": ["sdxl"]})
    assert again.path == cache.path and again.load() and loaded == [b"artifacts"]
    other = acceleration.CompileCache(tmp_path / "cache", {"torch": "y", "families": ["sdxl"]})
    assert other.path != cache.path and not other.load()


def test_bad_compile_cache_never_stops_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(data: bytes) -> None:
        raise RuntimeError("corrupt")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", refuse)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    cache = acceleration.CompileCache(tmp_path, {"a": 1})
    cache.path.write_bytes(b"junk")
    assert not cache.load()
    assert not cache.save()  # nothing compiled: nothing written, no error


def test_frames_converted_on_device_match_the_numpy_path() -> None:
    frames = torch.rand(5, 3, 16, 24) * 1.2 - 0.1  # (T, C, H, W) in [0, 1] plus out-of-range values
    frames[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 254.5 / 255])  # ties
    expected = (np.clip(frames.permute(0, 2, 3, 1).numpy(), 0.0, 1.0) * 255).round().astype(np.uint8)
    video = frames.float().clamp(0.0, 1.0).mul(255).round().to(torch.uint8)
    np.testing.assert_array_equal(video.permute(0, 2, 3, 1).contiguous().numpy(), expected)
