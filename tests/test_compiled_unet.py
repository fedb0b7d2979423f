"""The AOT-compiled SDXL UNet on CPU (tiny model, real AOTInductor): same images as eager,
eager for what it was not compiled for, reused by the next worker, rebuilt when unusable."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from src.faults import is_gpu_fault
from src.sdxl import compiled_unet
from src.sdxl.compiled_unet import CompiledUnet
from src.sdxl.family import COMPILED_SIZE
from src.worker import start_worker
from tests.conftest import list_keys, tiny_settings

LATENT = (COMPILED_SIZE[1] // 8, COMPILED_SIZE[0] // 8)  # what SdxlFamily compiles for


class _Spy:
    """Wraps the AOTInductor runner and records the batch of every call it serves."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.batches: list[int] = []

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.batches.append(inputs[0].shape[0])
        return self.runner(*inputs)


@pytest.fixture(scope="module")
def fast_cpu_build() -> Iterator[None]:
    """A quicker C++ build of the wrapper for the CPU tests (same graph, same kernels)."""
    patch = pytest.MonkeyPatch()
    patch.setitem(compiled_unet.INDUCTOR_CONFIGS, "aot_inductor.compile_wrapper_opt_level", "O0")
    yield
    patch.undo()


@pytest.fixture(scope="module")
def pipe(s3_endpoint: str) -> StableDiffusionXLPipeline:
    from src.models import model_dirs
    from src.sdxl.tiny import build_tiny_sdxl

    (path,) = model_dirs(tiny_settings(s3_endpoint, ["sdxl"]), ["sdxl"], build_tiny_sdxl)
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory: pytest.TempPathFactory, pipe: Any, fast_cpu_build: None) -> Path:
    """Compile once for the module (about 30 s on 2 cores); the UNet is left as it was."""
    directory = tmp_path_factory.mktemp("compile-cache")
    timings = CompiledUnet(pipe.unet, LATENT, directory).prepare()
    assert "aot_compile" in timings and "aot_check" in timings
    del pipe.unet.forward  # back to the eager UNet; each test installs what it needs
    return directory


@pytest.fixture
def eager_unet(pipe: Any) -> Iterator[Any]:
    yield pipe.unet
    pipe.unet.__dict__.pop("forward", None)


def _images(pipe: Any, size: tuple[int, int], **kwargs: Any) -> np.ndarray:
    width, height = size
    with torch.inference_mode():
        images = pipe(
            "a red boat",
            width=width,
            height=height,
            num_inference_steps=3,
            num_images_per_prompt=2,
            generator=[torch.Generator().manual_seed(seed) for seed in (1, 2)],
            **kwargs,
        ).images
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_compiled_size_runs_the_package_and_matches_eager(
    pipe: Any, package_dir: Path, eager_unet: Any
) -> None:
    expected = _images(pipe, COMPILED_SIZE)
    compiled = CompiledUnet(eager_unet, LATENT, package_dir)
    timings = compiled.prepare()
    assert "aot_compile" not in timings  # the next worker loads the package: no compile
    assert compiled.call is compiled.runner and "cuda_graphs" not in timings  # CUDA graphs: on CUDA only
    compiled.call = spy = _Spy(compiled.call)
    got = _images(pipe, COMPILED_SIZE)
    assert spy.batches == [4, 4, 4]  # 3 steps x (2 images + 2 unconditional rows), one call each
    assert np.abs(got - expected).max() <= 2  # float rounding of the compiled kernels, nothing more


def test_package_holds_only_the_unets_own_tensors(pipe: Any, package_dir: Path, eager_unet: Any) -> None:
    """No constant derived from the weights (runtime folding copied every Linear weight: 4.3 GiB)."""
    compiled = CompiledUnet(eager_unet, LATENT, package_dir)
    compiled.prepare()
    names = set(compiled.runner.get_constant_fqns())
    assert names and names <= set(compiled.exported.state_dict())


def test_other_sizes_and_arguments_run_eagerly(pipe: Any, package_dir: Path, eager_unet: Any) -> None:
    compiled = CompiledUnet(eager_unet, LATENT, package_dir)
    compiled.prepare()
    compiled.call = spy = _Spy(compiled.call)
    _images(pipe, (COMPILED_SIZE[0] // 2, COMPILED_SIZE[1]))  # another size
    _images(pipe, COMPILED_SIZE, cross_attention_kwargs={})  # an argument the graph does not take
    assert spy.batches == []


def test_unusable_package_is_compiled_again(
    pipe: Any, package_dir: Path, eager_unet: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = CompiledUnet(eager_unet, LATENT, tmp_path)
    good = package_dir / compiled.path.name
    compiled.path.write_bytes(b"not a package")
    rebuilt: list[Path] = []

    def compile_copy(self: CompiledUnet) -> None:  # the real compiler is tested above; this tests recovery
        rebuilt.append(self.path)
        shutil.copyfile(good, self.path)

    monkeypatch.setattr(CompiledUnet, "_compile", compile_copy)
    timings = compiled.prepare()
    assert rebuilt == [compiled.path] and "aot_compile" in timings
    assert eager_unet.forward == compiled.forward  # installed after the rebuild


def test_package_that_disagrees_leaves_the_eager_unet(
    pipe: Any, package_dir: Path, eager_unet: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiled_unet, "MAX_RELATIVE_ERROR", -1.0)  # nothing can agree
    monkeypatch.setattr(CompiledUnet, "_compile", lambda self: None)  # "recompiling" changes nothing
    compiled = CompiledUnet(eager_unet, LATENT, package_dir)
    compiled.prepare()
    assert "forward" not in eager_unet.__dict__  # the eager UNet still serves


def test_worker_serves_1024_jobs_from_the_package(s3: Any, s3_endpoint: str, package_dir: Path) -> None:
    settings = tiny_settings(s3_endpoint, ["sdxl"], compile="on", compile_cache_dir=package_dir)
    try:
        worker = start_worker(settings)
        (family,) = worker.families
        family.compiled_unet.call = spy = _Spy(family.compiled_unet.call)
        for job_id, config in (("aot-1024", {"num_images": 2}), ("aot-512", {"width": 512, "height": 512})):
            payload = {"type": "sdxl_image_fast", "prompt": "a boat", "user_id": "aot", "config": config}
            result = worker.handle({"id": job_id, "input": {"id": job_id, **payload}})
            assert result["status"] == "completed", result
        assert spy.batches == [4] * 15  # the 1024 job's 15 steps; the 512 job ran eagerly
        assert len(list_keys(s3, "aot/aot-1024/")) == 4
    finally:
        torch.compiler.set_stance("default")


def test_failure_inside_the_compiled_graph_on_gpu_is_a_gpu_fault(
    pipe: Any, package_dir: Path, eager_unet: Any
) -> None:
    compiled = CompiledUnet(eager_unet, LATENT, package_dir)
    compiled.prepare()

    def broken(*inputs: torch.Tensor) -> torch.Tensor:  # what AOTInductor raises for any CUDA error
        raise RuntimeError("run_func_( container_handle_, ...) API call failed at model_container_runner.cpp")

    compiled.call = broken
    compiled.on_gpu = True
    with pytest.raises(RuntimeError) as on_gpu:
        _images(pipe, COMPILED_SIZE)
    assert is_gpu_fault(on_gpu.value) and "compiled SDXL UNet" in str(on_gpu.value)
    compiled.on_gpu = False
    with pytest.raises(RuntimeError, match="API call failed") as on_cpu:
        _images(pipe, COMPILED_SIZE)
    assert not is_gpu_fault(on_cpu.value)
