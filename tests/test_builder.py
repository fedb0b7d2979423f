"""builder/download_models.py offline: a fake hub cache of tiny models, laid out like the real one.

The fake cache mirrors the real repos' layout (SDXL's fp16 variant files, the fp16-fix VAE repo,
Wan's sharded fp32 UMT5, the VACE repo), with blobs named by sha256 (LFS) or git sha1 and
``refs/main``. The builder's output must load through the worker with ``MODEL_PROFILE=full``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from builder import download_models as dm
from src.models import model_dirs
from src.sdxl.tiny import build_tiny_sdxl
from src.settings import Settings
from src.wan.tiny import build_tiny_wan
from src.worker import start_worker
from tests.conftest import TEST_MODELS_DIR

LFS_SUFFIXES = (".safetensors", ".model", ".bin")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def add_repo(cache: Path, repo: str, files: dict[str, bytes]) -> str:
    """Write ``files`` into ``cache`` the way huggingface_hub does: blobs, snapshot symlinks, refs/main."""
    storage = cache / dm.repo_folder(repo)
    commit = hashlib.sha1(repo.encode(), usedforsecurity=False).hexdigest()
    for rel, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if rel.endswith(LFS_SUFFIXES) else git_sha1(data)
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return commit


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def st_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors, metadata={"format": "pt"})


def tiny_dirs() -> tuple[Path, Path, Path]:
    """The tiny models conftest's workers use (built once, cached under TEST_MODELS_DIR)."""
    settings = Settings(models_dir=TEST_MODELS_DIR, model_profile="tiny", local_storage_dir=TEST_MODELS_DIR)
    (sdxl,) = model_dirs(settings, ["sdxl"], build_tiny_sdxl)
    t2v, vace = model_dirs(settings, ["wan-t2v", "wan-vace"], build_tiny_wan)
    return sdxl, t2v, vace


def build_fake_cache(cache: Path) -> None:
    sdxl, t2v, vace = tiny_dirs()

    # SDXL base: plain fp32 weights plus the fp16 variant files the builder should pick, an extra
    # single-file checkpoint it must leave alone, and the original VAE it must replace.
    files = read_tree(sdxl)
    for rel in list(files):
        if rel.endswith(".safetensors") and not rel.startswith("vae/"):
            half = {k: v.half() for k, v in load_file(sdxl / rel).items()}
            files[rel.replace(".safetensors", ".fp16.safetensors")] = st_bytes(half)
    files["sd_xl_base_1.0.safetensors"] = b"not to be copied"
    add_repo(cache, dm.SDXL_REPO, files)

    # The fp16-fix VAE repo: config.json + weights at the root (config says force_upcast: true).
    vae_config = json.loads((sdxl / "vae" / "config.json").read_text())
    vae_config.update(force_upcast=True, _name_or_path="madebyollin/sdxl-vae-fp16-fix")
    add_repo(
        cache,
        dm.SDXL_VAE_REPO,
        {
            "config.json": json.dumps(vae_config).encode(),
            "diffusion_pytorch_model.safetensors": (
                sdxl / "vae" / "diffusion_pytorch_model.safetensors"
            ).read_bytes(),
            "sdxl_vae.safetensors": b"a single-file copy, not used",
        },
    )

    # Wan T2V: the UMT5 encoder sharded in two fp32 files with an index, as published.
    files = read_tree(t2v)
    encoder = load_file(t2v / "text_encoder" / "model.safetensors")
    names = sorted(encoder)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    del files["text_encoder/model.safetensors"]
    weight_map = {}
    for shard, keys in shards.items():
        files[f"text_encoder/{shard}"] = st_bytes({k: encoder[k] for k in keys})
        weight_map.update(dict.fromkeys(keys, shard))
    total = sum(t.numel() * t.element_size() for t in encoder.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    files["text_encoder/model.safetensors.index.json"] = json.dumps(index).encode()
    add_repo(cache, dm.WAN_T2V_REPO, files)

    add_repo(cache, dm.WAN_VACE_REPO, read_tree(vace))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("hub-cache")
    build_fake_cache(cache)
    return cache


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)


def run_builder(*args: str) -> int:
    return dm.main(list(args))


def cli(models: Path, cache: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "--families",
        "sdxl,wan",
        "--models-dir",
        str(models),
        "--hub-cache",
        str(cache),
        "--download-cache",
        str(tmp / "downloads"),
        *extra,
    ]


