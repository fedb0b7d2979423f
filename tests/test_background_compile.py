"""Packages compiled in the background (COMPILE=background), end to end on the CPU with the tiny
Wan family: real child processes, real AOTInductor packages, real jobs through moto S3."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from src.fast_path import BACKGROUND, SERVING
from src.worker import Worker, start_worker
from tests.conftest import tiny_settings
from tests.test_wan_e2e import read, wan_job

PACKAGES = ["wan-WanTransformerBlock", "wan-WanVACETransformerBlock", "wan-WanVACETransformerBlock-2"]


@pytest.fixture(autouse=True)
def quick_cpp_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's C++ wrapper built at -O0 (an environment variable: the child inherits it)."""
    monkeypatch.setenv("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O0")


def background_worker(
    s3_endpoint: str, cache_dir: Path, families: tuple[str, ...] = ("wan",), **overrides: Any
) -> Worker:
    settings = tiny_settings(
        s3_endpoint, list(families), compile="background", compile_cache_dir=cache_dir, **overrides
    )
    return start_worker(settings)


def image_job(worker: Worker, s3: Any, job_id: str) -> tuple[np.ndarray, dict[str, Any]]:
    """One Wan image job (the same seed every time): its pixels and its asset metadata."""
    result = worker.handle(wan_job(job_id, "image_fast"))
    assert result["status"] == "completed", result
    (asset,) = result["assets"]
    png, content_type = read(s3, asset["url"])
    assert content_type == "image/png"
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16), asset["metadata"]


def attempts(cache_dir: Path) -> list[int]:
    """The background compiles counted for each package, on this machine."""
    return [sum(json.loads(p.read_text()).values()) for p in sorted(cache_dir.glob("*.attempts.json"))]


