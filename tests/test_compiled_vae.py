"""The AOT-compiled SDXL VAE decode on CPU (tiny model, real AOTInductor): the same images as
the eager decode at the compiled size, the eager decode for everything else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from src.sdxl.compiled_vae import CompiledVaeDecode
from src.sdxl.family import COMPILED_SIZE
from src.timing import Phases
from tests.aot import LATENT, CallSpy, pipe_images


@pytest.fixture(scope="module")
def vae_package_dir(tmp_path_factory: pytest.TempPathFactory, sdxl_pipe: Any, fast_aot_build: None) -> Path:
    """Compile once for the module; the VAE is left as it was."""
    directory = tmp_path_factory.mktemp("vae-cache")
    phases = Phases()
    for installed in CompiledVaeDecode(sdxl_pipe.vae, LATENT, directory).prepare(phases):
        installed.undo()  # back to the eager decode; each test installs what it needs
    assert "vae_aot_compile" in phases.seconds and "vae_aot_check" in phases.seconds
    return directory


@pytest.fixture
def compiled_vae(sdxl_pipe: Any, vae_package_dir: Path) -> Iterator[tuple[CompiledVaeDecode, CallSpy]]:
    """The package loaded as the next worker loads it, its runner spied on."""
    compiled = CompiledVaeDecode(sdxl_pipe.vae, LATENT, vae_package_dir)
    phases = Phases()
    routes = compiled.prepare(phases)
    assert "vae_aot_compile" not in phases.seconds  # loaded: no compile
    compiled.package.runner = spy = CallSpy(compiled.package.runner)
    yield compiled, spy
    for installed in routes:
        installed.undo()
    assert "decode" not in vars(sdxl_pipe.vae)
    sdxl_pipe.vae.disable_tiling()


def test_compiled_size_decodes_through_the_package_like_eager(sdxl_pipe: Any, vae_package_dir: Path) -> None:
    expected = pipe_images(sdxl_pipe, COMPILED_SIZE)
    compiled = CompiledVaeDecode(sdxl_pipe.vae, LATENT, vae_package_dir)
    routes = compiled.prepare(Phases())
    try:
        compiled.package.runner = spy = CallSpy(compiled.package.runner)
        got = pipe_images(sdxl_pipe, COMPILED_SIZE)
    finally:
        for installed in routes:
            installed.undo()
    assert spy.batches == [2]  # both images in one decode
    assert np.abs(got - expected).max() <= 2  # float rounding of the compiled kernels, nothing more


def test_other_sizes_and_tiling_decode_eagerly(sdxl_pipe: Any, compiled_vae: Any) -> None:
    _, spy = compiled_vae
    pipe_images(sdxl_pipe, (COMPILED_SIZE[0] // 2, COMPILED_SIZE[1]))
    sdxl_pipe.vae.enable_tiling()
    pipe_images(sdxl_pipe, COMPILED_SIZE)
    assert spy.batches == []


def test_decode_keeps_the_vae_api(sdxl_pipe: Any, compiled_vae: Any) -> None:
    """``decode`` answers as AutoencoderKL.decode does: DecoderOutput or a tuple."""
    _, spy = compiled_vae
    latents = torch.randn(1, sdxl_pipe.vae.config.latent_channels, *LATENT)
    with torch.inference_mode():
        as_output = sdxl_pipe.vae.decode(latents).sample
        (as_tuple,) = sdxl_pipe.vae.decode(latents, return_dict=False)
    assert spy.batches == [1, 1]
    assert as_output.shape == (1, 3, *COMPILED_SIZE[::-1]) and torch.equal(as_output, as_tuple)


def test_package_holds_only_the_vaes_own_tensors(compiled_vae: Any) -> None:
    compiled, spy = compiled_vae
    names = set(spy.runner.get_constant_fqns())
    assert names and names <= set(compiled.package.module.state_dict())
