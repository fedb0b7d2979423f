"""Where the builder's files come from, from the fake hub cache (tests/fake_hub.py): corrupt cache
files, falling back to the next source, retries with backoff, the hub path (metadata, download,
refetch), the token and the sources the command line picks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from builder import download_models as dm
from builder.build import BuildOptions, build
from builder.errors import BuildError
from builder.layout import PROMPT_REPO, SDXL_REPO, SDXL_VAE_REPO, WAN_T2V_REPO
from builder.manifest import MANIFEST
from builder.sources import CacheSource, HubSource, Snapshot, repo_folder
from tests import fake_hub
from tests.fake_hub import FakeApi, add_commit, cli, corrupt_blob, run_builder

# the fake hub's fixtures, requested by name below
hub_cache, offline = fake_hub.hub_cache, fake_hub.offline


def test_corrupt_cache_file_is_reported(
    hub_cache: Path, tmp_path: Path, offline: None, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(hub_cache, cache, symlinks=True)
    corrupt_blob(cache, WAN_T2V_REPO, "transformer/diffusion_pytorch_model.safetensors")
    assert run_builder(*cli(tmp_path / "models", cache, tmp_path, "--families", "wan")) == 1
    err = capsys.readouterr().err
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers@main: no source could provide it" in err
    assert "corrupt file transformer/diffusion_pytorch_model.safetensors: sha256" in err
    assert not (tmp_path / "models" / "wan-t2v").exists()  # nothing half-built left behind
    assert not list((tmp_path / "models").glob(".staging-*"))


def test_corrupt_cache_falls_back_to_the_next_source(hub_cache: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-cache"
    shutil.copytree(hub_cache, bad, symlinks=True)
    corrupt_blob(bad, SDXL_VAE_REPO, "config.json")  # a git-sha1 (non-LFS) blob
    options = BuildOptions(tmp_path / "models", [CacheSource(bad, "bad"), CacheSource(hub_cache, "good")])
    assert build(["sdxl"], options) == {"sdxl": "built"}
    manifest = json.loads((tmp_path / "models" / "sdxl" / MANIFEST).read_text())
    assert manifest["sources"][SDXL_REPO]["from"] == "bad"  # its files were fine
    assert manifest["sources"][SDXL_VAE_REPO]["from"] == "good"


class FlakySource(CacheSource):
    """A hub cache whose first listing fails like a dropped connection."""

    def __init__(self, cache_dir: Path, failures: int) -> None:
        super().__init__(cache_dir, "flaky")
        self.failures = failures
        self.calls = 0

    def snapshot(self, repo: str, revision: str) -> Snapshot:
        self.calls += 1
        if self.calls <= self.failures:
            raise httpx.ConnectError("connection reset by peer")
        return super().snapshot(repo, revision)


def test_transient_errors_are_retried_with_backoff(hub_cache: Path, tmp_path: Path) -> None:
    source = FlakySource(hub_cache, failures=2)
    sleeps: list[float] = []
    options = BuildOptions(tmp_path / "models", [source], sleep=sleeps.append, retries=3)
    assert build(["sdxl"], options) == {"sdxl": "built"}
    assert sleeps == [2.0, 4.0]  # exponential backoff, then success on the third attempt

    options = BuildOptions(
        tmp_path / "other", [FlakySource(hub_cache, failures=5)], sleep=sleeps.append, retries=3
    )
    with pytest.raises(BuildError, match="flaky: gave up after 3 attempts: connection reset"):
        build(["sdxl"], options)


def test_hub_source_retries_and_refetches_a_corrupt_download(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network path: metadata from the API, snapshot_download into the download cache."""
    downloads = tmp_path / "downloads"
    calls: list[list[str]] = []

    def fake_snapshot_download(
        repo: str,
        *,
        revision: str,
        allow_patterns: list[str],
        cache_dir: Path,
        token: Any,
        etag_timeout: float,
    ):
        assert etag_timeout == source.timeout_s  # a silent server does not hold the build forever
        calls.append(allow_patterns)
        if len(calls) == 1:
            raise httpx.ReadTimeout("read timed out")
        src = hub_cache / repo_folder(repo) / "snapshots" / revision
        dst = Path(cache_dir) / repo_folder(repo) / "snapshots" / revision
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
    source = HubSource(downloads, token="secret-token", api=FakeApi(hub_cache))
    sleeps: list[float] = []
    options = BuildOptions(tmp_path / "models", [source], sleep=sleeps.append)
    assert build(["sdxl"], options) == {"sdxl": "built"}
    # base repo: timeout, corrupt unet (dropped), fresh download; the VAE repo once
    assert len(calls) == 4 and sleeps == [2.0]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in calls[0]
    assert "unet/diffusion_pytorch_model.safetensors" not in calls[0]  # only the fp16 variant is fetched
    manifest = json.loads((tmp_path / "models" / "sdxl" / MANIFEST).read_text())
    assert manifest["sources"][SDXL_REPO] == {
        "revision": "main",
        "commit": add_commit(SDXL_REPO),
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
    assert "families are a comma-separated subset of sdxl, wan, prompt" in capsys.readouterr().err
    assert dm.parse_args(["--families", "all"]).families == ["sdxl", "wan", "prompt"]


def test_a_hub_that_accepts_and_never_answers_fails_the_build_naming_the_repo(tmp_path: Path) -> None:
    """Each request times out; the retries are bounded; the error names the repository."""
    import socket
    import time

    from huggingface_hub import HfApi

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections are accepted by the kernel and never read
    try:
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        source = HubSource(tmp_path / "dl", token=None, api=HfApi(endpoint=endpoint), timeout_s=0.5)
        slept: list[float] = []
        options = BuildOptions(
            models_dir=tmp_path / "models", sources=[source], retries=3, sleep=slept.append
        )
        started = time.monotonic()
        with pytest.raises(BuildError) as failed:
            build(["prompt"], options)
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    message = str(failed.value)
    assert message.startswith(
        f"{PROMPT_REPO}@main: no source could provide it: huggingface.co: gave up after 3 attempts"
    )
    assert "timed out" in message.lower() and len(slept) == 2
    assert elapsed < 20  # 3 attempts of about 0.5 s each (the backoff sleeps are recorded, not slept)
