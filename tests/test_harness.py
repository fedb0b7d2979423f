"""handler.py as RunPod runs it: the local test harness, the local API server, start-up errors."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from tests.conftest import BUCKET, REPO, TEST_MODELS_DIR, free_port, list_keys

WORKER_VARS = (
    "BUCKET_",
    "LOCAL_STORAGE_DIR",
    "MODEL",
    "WORKER_MODELS",
    "RUNPOD_",
    "DEVICE",
    "LOG_LEVEL",
    "STORAGE_",
)


def worker_env(**values: str) -> dict[str, str]:
    """The test process's environment without worker settings, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(WORKER_VARS)}
    return {**env, "PYTHONUNBUFFERED": "1", **values}


def tiny_env(**values: str) -> dict[str, str]:
    defaults = {
        "MODEL_PROFILE": "tiny",
        "MODELS_DIR": str(TEST_MODELS_DIR),
        "WORKER_MODELS": "sdxl",
        "DEVICE": "cpu",
    }
    return worker_env(**{**defaults, **values})


def handler(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "handler.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def job(job_id: str, **overrides: Any) -> dict[str, Any]:
    payload = {
        "id": job_id,
        "type": "sdxl_image_fast",
        "prompt": "a small boat",
        "user_id": "harness",
        "config": {"width": 512, "height": 512, "num_inference_steps": 2, "seed": 1},
    }
    payload.update(overrides)
    return {"input": payload}


def test_local_harness_runs_the_test_input(tmp_path: Path) -> None:
    result = handler(
        "--test_input", json.dumps(job("harness-1")), env=tiny_env(LOCAL_STORAGE_DIR=str(tmp_path))
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "harness" / "harness-1" / "0.png").size == (512, 512)
    assert max(Image.open(tmp_path / "harness" / "harness-1" / "0.thumb.webp").size) == 256
    assert "workspace-temp/harness/harness-1/0.png" in result.stdout + result.stderr


def test_repo_test_input_is_a_valid_job(tmp_path: Path) -> None:
    payload = json.loads((REPO / "test_input.json").read_text())["input"]
    result = handler(
        "--test_input", json.dumps({"input": payload}), env=tiny_env(LOCAL_STORAGE_DIR=str(tmp_path))
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / payload["user_id"] / payload["id"]).iterdir())
    count = payload["config"]["num_images"]
    assert files == sorted([f"{i}.png" for i in range(count)] + [f"{i}.thumb.webp" for i in range(count)])


def test_local_harness_exits_nonzero_on_a_bad_job(tmp_path: Path) -> None:
    result = handler(
        "--test_input",
        json.dumps(job("harness-bad", prompt="")),
        env=tiny_env(LOCAL_STORAGE_DIR=str(tmp_path)),
    )
    assert result.returncode == 1
    assert "prompt: is required" in result.stdout + result.stderr
    assert not (tmp_path / "harness").exists()


@contextlib.contextmanager
def api_server(env: dict[str, str]) -> Iterator[str]:
    """``handler.py --rp_serve_api`` on a free port; yields its base URL once it answers."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "handler.py",
            "--rp_serve_api",
            "--rp_api_port",
            str(port),
            "--rp_api_host",
            "127.0.0.1",
        ],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                requests.get(f"{base}/docs", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "API server did not start"
                time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def s3_env(s3_endpoint: str) -> dict[str, str]:
    return tiny_env(
        BUCKET_ENDPOINT_URL=s3_endpoint,
        BUCKET_ACCESS_KEY_ID="testing",
        BUCKET_SECRET_ACCESS_KEY="testing",
        BUCKET_NAME=BUCKET,
    )


def test_runsync_on_the_local_api_server(s3: Any, s3_endpoint: str) -> None:
    with api_server(s3_env(s3_endpoint)) as base:
        ok = requests.post(f"{base}/runsync", json=job("api-1"), timeout=240).json()
        bad = requests.post(f"{base}/runsync", json=job("api-2", type="nope"), timeout=60).json()
    assert ok["status"] == "COMPLETED", ok
    assert ok["output"]["job_id"] == "api-1" and ok["output"]["status"] == "completed"
    assert ok["output"]["assets"][0]["url"] == "workspace-temp/harness/api-1/0.png"
    assert list_keys(s3, "harness/api-1/") == ["harness/api-1/0.png", "harness/api-1/0.thumb.webp"]
    assert bad["status"] == "FAILED" and bad["error"].startswith("type: unknown job type 'nope'")
    assert list_keys(s3, "harness/api-2/") == []


def test_refuses_to_start_without_storage() -> None:
    result = handler(env=worker_env(MODEL_PROFILE="tiny", MODELS_DIR=str(TEST_MODELS_DIR)), timeout=120)
    assert result.returncode == 1
    for name in (
        "BUCKET_ENDPOINT_URL",
        "BUCKET_ACCESS_KEY_ID",
        "BUCKET_SECRET_ACCESS_KEY",
        "LOCAL_STORAGE_DIR",
    ):
        assert name in result.stderr


def test_refuses_to_start_without_full_weights(tmp_path: Path) -> None:
    result = handler(
        env=worker_env(
            MODELS_DIR=str(tmp_path), WORKER_MODELS="sdxl", LOCAL_STORAGE_DIR=str(tmp_path / "out")
        ),
        timeout=120,
    )
    assert result.returncode == 1
    assert f"model weights missing: {tmp_path / 'sdxl'}" in result.stderr
    assert not (tmp_path / "tiny").exists()  # never a silent fallback to tiny models


@pytest.mark.parametrize("value", [" , ", "sdxl,flux"])
def test_refuses_unknown_worker_models(value: str, tmp_path: Path) -> None:
    result = handler(env=worker_env(WORKER_MODELS=value, LOCAL_STORAGE_DIR=str(tmp_path)), timeout=120)
    assert result.returncode == 1 and "WORKER_MODELS" in result.stderr
