"""The AOT-compiled SDXL UNet on CPU (tiny model, real AOTInductor): same images as eager,
eager for what it was not compiled for, reused by the next worker, rebuilt when unusable."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from src import aot_package
from src.aot_package import AotPackage
from src.fast_path import Route, UnavailableError
from src.faults import is_gpu_fault
from src.sdxl.compiled_unet import CompiledUnet
from src.sdxl.family import COMPILED_SIZE
from src.settings import StartupError
from src.timing import Phases
from src.worker import Worker, start_worker
from tests import loras as kit
from tests.aot import LATENT, CallSpy, pipe_images
from tests.conftest import list_keys, tiny_settings


def prepare(compiled: CompiledUnet) -> tuple[list[Route], dict[str, float]]:
    """Prepare the fast path; its routes and the phases it timed."""
    phases = Phases()
    routes = compiled.prepare(phases)
    return routes, phases.seconds


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory: pytest.TempPathFactory, sdxl_pipe: Any, fast_aot_build: None) -> Path:
    """Compile once for the module (about 30 s on 2 cores); the UNet is left as it was."""
    directory = tmp_path_factory.mktemp("compile-cache")
    routes, timings = prepare(CompiledUnet(sdxl_pipe.unet, LATENT, directory))
    assert "aot_compile" in timings and "aot_check" in timings
    for installed in routes:
        installed.undo()  # back to the eager UNet; each test installs what it needs
    return directory


@pytest.fixture
def routes(sdxl_pipe: Any) -> Iterator[list[Route]]:
    """The routes a test installs, undone afterwards."""
    installed: list[Route] = []
    yield installed
    for each in installed:
        each.undo()
    assert "forward" not in vars(sdxl_pipe.unet)  # the handle gave the UNet its own forward back


def test_compiled_size_runs_the_package_and_matches_eager(
    sdxl_pipe: Any, package_dir: Path, routes: list[Route]
) -> None:
    expected = pipe_images(sdxl_pipe, COMPILED_SIZE)
    compiled = CompiledUnet(sdxl_pipe.unet, LATENT, package_dir)
    installed, timings = prepare(compiled)
    routes += installed
    assert "aot_compile" not in timings  # the next worker loads the package: no compile
    compiled.package.runner = spy = CallSpy(compiled.package.runner)
    got = pipe_images(sdxl_pipe, COMPILED_SIZE)
    assert spy.batches == [4, 4, 4]  # 3 steps x (2 images + 2 unconditional rows), one call each
    assert np.abs(got - expected).max() <= 2  # float rounding of the compiled kernels, nothing more


def test_undoing_the_route_serves_the_eager_unet_again(
    sdxl_pipe: Any, package_dir: Path, routes: list[Route]
) -> None:
    compiled = CompiledUnet(sdxl_pipe.unet, LATENT, package_dir)
    (installed,), _ = prepare(compiled)
    compiled.package.runner = spy = CallSpy(compiled.package.runner)
    installed.undo()
    pipe_images(sdxl_pipe, COMPILED_SIZE)
    assert spy.batches == []


def test_package_holds_only_the_unets_own_tensors(
    sdxl_pipe: Any, package_dir: Path, routes: list[Route]
) -> None:
    """No constant derived from the weights (runtime folding copied every Linear weight: 4.3 GiB)."""
    compiled = CompiledUnet(sdxl_pipe.unet, LATENT, package_dir)
    routes += prepare(compiled)[0]
    names = set(compiled.package.runner.get_constant_fqns())
    assert names and names <= set(compiled.exported.state_dict())


def test_other_sizes_and_arguments_run_eagerly(
    sdxl_pipe: Any, package_dir: Path, routes: list[Route]
) -> None:
    compiled = CompiledUnet(sdxl_pipe.unet, LATENT, package_dir)
    routes += prepare(compiled)[0]
    compiled.package.runner = spy = CallSpy(compiled.package.runner)
    pipe_images(sdxl_pipe, (COMPILED_SIZE[0] // 2, COMPILED_SIZE[1]))  # another size
    pipe_images(sdxl_pipe, COMPILED_SIZE, cross_attention_kwargs={})  # an argument the graph does not take
    assert spy.batches == []


def test_unusable_package_is_compiled_again(
    sdxl_pipe: Any, package_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, routes: list[Route]
) -> None:
    compiled = CompiledUnet(sdxl_pipe.unet, LATENT, tmp_path)
    good = package_dir / compiled.package.cache.path.name
    compiled.package.cache.path.write_bytes(b"not a package")
    rebuilt: list[Path] = []

    def compile_copy(self: AotPackage) -> None:  # the real compiler is tested above; this tests recovery
        rebuilt.append(self.cache.path)
        shutil.copyfile(good, self.cache.path)

    monkeypatch.setattr(AotPackage, "_compile", compile_copy)
    installed, timings = prepare(compiled)
    routes += installed
    assert rebuilt == [compiled.package.cache.path] and "aot_compile" in timings
    assert [(r.module, r.method) for r in installed] == [(sdxl_pipe.unet, "forward")]  # after the rebuild


def test_package_that_disagrees_leaves_the_eager_unet(
    sdxl_pipe: Any, package_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, routes: list[Route]
) -> None:
    compiled = CompiledUnet(sdxl_pipe.unet, LATENT, tmp_path)
    shutil.copyfile(package_dir / compiled.package.cache.path.name, compiled.package.cache.path)  # no record
    monkeypatch.setattr(aot_package, "MAX_RELATIVE_ERROR", -1.0)  # nothing can agree
    monkeypatch.setattr(AotPackage, "_compile", lambda self: None)  # "recompiling" changes nothing
    with pytest.raises(UnavailableError, match="disagrees with the eager call"):
        compiled.prepare(Phases())
    assert "forward" not in vars(sdxl_pipe.unet)  # the eager UNet still serves
    assert not compiled.package.cache.record_path.exists()  # and the next start checks again


def test_a_package_is_checked_once_per_file(
    sdxl_pipe: Any, package_dir: Path, monkeypatch: pytest.MonkeyPatch, routes: list[Route]
) -> None:
    """The fixture's check left a record of the file's digest: the next start loads it unchecked."""
    compiled = CompiledUnet(sdxl_pipe.unet, LATENT, package_dir)
    cache = compiled.package.cache
    record = json.loads(cache.record_path.read_text())
    assert record["package_sha256"] == hashlib.sha256(cache.path.read_bytes()).hexdigest()
    assert set(record["errors"]) == {"batch 1", "batch 2"}
    assert all(0 <= error <= aot_package.MAX_RELATIVE_ERROR for error in record["errors"].values())
    monkeypatch.setattr(aot_package, "MAX_RELATIVE_ERROR", -1.0)  # a check now would fail
    installed, timings = prepare(compiled)
    routes += installed
    assert "aot_check" not in timings and "aot_load" in timings
    assert len(installed) == 1  # the package serves


def test_a_package_unlike_its_record_is_checked_again(
    sdxl_pipe: Any, package_dir: Path, tmp_path: Path, routes: list[Route]
) -> None:
    compiled = CompiledUnet(sdxl_pipe.unet, LATENT, tmp_path)
    cache = compiled.package.cache
    shutil.copyfile(package_dir / cache.path.name, cache.path)
    cache.record_path.write_text(json.dumps({"package_sha256": "0" * 64, "errors": {}}))
    installed, timings = prepare(compiled)
    routes += installed
    assert "aot_check" in timings and len(installed) == 1
    digest = hashlib.sha256(cache.path.read_bytes()).hexdigest()
    assert json.loads(cache.record_path.read_text())["package_sha256"] == digest


def test_worker_serves_1024_jobs_from_the_package(s3: Any, s3_endpoint: str, package_dir: Path) -> None:
    settings = tiny_settings(s3_endpoint, ["sdxl"], compile="on", compile_cache_dir=package_dir)
    worker = start_worker(settings)
    (family,) = worker.families
    try:
        assert worker.startup["fast_paths"] == {"sdxl-unet": "serving", "sdxl-vae-decode": "serving"}
        unet, vae = (family.fast_paths.named(name) for name in ("sdxl-unet", "sdxl-vae-decode"))
        unet.package.runner = spy = CallSpy(unet.package.runner)
        vae.package.runner = decodes = CallSpy(vae.package.runner)
        for job_id, config in (("aot-1024", {"num_images": 2}), ("aot-512", {"width": 512, "height": 512})):
            payload = {"type": "sdxl_image_fast", "prompt": "a boat", "user_id": "aot", "config": config}
            result = worker.handle({"id": job_id, "input": {"id": job_id, **payload}})
            assert result["status"] == "completed", result
        assert spy.batches == [4] * 15  # the 1024 job's 15 steps; the 512 job ran eagerly
        assert decodes.batches == [2]  # the 1024 job's two images, decoded by the VAE package
        assert len(list_keys(s3, "aot/aot-1024/")) == 4
    finally:
        family.fast_paths.undo()


def test_lora_jobs_keep_the_package_and_match_the_eager_lora_job(
    s3: Any, s3_endpoint: str, package_dir: Path, sdxl_worker: Any, tmp_path: Path
) -> None:
    """The LoRA is merged into the UNet's own tensors, which the package runs on: the compiled
    path serves the LoRA job (nothing compiles) with the eager path's image."""
    loras = tmp_path / "loras"
    loras.mkdir()
    compiled = start_worker(
        tiny_settings(s3_endpoint, ["sdxl"], compile="on", compile_cache_dir=package_dir, loras_dir=loras)
    )
    (family,) = compiled.families
    pipe = family.text2img
    lora = kit.join(
        kit.factors(pipe.unet, kit.SDXL_UNET_TARGETS, 4, 7, "unet."),
        kit.factors(pipe.text_encoder_2, kit.SDXL_TEXT_TARGETS, 4, 8, "text_encoder_2."),
    )
    (loras / "style.safetensors").write_bytes(kit.to_bytes(kit.peft_layout(lora)))
    eager = Worker(compiled.settings, compiled.storage, sdxl_worker.families)
    sdxl_worker.families[0].loras.loras_dir = loras
    unet = family.fast_paths.named("sdxl-unet")
    try:
        unet.package.runner = spy = CallSpy(unet.package.runner)
        images = []
        for worker, job_id in ((compiled, "aot-lora"), (eager, "eager-lora"), (compiled, "aot-plain")):
            config = {"num_inference_steps": 2, "seed": 4, "loras": [{"name": "style", "scale": 0.9}]}
            if job_id.endswith("plain"):
                del config["loras"]
            payload = {"type": "sdxl_image_fast", "prompt": "a boat", "user_id": "aot", "config": config}
            result = worker.handle({"id": job_id, "input": {"id": job_id, **payload}})
            key = result["assets"][0]["url"].split("/", 1)[1]
            body = s3.get_object(Bucket="workspace-temp", Key=key)["Body"].read()
            images.append(np.asarray(Image.open(io.BytesIO(body)), dtype=np.int16))
        assert spy.batches == [2, 2, 2, 2]  # both compiled jobs' two steps ran in the package
        assert np.abs(images[0] - images[1]).max() <= 2  # the LoRA job: compiled == eager
        assert np.abs(images[0] - images[2]).max() > 20  # and the LoRA did change the image
    finally:
        family.fast_paths.undo()
        sdxl_worker.families[0].loras.loras_dir = sdxl_worker.settings.loras_path


