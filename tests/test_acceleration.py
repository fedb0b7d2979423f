"""GPU speed paths, checked on CPU: settings, the allocator, the attention kernel, exact frames."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from src import acceleration
from src.media.images import to_uint8
from src.models import device_map_kwargs
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


@pytest.mark.parametrize(
    ("backend", "kernel"),
    [("_native_cudnn", "cudnn_sdp_enabled"), ("_native_flash", "flash_sdp_enabled"), (None, None)],
)
def test_compiled_attention_uses_the_configured_kernel(backend: str | None, kernel: str | None) -> None:
    kernels = ("cudnn_sdp_enabled", "flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled")
    before = {name: getattr(torch.backends.cuda, name)() for name in kernels}
    with acceleration.sdpa_backends(backend):
        inside = {name: getattr(torch.backends.cuda, name)() for name in kernels}
    assert inside == (before if kernel is None else {name: name == kernel for name in kernels})
    assert {name: getattr(torch.backends.cuda, name)() for name in kernels} == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_frames_converted_on_device_match_the_numpy_path(dtype: torch.dtype) -> None:
    frames = torch.rand(5, 3, 16, 24) * 1.2 - 0.1  # (T, C, H, W) in [0, 1] plus out-of-range values
    frames[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 254.5 / 255])  # ties
    frames = frames.to(dtype)
    # diffusers' numpy_to_pil arithmetic, in float32 numpy: clip, x255, round half to even
    expected = (np.clip(frames.float().permute(0, 2, 3, 1).numpy(), 0.0, 1.0) * 255).round().astype(np.uint8)
    got = to_uint8(frames)
    assert got.dtype == np.uint8 and got.shape == (5, 16, 24, 3)
    np.testing.assert_array_equal(got, expected)


def test_weights_load_straight_onto_the_gpu_only() -> None:
    assert device_map_kwargs("cuda") == {"device_map": "cuda"}  # no copy in CPU memory first
    assert device_map_kwargs("cpu") == {} and device_map_kwargs("cuda:1") == {}  # .to() places those


def test_conv3d_channels_last_decodes_the_same_video(s3_endpoint: str) -> None:
    from diffusers import AutoencoderKLWan

    from src.models import model_dirs
    from src.wan.tiny import build_tiny_wan
    from tests.conftest import tiny_settings

    t2v_dir, _ = model_dirs(tiny_settings(s3_endpoint, ["wan"]), ["wan-t2v", "wan-vace"], build_tiny_wan)
    vae = AutoencoderKLWan.from_pretrained(t2v_dir, subfolder="vae")
    channels = vae.config.z_dim
    latents = torch.randn(1, channels, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    before = {name: p.clone() for name, p in vae.named_parameters()}
    with torch.inference_mode():
        expected = vae.decode(latents).sample
        acceleration.conv3d_channels_last(vae)
        got = vae.decode(latents).sample
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs)
    assert all(not c.weight.is_contiguous() for c in convs if c.weight.shape[2:].numel() > 1)
    assert all(torch.equal(p, before[name]) for name, p in vae.named_parameters())  # values kept
    assert got.shape == expected.shape == (1, 3, 9, 64, 64)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
