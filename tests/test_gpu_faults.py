"""GPU faults raised from inside the real pipelines: a clear error and a fresh worker; bad input keeps it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from runpod.serverless.modules.rp_job import run_job

from src.worker import Worker
from tests.conftest import list_keys
from tests.test_harness import handler, worker_env


def job(job_id: str, job_type: str = "sdxl_image_fast") -> dict[str, Any]:
    config: dict[str, Any] = {"width": 512, "height": 512, "num_inference_steps": 1}
    if job_type.startswith("video"):
        config = {"width": 256, "height": 256, "num_frames": 5, "num_inference_steps": 1}
    return {
        "id": "rp",
        "input": {"id": job_id, "type": job_type, "prompt": "x", "user_id": "gpu", "config": config},
    }


FAULTS = {
    "oom": (
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        "gpu: GPU out of memory",
    ),
    "illegal-access": (
        torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
        "gpu: GPU CUDA error",
    ),
    "cublas": (
        RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"),
        "gpu: GPU CUDA error",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("family_index", [0, 1], ids=["sdxl", "wan"])
def test_gpu_faults_ask_for_a_fresh_worker(
    both_worker: Worker, s3: Any, monkeypatch: pytest.MonkeyPatch, fault: str, family_index: int
) -> None:
    error, expected = FAULTS[fault]
    family = both_worker.families[family_index]
    model = family.text2img.unet if family.name == "sdxl" else family.text2video.transformer

    def broken_forward(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(model, "forward", broken_forward)
    job_id = f"gpu-{fault}-{family.name}"
    job_type = "sdxl_image_fast" if family.name == "sdxl" else "video_fast"
    result = both_worker.handle(job(job_id, job_type))
    assert result["status"] == "failed" and result["refresh_worker"] is True
    assert result["error"].startswith(expected), result["error"]
    assert list_keys(s3, f"gpu/{job_id}/") == []
    # What RunPod receives: the error, and stopPod so the worker is replaced.
    sent = asyncio.run(run_job(both_worker.handle, job(job_id + "-sdk", job_type)))
    assert sent["stopPod"] is True and sent["error"].startswith(expected)
    assert list_keys(s3, f"gpu/{job_id}-sdk/") == []


def test_bad_input_and_ordinary_errors_keep_the_worker(
    both_worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = asyncio.run(run_job(both_worker.handle, {"id": "rp", "input": {"type": "sdxl_image_fast"}}))
    assert "stopPod" not in bad and bad["error"].startswith("user_id: ")
    unet = both_worker.families[0].text2img.unet

    def broken_forward(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("shapes do not match")

    monkeypatch.setattr(unet, "forward", broken_forward)
    result = both_worker.handle(job("ordinary-error"))
    assert result == {
        "error": "generation: ValueError: shapes do not match",
        "job_id": "ordinary-error",
        "status": "failed",
    }
    monkeypatch.undo()
    assert both_worker.handle(job("after-errors"))["status"] == "completed"


def test_unwritable_local_storage_dir_fails_fast(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = handler(
        env=worker_env(MODEL_PROFILE="tiny", LOCAL_STORAGE_DIR=str(blocker / "out")), timeout=120
    )
    assert result.returncode == 1
    assert f"LOCAL_STORAGE_DIR {blocker / 'out'} is not writable" in result.stderr
    assert result.stderr.count("worker cannot start") == 1 and "Traceback" not in result.stderr
