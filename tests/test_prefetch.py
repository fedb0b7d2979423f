"""The weight prefetch at start-up: which files it reads (the ready families' weights, nothing
else, and not those in the page cache already), its memory budget, a file gone before it is read,
and the start-up record."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import psutil
import pytest

from bench.page_cache import evict
from src import prefetch as prefetch_module
from src.families import ready_order
from src.models import TINY_SUBDIR
from src.prefetch import CHUNK_BYTES, WeightPrefetch, available_bytes, in_page_cache, weight_files
from src.settings import Settings
from src.worker import Worker, start_worker
from tests.conftest import TEST_MODELS_DIR, tiny_settings

MB = 1 << 20


def drop_from_page_cache(root: Path) -> None:
    """Drop the files under ``root`` from the page cache, as on a new machine (the benchmark's
    ``evict``), and check that they are out of it."""
    evict([root])
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as file:
                assert not in_page_cache(file.fileno())


def layout(root: Path) -> dict[str, int]:
    """A full-profile MODELS_DIR of random files, not in the page cache: relative path -> size."""
    files = {
        "sdxl/model_index.json": 300,
        "sdxl/unet/diffusion_pytorch_model.safetensors": 3 * MB + 5,
        "sdxl/text_encoder/model.safetensors": MB,
        "sdxl/tokenizer/vocab.json": 2000,
        "wan-t2v/transformer/diffusion_pytorch_model-00001-of-00002.safetensors": MB,
        "wan-t2v/transformer/diffusion_pytorch_model-00002-of-00002.safetensors": MB,
        "wan-vace/transformer/diffusion_pytorch_model.safetensors": MB,
        "wan-turbo/transformer/diffusion_pytorch_model.safetensors": MB,
        "prompt/model.safetensors": 2 * MB,
    }
    for name, size in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    drop_from_page_cache(root)
    return files


def full_settings(root: Path, families: str, **values: object) -> Settings:
    storage = root / "storage"
    return Settings(
        models_dir=root, model_profile="full", worker_models=families, local_storage_dir=storage, **values
    )


def test_the_ready_familys_weights_are_read_first_then_the_later_ones(tmp_path: Path) -> None:
    """The start-up record counts the ready family's weight files (not its configs); the later
    families' follow, behind the ready worker."""
    files = layout(tmp_path)
    settings = full_settings(tmp_path, "sdxl,wan,prompt")
    now, later = ready_order(settings)
    assert (now, later) == (["sdxl"], ["wan", "prompt"])
    prefetch = WeightPrefetch.start_for(settings, now, later)
    record = prefetch.record()
    sdxl_weights = sorted(n for n in files if n.startswith("sdxl/") and n.endswith(".safetensors"))
    assert [str(path.relative_to(tmp_path)) for path in prefetch.files] == sdxl_weights
    assert record == {
        "prefetch_bytes": sum(files[name] for name in sdxl_weights),
        "prefetch_cached_bytes": 0,
        "prefetch_s": record["prefetch_s"],
    }
    assert record["prefetch_s"] >= 0
    prefetch._thread.join()
    weights = [name for name in files if name.endswith(".safetensors")]
    assert prefetch.bytes_read == sum(files[name] for name in weights)  # wan's (turbo on) and the LLM's too
    assert sorted(map(str, prefetch.files + prefetch.later)) == sorted(str(tmp_path / n) for n in weights)


def test_each_family_reads_its_own_directories(tmp_path: Path) -> None:
    files = layout(tmp_path)
    wan = weight_files(full_settings(tmp_path, "wan", wan_turbo=False), ["wan"])
    assert [str(path.relative_to(tmp_path)) for path in wan] == [
        name for name in files if name.startswith(("wan-t2v/", "wan-vace/"))
    ]
    turbo = weight_files(full_settings(tmp_path, "wan", wan_turbo=True), ["wan"])
    assert turbo == [*wan, tmp_path / "wan-turbo/transformer/diffusion_pytorch_model.safetensors"]
    prompt = weight_files(full_settings(tmp_path, "sdxl,prompt"), ["prompt"])
    assert prompt == [tmp_path / "prompt/model.safetensors"]
    assert weight_files(full_settings(tmp_path / "none", "sdxl"), ["sdxl"]) == []  # none there: none read