@pytest.fixture(scope="module")
def compiled_cache(s3: Any, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A worker started on an empty cache: what it said at ready, its jobs before and after the
    background compile, and the cache it filled."""
    cache_dir = tmp_path_factory.mktemp("background") / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O0")
        worker = background_worker(s3_endpoint, cache_dir)
        at_ready = {
            "fast_paths": dict(worker.startup["fast_paths"]),
            "packages": list(cache_dir.glob("*.pt2")),
        }
        eager = image_job(worker, s3, "before-compile")
        assert worker.background is not None and worker.background.wait(600)
        compiled = image_job(worker, s3, "after-compile")
    return {
        "worker": worker,
        "at_ready": at_ready,
        "eager": eager,
        "compiled": compiled,
        "cache_dir": cache_dir,
    }


def test_ready_before_any_package_then_compiled_between_jobs(compiled_cache: dict[str, Any]) -> None:
    at_ready = compiled_cache["at_ready"]
    assert at_ready["fast_paths"] == dict.fromkeys(PACKAGES, BACKGROUND)
    assert at_ready["packages"] == []  # ready before anything was compiled

    worker: Worker = compiled_cache["worker"]
    assert worker.startup["fast_paths"] == dict.fromkeys(PACKAGES, SERVING)
    assert sorted(worker.startup["active_after_s"]) == PACKAGES
    assert worker.startup["background_compile_s"] >= max(worker.startup["active_after_s"].values())
    (child,) = worker.background.children
    assert child.returncode == 0

    eager_pixels, eager_meta = compiled_cache["eager"]
    compiled_pixels, compiled_meta = compiled_cache["compiled"]
    assert eager_meta["compiled"] is False and compiled_meta["compiled"] is True
    assert compiled_pixels.shape == eager_pixels.shape
    assert np.abs(compiled_pixels - eager_pixels).max() <= 2  # the packages' check tolerance, in pixels

    cache_dir: Path = compiled_cache["cache_dir"]
    packages = sorted(cache_dir.glob("*.pt2"))
    assert len(packages) == 3
    assert sorted(cache_dir.glob("*.checked.json")) == [p.with_suffix(".checked.json") for p in packages]
    assert list(cache_dir.glob("*.lock")) == [] and list(cache_dir.glob(".*")) == []  # no lock, no temp file
    assert attempts(cache_dir) == [1, 1, 1]


def test_the_next_worker_loads_the_packages_and_starts_no_child(
    compiled_cache: dict[str, Any], s3: Any, s3_endpoint: str
) -> None:
    worker = background_worker(s3_endpoint, compiled_cache["cache_dir"])
    assert worker.background is None
    assert worker.startup["fast_paths"] == dict.fromkeys(PACKAGES, SERVING)
    assert image_job(worker, s3, "cached")[1]["compiled"] is True


def test_a_corrupt_package_is_compiled_again_in_the_background(
    compiled_cache: dict[str, Any], s3: Any, s3_endpoint: str, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    shutil.copytree(compiled_cache["cache_dir"], cache_dir)
    (corrupt,) = cache_dir.glob("wan-WanTransformerBlock-*.pt2")
    corrupt.write_bytes(corrupt.read_bytes()[:1000])  # a truncated file: its record no longer matches
    # Wan loads behind SDXL (READY_AFTER=first); its missing package compiles once it is loaded.
    worker = background_worker(s3_endpoint, cache_dir, ("sdxl", "wan"), compile_sdxl=False)
    assert worker.late is not None and worker.late.wait(300)
    assert worker.startup["fast_paths"]["wan-WanTransformerBlock"] == BACKGROUND
    assert image_job(worker, s3, "while-compiling")[1]["compiled"] is False  # T2V's blocks: eager
    assert worker.background is not None and worker.background.wait(600)
    assert worker.startup["fast_paths"] == dict.fromkeys(PACKAGES, SERVING)
    # both count from ready: the package became active after Wan had loaded
    assert (
        worker.startup["active_after_s"]["wan-WanTransformerBlock"] > worker.startup["ready_after_s"]["wan"]
    )
    assert corrupt.stat().st_size > 1000
    pixels, metadata = image_job(worker, s3, "recompiled")
    assert metadata["compiled"] is True
    assert np.abs(pixels - compiled_cache["compiled"][0]).max() <= 2


def _kill_the_child(worker: Worker) -> None:
    assert worker.background is not None
    deadline = time.monotonic() + 60
    while not worker.background.children and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = worker.background.children
    os.kill(child.pid, signal.SIGKILL)
    assert worker.background.wait(60)


def test_a_killed_child_leaves_the_worker_eager_and_is_retried_once(
    s3: Any, s3_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "cache"
    for start in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="src.background"):
            worker = background_worker(s3_endpoint, cache_dir)
            _kill_the_child(worker)
        gave_up = [r.getMessage() for r in caplog.records if r.name == "src.background"]
        assert len(gave_up) == 3  # one line per package
        assert all("the compiling process ended (killed by signal 9)" in line for line in gave_up)
        assert all(status.startswith("eager: ") for status in worker.startup["fast_paths"].values())
        assert image_job(worker, s3, f"after-kill-{start}")[1]["compiled"] is False
        assert attempts(cache_dir) == [start] * 3

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="src.background"):
        worker = background_worker(s3_endpoint, cache_dir)  # COMPILE_RETRIES=1: no third attempt
        assert worker.background is not None and worker.background.wait(60)
    assert worker.background.children == []
    assert attempts(cache_dir) == [2, 2, 2]
    expected = "eager: 2 background compiles of it failed on this machine (COMPILE_RETRIES=1)"
    assert worker.startup["fast_paths"] == dict.fromkeys(PACKAGES, expected)
    assert len([r for r in caplog.records if r.name == "src.background"]) == 3

    worker = background_worker(s3_endpoint, cache_dir, compile_retries=2)  # one more allowed
    _kill_the_child(worker)
    assert attempts(cache_dir) == [3, 3, 3]
