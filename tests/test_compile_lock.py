"""Workers sharing one COMPILE_CACHE_DIR: a package is compiled once (its lock file and heartbeat),
a stale lock is taken over, a half-written package is never loaded. Real AOTInductor packages of a
small module on the CPU; the second worker is a real second process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from src import compile_lock
from src.aot_package import AotPackage, DynamicDim
from src.compile_lock import PackageLock
from src.timing import Phases
from tests.conftest import REPO


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(16, 32)
        self.second = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.nn.functional.gelu(self.first(x)))


def small_package(cache_dir: Path) -> AotPackage:
    return AotPackage(
        "small",
        Small(),
        lambda batch: (torch.randn(batch, 16),),
        DynamicDim("batch", 1, 8, checked=(1, 2)),
        lambda batch: ({0: batch},),
        {"test": "small"},
        cache_dir,
        torch.device("cpu"),
    )


# A second worker: prepares the same package in its own process, prints what it did.
OTHER_WORKER = """
import logging, sys
from pathlib import Path
from tests.test_compile_lock import small_package
from src.timing import Phases
logging.basicConfig(level=logging.INFO)
phases = Phases()
package = small_package(Path(sys.argv[1]))
package.prepare(phases, "small")
print(sorted(phases.seconds))
"""


@pytest.fixture(autouse=True)
def quick_cpp_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O0")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[AotPackage, Phases]:
    """The package compiled once (a stale lock of a crashed worker in its way, taken over), and
    the phases of that."""
    cache_dir = tmp_path_factory.mktemp("compiled")
    package = small_package(cache_dir)
    package.cache.lock_path.write_text("crashed-host 1 token")
    old = time.time() - compile_lock.STALE_AFTER_S - 5
    os.utime(package.cache.lock_path, (old, old))
    phases = Phases()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O0")
        package.prepare(phases, "small")
    return package, phases


def test_a_stale_lock_is_taken_over(compiled: tuple[AotPackage, Phases]) -> None:
    package, phases = compiled
    assert "small_compile" in phases.seconds
    assert package.runner is not None and package.cache.record_path.is_file()
    assert not package.cache.lock_path.exists()  # released
    x = torch.randn(3, 16)
    assert torch.allclose(package.runner(x), package.module(x), atol=1e-5)


def test_a_held_lock_is_waited_for_and_a_half_written_package_never_loaded(
    compiled: tuple[AotPackage, Phases], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = compiled[0].cache
    monkeypatch.setattr(AotPackage, "_compile", lambda self: pytest.fail("compiled a package being compiled"))
    package = small_package(tmp_path)
    other = PackageLock(package.cache.lock_path)
    assert other.try_acquire()
    half_written = package.cache.path.with_name(f".{package.cache.path.name}.partial.pt2")
    half_written.write_bytes(done.path.read_bytes()[:1000])

    def other_worker_finishes() -> None:
        time.sleep(2.0)
        half_written.write_bytes(done.path.read_bytes())
        os.replace(half_written, package.cache.path)
        shutil.copyfile(done.record_path, package.cache.record_path)
        other.release()

    finisher = threading.Thread(target=other_worker_finishes)
    finisher.start()
    phases = Phases()
    package.prepare(phases, "small")
    finisher.join()
    assert phases.seconds["small_wait"] >= 1.5
    assert "small_compile" not in phases.seconds and "small_check" not in phases.seconds  # its record
    assert package.runner is not None and not package.cache.lock_path.exists()


def test_a_lock_whose_heartbeat_stopped_is_taken_over(tmp_path: Path) -> None:
    held = PackageLock(tmp_path / "x.lock", heartbeat_s=0.1, stale_after_s=0.5)
    assert held.try_acquire()
    waiting = PackageLock(tmp_path / "x.lock", heartbeat_s=0.1, stale_after_s=0.5)
    time.sleep(1.0)
    assert not waiting.try_acquire()  # the heartbeat keeps it fresh
    held._stop.set()  # the holder hangs: its heartbeat stops, the file stays
    held._heartbeat.join()  # type: ignore[union-attr]
    started = time.monotonic()
    waiting.wait(poll_s=0.05)
    assert 0.3 <= time.monotonic() - started <= 3.0
    assert waiting.try_acquire()
    held.release()  # no longer its lock: left alone
    assert (tmp_path / "x.lock").read_text() == waiting.token
    waiting.release()
    assert not (tmp_path / "x.lock").exists()


def test_two_workers_on_one_cache_directory_compile_once(tmp_path: Path) -> None:
    env = {**os.environ, "AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL": "O0", "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", OTHER_WORKER, str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    phases = sorted(stdout.strip() for stdout, _ in outputs)
    # one compiled (and checked it); the other waited, then loaded the package, trusting its record
    assert phases == [
        "['small_check', 'small_compile', 'small_load']",
        "['small_load', 'small_wait']",
    ]
    assert sum(stderr.count("compiling small ahead of time") for _, stderr in outputs) == 1
    # the package and its record: no lock, no half-written file (named as the workers named them:
    # this process's INDUCTOR_CONFIGS may differ, other tests change them)
    (package,) = tmp_path.glob("small-*.pt2")
    assert sorted(tmp_path.iterdir()) == sorted([package, package.with_suffix(".checked.json")])