def test_files_in_the_page_cache_already_are_not_read_again(tmp_path: Path) -> None:
    """A restarted worker's weights are in memory: copying them again only slows the imports beside
    the prefetch. A file read whole is skipped; one with only its first pages in memory is read."""
    files = layout(tmp_path)
    unet = tmp_path / "sdxl/unet/diffusion_pytorch_model.safetensors"
    encoder = tmp_path / "sdxl/text_encoder/model.safetensors"
    encoder.read_bytes()
    with unet.open("rb", buffering=0) as file:  # its first pages only: no read-ahead
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(file.fileno(), 64 << 10, 0)
    settings = full_settings(tmp_path, "sdxl,prompt")
    prefetch = WeightPrefetch.start_for(settings, *ready_order(settings))
    record = prefetch.record()
    prefetch._thread.join()
    unet_size, encoder_size = (files[str(path.relative_to(tmp_path))] for path in (unet, encoder))
    assert record["prefetch_bytes"] == unet_size and record["prefetch_cached_bytes"] == encoder_size
    assert prefetch.bytes_read == unet_size + files["prompt/model.safetensors"]
    with unet.open("rb") as file:
        assert in_page_cache(file.fileno())  # read now


def test_where_the_page_cache_cannot_be_asked_every_file_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ``RWF_NOWAIT`` (another OS), or a file system that refuses it: read, as before."""
    files = layout(tmp_path)
    (tmp_path / "prompt/model.safetensors").read_bytes()  # in memory, but that cannot be seen
    prompt = weight_files(full_settings(tmp_path, "sdxl,prompt"), ["prompt"])

    def refused(*args: object) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "preadv", refused)
    refusing = WeightPrefetch(prompt, [], budget=None)
    monkeypatch.delattr(os, "RWF_NOWAIT")
    missing = WeightPrefetch(prompt, [], budget=None)
    for prefetch in (refusing, missing):
        prefetch.start()
        assert prefetch.record()["prefetch_cached_bytes"] == 0
        assert prefetch.bytes_read == files["prompt/model.safetensors"]


def test_reading_stops_at_the_budget(tmp_path: Path) -> None:
    layout(tmp_path)
    files = weight_files(full_settings(tmp_path, "sdxl"), ["sdxl"])
    later = weight_files(full_settings(tmp_path, "wan"), ["wan"])
    prefetch = WeightPrefetch(files, later, budget=MB // 2)
    prefetch.start()
    prefetch.record()
    prefetch._thread.join()
    assert CHUNK_BYTES > MB  # so one read took the whole first file, over the budget:
    assert prefetch.bytes_read == MB  # the next file (the UNet's) was not read, nor Wan's


def test_a_file_gone_before_it_is_read_stops_the_prefetch_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = layout(tmp_path)
    gone = tmp_path / "sdxl/unet/gone.safetensors"
    later = [tmp_path / "prompt/model.safetensors"]
    prefetch = WeightPrefetch([tmp_path / "sdxl/text_encoder/model.safetensors", gone], later, budget=None)
    with caplog.at_level(logging.WARNING):
        prefetch.start()
        record = prefetch.record()
        prefetch._thread.join()
    assert prefetch.bytes_read == files["sdxl/text_encoder/model.safetensors"]  # not the LLM's
    assert record["prefetch_bytes"] == prefetch.bytes_read
    assert f"weight prefetch stopped at {gone}" in caplog.text


def test_a_worker_reads_its_weights_at_start_and_records_them(
    s3_endpoint: str, sdxl_worker: Worker, tmp_path: Path
) -> None:
    """A worker with baked weights (MODEL_PROFILE=full: the tiny SDXL, copied in) reads every
    weight file of SDXL once at start and says so in its start-up record."""
    shutil.copytree(TEST_MODELS_DIR / TINY_SUBDIR / "sdxl", tmp_path / "sdxl")
    drop_from_page_cache(tmp_path / "sdxl")  # as on a new machine
    baked = tiny_settings(s3_endpoint, ["sdxl"], models_dir=tmp_path, model_profile="full")
    worker = start_worker(baked)
    sizes = [path.stat().st_size for path in (tmp_path / "sdxl").rglob("*.safetensors")]
    assert len(sizes) == 4  # the UNet, the VAE, both text encoders
    assert worker.startup["prefetch_bytes"] == sum(sizes) and worker.startup["prefetch_s"] >= 0
    assert worker.startup["prefetch_cached_bytes"] == 0


def test_the_budget_is_the_memory_available_to_the_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half of what the page cache could hold: the machine's available memory, or what the
    container's memory limit leaves when that is less (cgroup v2 files here, written by the test)."""
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    monkeypatch.setattr(prefetch_module, "CGROUP_FILES", ((str(limit), str(usage)),))
    limit.write_text("max\n")
    usage.write_text(f"{5 << 30}\n")
    machine = psutil.virtual_memory().available  # MemAvailable, read independently
    assert available_bytes() == pytest.approx(machine, rel=0.05)
    limit.write_text(f"{3 << 30}\n")
    usage.write_text(f"{1 << 30}\n")
    assert available_bytes() == 2 << 30  # the limit leaves less than the machine has