def test_compile_on_refuses_to_start_when_a_package_cannot_serve(
    s3: Any, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: AotPackage) -> None:
        raise RuntimeError("the C++ compiler is missing")

    monkeypatch.setattr(AotPackage, "_compile", broken)
    with pytest.raises(StartupError) as refused:
        start_worker(tiny_settings(s3_endpoint, ["sdxl"], compile="on", compile_cache_dir=tmp_path))
    message = str(refused.value)
    assert message.startswith("COMPILE=on, but sdxl-unet cannot serve: sdxl-unet: not compiled")
    assert "the C++ compiler is missing" in message and "\n" not in message


def test_compile_wait_serves_eagerly_and_says_so(
    s3: Any, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(AotPackage, "_compile", lambda self: None)  # compiles nothing
    worker = start_worker(tiny_settings(s3_endpoint, ["sdxl"], compile="wait", compile_cache_dir=tmp_path))
    status = worker.startup["fast_paths"]
    assert set(status) == {"sdxl-unet", "sdxl-vae-decode"}
    assert all(value.startswith("eager: ") and "unusable" in value for value in status.values())
    (family,) = worker.families
    assert family.fast_paths.routes == [] and "forward" not in vars(family.text2img.unet)
    assert worker.background is None  # nothing left to compile in the background
    job = {
        "type": "sdxl_image_fast",
        "prompt": "a boat",
        "user_id": "aot",
        "config": {"num_inference_steps": 2},
    }
    assert worker.handle({"id": "eager", "input": {"id": "eager", **job}})["status"] == "completed"


def test_failure_inside_the_compiled_graph_on_gpu_is_a_gpu_fault(
    sdxl_pipe: Any, package_dir: Path, routes: list[Route]
) -> None:
    compiled = CompiledUnet(sdxl_pipe.unet, LATENT, package_dir)
    routes += prepare(compiled)[0]

    def broken(*inputs: torch.Tensor) -> torch.Tensor:  # what AOTInductor raises for any CUDA error
        raise RuntimeError("run_func_( container_handle_, ...) API call failed at model_container_runner.cpp")

    compiled.package.runner = broken
    compiled.package.on_gpu = True
    with pytest.raises(RuntimeError) as on_gpu:
        pipe_images(sdxl_pipe, COMPILED_SIZE)
    assert is_gpu_fault(on_gpu.value) and "compiled SDXL UNet" in str(on_gpu.value)
    compiled.package.on_gpu = False
    with pytest.raises(RuntimeError, match="API call failed") as on_cpu:
        pipe_images(sdxl_pipe, COMPILED_SIZE)
    assert not is_gpu_fault(on_cpu.value)