@pytest.fixture(scope="module")
def built(hub_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MODELS_DIR built once, offline, from the fake hub cache."""
    tmp = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert run_builder(*cli(tmp / "models", hub_cache, tmp)) == 0
    return tmp / "models"


def dtypes(path: Path) -> set[str]:
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def copy_models(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_layout_and_dtypes(built: Path) -> None:
    sdxl = built / "sdxl"
    assert (sdxl / "model_index.json").is_file() and not (sdxl / "sd_xl_base_1.0.safetensors").exists()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        names = sorted(p.name for p in (sdxl / component).glob("*.safetensors"))
        assert names == [
            "diffusion_pytorch_model.safetensors" if component == "unet" else "model.safetensors"
        ]  # the fp16 variant, stored under the name from_pretrained loads
    assert dtypes(sdxl / "unet" / "diffusion_pytorch_model.safetensors") == {"F16"}
    vae_config = json.loads((sdxl / "vae" / "config.json").read_text())
    assert vae_config["_name_or_path"] == "madebyollin/sdxl-vae-fp16-fix"  # the fp16-fix VAE, not base's
    assert vae_config["force_upcast"] is False
    assert dtypes(sdxl / "vae" / "diffusion_pytorch_model.safetensors") == {"F16"}

    t2v = built / "wan-t2v"
    shards = sorted((t2v / "text_encoder").glob("model-*.safetensors"))
    assert len(shards) == 2 and all(dtypes(p) == {"BF16"} for p in shards)  # published fp32, stored bf16
    index = json.loads((t2v / "text_encoder" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for p in shards for t in load_file(p).values()
    )
    assert dtypes(t2v / "transformer" / "diffusion_pytorch_model.safetensors") == {"BF16"}
    assert dtypes(t2v / "vae" / "diffusion_pytorch_model.safetensors") == {"F32"}
    with safe_open(shards[0], "pt") as f:  # the streaming writer's files load with safetensors itself
        assert f.metadata() == {"format": "pt"} and f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16

    vace = built / "wan-vace"
    assert (vace / "model_index.json").is_file() and (vace / "scheduler" / "scheduler_config.json").is_file()
    assert dtypes(vace / "transformer" / "diffusion_pytorch_model.safetensors") == {"BF16"}
    for shared in ("text_encoder", "tokenizer", "vae"):
        assert os.readlink(vace / shared) == f"../wan-t2v/{shared}" and (vace / shared).is_dir()

    manifest = json.loads((t2v / dm.MANIFEST).read_text())
    assert manifest["sources"][dm.WAN_T2V_REPO]["from"].startswith("hub cache ")
    for rel, info in manifest["files"].items():
        assert dm.file_sha256(t2v / rel) == info["sha256"]


def test_built_models_load_and_run_in_the_worker(built: Path, tmp_path: Path) -> None:
    settings = Settings(
        models_dir=built,
        model_profile="full",
        worker_models=["sdxl", "wan"],
        device="cpu",
        local_storage_dir=tmp_path,
    )
    worker = start_worker(settings)
    assert not (built / "tiny").exists()  # the real-profile path, no tiny fallback
    image = worker.handle(
        {
            "id": "rp-1",
            "input": {
                "id": "baked-sdxl",
                "type": "sdxl_image_fast",
                "prompt": "a red kite",
                "user_id": "builder",
                "config": {"width": 512, "height": 512, "num_inference_steps": 2, "seed": 3},
            },
        }
    )
    assert image["status"] == "completed", image
    video = worker.handle(
        {
            "id": "rp-2",
            "input": {
                "id": "baked-wan",
                "type": "video_fast",
                "prompt": "a paper boat",
                "user_id": "builder",
                "config": {"resolution": "256x256", "num_frames": 5, "num_inference_steps": 2, "seed": 3},
            },
        }
    )
    assert video["status"] == "completed", video
    assert (tmp_path / "builder" / "baked-sdxl" / "0.png").is_file()
    assert (tmp_path / "builder" / "baked-wan" / "0.mp4").is_file()


def test_second_run_skips_everything(
    built: Path, hub_cache: Path, tmp_path: Path, offline: None, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p: p.stat().st_mtime_ns for p in built.rglob("*") if p.is_file()}
    started = time.monotonic()
    assert run_builder(*cli(built, hub_cache, tmp_path)) == 0
    assert time.monotonic() - started < 5
    assert "sdxl skipped, wan-t2v skipped, wan-vace skipped" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in built.rglob("*") if p.is_file()}


def test_truncated_output_is_detected_and_rebuilt(
    built: Path, hub_cache: Path, tmp_path: Path, offline: None
) -> None:
    models = copy_models(built, tmp_path / "models")
    weights = models / "wan-t2v" / "transformer" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-10])
    options = dm.BuildOptions(models, [dm.CacheSource(hub_cache)])
    assert dm.build(["sdxl", "wan"], options) == {
        "sdxl": "skipped",
        "wan-t2v": "built",
        "wan-vace": "skipped",
    }
    assert weights.read_bytes() == good


def test_same_size_corruption_is_found_by_verify(built: Path, hub_cache: Path, tmp_path: Path) -> None:
    models = copy_models(built, tmp_path / "models")
    weights = models / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-4] + bytes(b ^ 0xFF for b in good[-4:]))
    options = dm.BuildOptions(models, [dm.CacheSource(hub_cache)])
    assert dm.build(["sdxl"], options) == {"sdxl": "skipped"}  # the quick check compares sizes only
    options.verify = True
    assert dm.build(["sdxl"], options) == {"sdxl": "built"}
    assert weights.read_bytes() == good


def corrupt_blob(cache: Path, repo: str, rel: str) -> None:
    link = cache / dm.repo_folder(repo) / "snapshots" / add_commit(repo) / rel
    blob = link.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))


def add_commit(repo: str) -> str:
    return hashlib.sha1(repo.encode(), usedforsecurity=False).hexdigest()


def test_corrupt_cache_file_is_reported(
    hub_cache: Path, tmp_path: Path, offline: None, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(hub_cache, cache, symlinks=True)
    corrupt_blob(cache, dm.WAN_T2V_REPO, "transformer/diffusion_pytorch_model.safetensors")
    assert run_builder(*cli(tmp_path / "models", cache, tmp_path, "--families", "wan")) == 1
    err = capsys.readouterr().err
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers@main: no source could provide it" in err
    assert "corrupt file transformer/diffusion_pytorch_model.safetensors: sha256" in err
    assert not (tmp_path / "models" / "wan-t2v").exists()  # nothing half-built left behind
    assert not list((tmp_path / "models").glob(".staging-*"))


def test_corrupt_cache_falls_back_to_the_next_source(hub_cache: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-cache"
    shutil.copytree(hub_cache, bad, symlinks=True)
    corrupt_blob(bad, dm.SDXL_VAE_REPO, "config.json")  # a git-sha1 (non-LFS) blob
    options = dm.BuildOptions(
        tmp_path / "models", [dm.CacheSource(bad, "bad"), dm.CacheSource(hub_cache, "good")]
    )
    assert dm.build(["sdxl"], options) == {"sdxl": "built"}
    manifest = json.loads((tmp_path / "models" / "sdxl" / dm.MANIFEST).read_text())
    assert manifest["sources"][dm.SDXL_REPO]["from"] == "bad"  # its files were fine
    assert manifest["sources"][dm.SDXL_VAE_REPO]["from"] == "good"


class FlakySource(dm.CacheSource):
    """A hub cache whose first listing fails like a dropped connection."""

    def __init__(self, cache_dir: Path, failures: int) -> None:
        super().__init__(cache_dir, "flaky")
        self.failures = failures
        self.calls = 0

    def snapshot(self, repo: str, revision: str) -> dm.Snapshot:
        self.calls += 1
        if self.calls <= self.failures:
            raise httpx.ConnectError("connection reset by peer")
        return super().snapshot(repo, revision)


def test_transient_errors_are_retried_with_backoff(hub_cache: Path, tmp_path: Path) -> None:
    source = FlakySource(hub_cache, failures=2)
    sleeps: list[float] = []
    options = dm.BuildOptions(tmp_path / "models", [source], sleep=sleeps.append, retries=3)
    assert dm.build(["sdxl"], options) == {"sdxl": "built"}
    assert sleeps == [2.0, 4.0]  # exponential backoff, then success on the third attempt

    options = dm.BuildOptions(
        tmp_path / "other", [FlakySource(hub_cache, failures=5)], sleep=sleeps.append, retries=3
    )
    with pytest.raises(dm.BuildError, match="flaky: gave up after 3 attempts: connection reset"):
        dm.build(["sdxl"], options)


class FakeApi:
    """``HfApi.model_info(files_metadata=True)`` answered from the fake cache's files."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def model_info(self, repo: str, *, revision: str, files_metadata: bool, token: str | None) -> Any:
        assert files_metadata and revision == "main"
        snap = dm.CacheSource(self.cache).snapshot(repo, revision)
        siblings = []
        for rel, meta in snap.files.items():
            size = (snap.root / rel).stat().st_size
            lfs = {"sha256": meta.sha256, "size": size} if meta.sha256 else None
            siblings.append(
                type("Sibling", (), dict(rfilename=rel, size=size, blob_id=meta.git_sha1, lfs=lfs))
            )
        return type("Info", (), dict(sha=snap.commit, siblings=siblings))


def test_hub_source_retries_and_refetches_a_corrupt_download(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network path: metadata from the API, snapshot_download into the download cache."""
    downloads = tmp_path / "downloads"
    calls: list[list[str]] = []

    def fake_snapshot_download(
        repo: str, *, revision: str, allow_patterns: list[str], cache_dir: Path, token: Any
    ):
        calls.append(allow_patterns)
        if len(calls) == 1:
            raise httpx.ReadTimeout("read timed out")
        src = hub_cache / dm.repo_folder(repo) / "snapshots" / revision
        dst = Path(cache_dir) / dm.repo_folder(repo) / "snapshots" / revision
        for pattern in allow_patterns:
            rel = pattern.replace("[", "").replace("]", "")
            if not (dst / rel).exists():
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                data = (src / rel).read_bytes()
                if len(calls) == 2 and rel.endswith("unet/diffusion_pytorch_model.fp16.safetensors"):
                    data = data[:-1] + bytes([data[-1] ^ 1])  # a download corrupted in flight
                (dst / rel).write_bytes(data)
        return str(dst)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    source = dm.HubSource(downloads, token="secret-token", api=FakeApi(hub_cache))
    sleeps: list[float] = []
    options = dm.BuildOptions(tmp_path / "models", [source], sleep=sleeps.append)
    assert dm.build(["sdxl"], options) == {"sdxl": "built"}
    # base repo: timeout, corrupt unet (dropped), fresh download; the VAE repo once
    assert len(calls) == 4 and sleeps == [2.0]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in calls[0]
    assert "unet/diffusion_pytorch_model.safetensors" not in calls[0]  # only the fp16 variant is fetched
    manifest = json.loads((tmp_path / "models" / "sdxl" / dm.MANIFEST).read_text())
    assert manifest["sources"][dm.SDXL_REPO] == {
        "revision": "main",
        "commit": add_commit(dm.SDXL_REPO),
        "from": "huggingface.co",
    }
    assert "secret-token" not in json.dumps(manifest)


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN_FILE", raising=False)
    monkeypatch.setattr(dm, "SECRET_TOKEN_FILE", tmp_path / "no-secret")
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert dm.read_token(None) == "from-env"
    secret = tmp_path / "hf_token"
    secret.write_text("from-secret\n")
    monkeypatch.setattr(dm, "SECRET_TOKEN_FILE", secret)
    assert dm.read_token(None) == "from-secret"  # the BuildKit secret wins over the environment
    explicit = tmp_path / "explicit"
    explicit.write_text("from-file")
    assert dm.read_token(str(explicit)) == "from-file"


def test_sources_include_runpod_cached_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runpod_cache = tmp_path / "runpod-volume" / "huggingface-cache" / "hub"
    runpod_cache.mkdir(parents=True)
    monkeypatch.setattr(dm, "RUNPOD_CACHE", runpod_cache)
    sources = dm.make_sources([], tmp_path / "dl", offline=False, token=None)
    assert [type(s).__name__ for s in sources] == ["CacheSource", "CacheSource", "HubSource"]
    assert sources[0].cache_dir == runpod_cache
    offline_sources = dm.make_sources([tmp_path / "vol"], tmp_path / "dl", offline=True, token=None)
    assert [s.label for s in offline_sources] == [
        f"hub cache {tmp_path / 'vol'}",
        f"download cache {tmp_path / 'dl'}",
    ]


def test_cli_rejects_unknown_families(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        dm.parse_args(["--families", "sdxl,flux"])
    assert "families are a comma-separated subset of sdxl, wan" in capsys.readouterr().err
    assert dm.parse_args(["--families", "all"]).families == ["sdxl", "wan"]


def test_streaming_conversion_matches_torch(tmp_path: Path) -> None:
    """Chunked fp32 -> bf16 conversion equals torch's own cast; int tensors are kept."""
    tensors = {
        "big": torch.randn(3, dm.CHUNK // 4 + 5),  # crosses a chunk boundary
        "ids": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0),
    }
    save_file(tensors, tmp_path / "src.safetensors", metadata={"format": "pt"})
    snap = dm.Snapshot("r", "0" * 40, tmp_path, {}, dm.CacheSource(tmp_path))
    step = dm.Step("src.safetensors", "out.safetensors", "bfloat16", "weights")
    entry, verified = dm.transfer(step, snap, tmp_path)
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["big"], tensors["big"].to(torch.bfloat16))
    assert torch.equal(out["ids"], tensors["ids"]) and out["empty"].dtype == torch.bfloat16
    assert entry["size"] == (tmp_path / "out.safetensors").stat().st_size and not verified
