"""A fake hub cache of tiny models, laid out like the real one, for the builder's tests.

The fake cache mirrors the real repos' layout (SDXL's fp16 variant files, the fp16-fix VAE repo,
Wan's sharded fp32 UMT5, the VACE repo), with blobs named by sha256 (LFS) or git sha1 and
``refs/main``. Test modules use the fixtures by binding them to module names
(``hub_cache = fake_hub.hub_cache``), which is where pytest finds fixtures.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save

from builder import download_models as dm
from builder.layout import FASTWAN_REPO, PROMPT_REPO, SDXL_REPO, SDXL_VAE_REPO, WAN_T2V_REPO, WAN_VACE_REPO
from builder.sources import CacheSource, repo_folder
from src.models import model_dirs
from src.prompt.tiny import build_tiny_prompt
from src.sdxl.tiny import build_tiny_sdxl
from src.settings import Settings
from src.wan.tiny import build_tiny_wan
from tests.conftest import TEST_MODELS_DIR

LFS_SUFFIXES = (".safetensors", ".model", ".bin")


def git_sha1(data: bytes) -> str:
    """The git blob sha1 of ``data`` (the etag of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def add_commit(repo: str) -> str:
    """The commit ``add_repo`` gives ``repo``."""
    return hashlib.sha1(repo.encode(), usedforsecurity=False).hexdigest()


def add_repo(cache: Path, repo: str, files: dict[str, bytes]) -> str:
    """Write ``files`` into ``cache`` the way huggingface_hub does: blobs, snapshot symlinks, refs/main."""
    storage = cache / repo_folder(repo)
    commit = add_commit(repo)
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
    """Every file under ``root``, by relative path (not the tiny models' own marker files)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def st_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """``tensors`` as a safetensors file."""
    return save(tensors, metadata={"format": "pt"})


SMALL_PROMPT_REPO = "Qwen/Qwen2.5-3B-Instruct"  # another PROMPT_MODEL


def tiny_dirs() -> tuple[Path, Path, Path, Path, Path]:
    """The tiny models conftest's workers use (built once, cached under TEST_MODELS_DIR)."""
    settings = Settings(models_dir=TEST_MODELS_DIR, model_profile="tiny", local_storage_dir=TEST_MODELS_DIR)
    (sdxl,) = model_dirs(settings, ["sdxl"], build_tiny_sdxl)
    t2v, vace, turbo = model_dirs(settings, ["wan-t2v", "wan-vace", "wan-turbo"], build_tiny_wan)
    (prompt,) = model_dirs(settings, ["prompt"], build_tiny_prompt, marker="config.json")
    return sdxl, t2v, vace, turbo, prompt


def build_fake_cache(cache: Path) -> None:
    """The seven repos the builder reads, made from the tiny models."""
    sdxl, t2v, vace, turbo, prompt = tiny_dirs()

    # SDXL base: plain fp32 weights plus the fp16 variant files the builder should pick, an extra
    # single-file checkpoint it must leave alone, and the original VAE it must replace.
    files = read_tree(sdxl)
    for rel in list(files):
        if rel.endswith(".safetensors") and not rel.startswith("vae/"):
            half = {k: v.half() for k, v in load_file(sdxl / rel).items()}
            files[rel.replace(".safetensors", ".fp16.safetensors")] = st_bytes(half)
    files["sd_xl_base_1.0.safetensors"] = b"not to be copied"
    add_repo(cache, SDXL_REPO, files)

    # The fp16-fix VAE repo: config.json + weights at the root (config says force_upcast: true).
    vae_config = json.loads((sdxl / "vae" / "config.json").read_text())
    vae_config.update(force_upcast=True, _name_or_path="madebyollin/sdxl-vae-fp16-fix")
    add_repo(
        cache,
        SDXL_VAE_REPO,
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
    add_repo(cache, WAN_T2V_REPO, files)

    add_repo(cache, WAN_VACE_REPO, read_tree(vace))

    # FastWan: its own transformer and scheduler; text encoder, tokenizer and VAE the same files as T2V's.
    shared = {
        rel: data for rel, data in files.items() if rel.split("/")[0] in ("text_encoder", "tokenizer", "vae")
    }
    own = {
        rel: data
        for rel, data in read_tree(turbo).items()
        if rel.split("/")[0] not in ("text_encoder", "tokenizer", "vae")
    }
    add_repo(cache, FASTWAN_REPO, {**own, **shared})

    # The LLMs: fp32 weights (stored bf16) and a file the builder must leave alone.
    llm = {**read_tree(prompt), "README.md": b"not copied"}
    add_repo(cache, PROMPT_REPO, llm)
    add_repo(cache, SMALL_PROMPT_REPO, llm)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake hub cache (read only: tests that corrupt it work on a copy)."""
    cache = tmp_path_factory.mktemp("hub-cache")
    build_fake_cache(cache)
    return cache


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub, no token."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)


def run_builder(*args: str) -> int:
    """The builder's command line, in process."""
    return dm.main(list(args))


def cli(models: Path, cache: Path, tmp: Path, *extra: str) -> list[str]:
    """Arguments that build both families into ``models`` from ``cache``."""
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


def corrupt_blob(cache: Path, repo: str, rel: str) -> None:
    """Flip the last byte of a cached file's blob."""
    link = cache / repo_folder(repo) / "snapshots" / add_commit(repo) / rel
    blob = link.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))


class FakeApi:
    """``HfApi.model_info(files_metadata=True)`` answered from the fake cache's files."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def model_info(
        self,
        repo: str,
        *,
        revision: str,
        files_metadata: bool,
        token: str | None,
        timeout: float | None = None,
    ) -> Any:
        assert files_metadata and revision == "main"
        snap = CacheSource(self.cache).snapshot(repo, revision)
        siblings = []
        for rel, meta in snap.files.items():
            size = (snap.root / rel).stat().st_size
            lfs = {"sha256": meta.sha256, "size": size} if meta.sha256 else None
            siblings.append(
                type("Sibling", (), dict(rfilename=rel, size=size, blob_id=meta.git_sha1, lfs=lfs))
            )
        return type("Info", (), dict(sha=snap.commit, siblings=siblings))
