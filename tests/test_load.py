"""Hundreds of jobs in a row hold memory, files and handles steady; concurrent API requests never mix."""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from src.worker import Worker
from tests.conftest import ImageServer, list_keys
from tests.test_harness import api_server, job, s3_env

JOBS = 300
WARM_UP_JOBS = 50
RSS_BOUND_MB = 40  # growth allowed between the end of warm-up and the last job


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def temp_entries() -> set[str]:
    return set(os.listdir(tempfile.gettempdir()))


def payload(index: int, reference: str) -> dict[str, Any]:
    base = {"id": f"load-{index}", "prompt": f"job number {index}", "user_id": "load"}
    if index % 10 == 9:
        return {
            **base,
            "type": "video_fast",
            "config": {"width": 256, "height": 256, "num_frames": 5, "num_inference_steps": 1, "seed": index},
        }
    config = {"width": 512, "height": 512, "num_inference_steps": 1, "seed": index}
    if index % 2:
        return {
            **base,
            "type": "sdxl_image_fast",
            "config": config,
            "metadata": {"reference_image_url": reference, "denoise_strength": 0.6},
        }
    return {**base, "type": "sdxl_image_high", "config": config}


def test_hundreds_of_jobs_in_a_row(
    both_worker: Worker, s3: Any, image_server: ImageServer, allow_loopback: None, record_property: Any
) -> None:
    reference = image_server.add_image("/load.png", (512, 512))
    samples: dict[int, tuple[float, int, set[str]]] = {}
    for index in range(JOBS):
        result = both_worker.handle({"id": "rp", "input": payload(index, reference)})
        assert result["status"] == "completed", result
        if index + 1 in (WARM_UP_JOBS, JOBS // 2, JOBS):
            samples[index + 1] = (rss_mb(), open_fds(), temp_entries())
    warm_rss, warm_fds, warm_tmp = samples[WARM_UP_JOBS]
    mid_rss = samples[JOBS // 2][0]
    end_rss, end_fds, end_tmp = samples[JOBS]
    record_property("rss_mb", {"after_warm_up": warm_rss, "middle": mid_rss, "end": end_rss})
    print(
        f"RSS after {WARM_UP_JOBS} jobs {warm_rss:.0f} MB, after {JOBS // 2} {mid_rss:.0f} MB, "
        f"after {JOBS} {end_rss:.0f} MB; fds {warm_fds} -> {end_fds}"
    )
    assert end_rss - warm_rss < RSS_BOUND_MB
    assert end_fds <= warm_fds
    assert end_tmp <= warm_tmp  # no temporary file or folder left behind
    keys = list_keys(s3, "load/")
    for index in range(JOBS):
        ext = "mp4" if index % 10 == 9 else "png"
        assert f"load/load-{index}/0.{ext}" in keys and f"load/load-{index}/0.thumb.webp" in keys
    assert len(keys) == 2 * JOBS


def test_concurrent_api_requests_are_served_and_never_mixed(s3: Any, s3_endpoint: str) -> None:
    requests_to_send = {f"conc-{i}": 1 + i % 2 for i in range(8)}

    def send(base: str, job_id: str, images: int) -> dict[str, Any]:
        body = job(job_id)
        body["input"]["config"]["num_images"] = images
        return requests.post(f"{base}/runsync", json=body, timeout=300).json()

    with api_server(s3_env(s3_endpoint)) as base, ThreadPoolExecutor(max_workers=8) as pool:
        futures = {job_id: pool.submit(send, base, job_id, n) for job_id, n in requests_to_send.items()}
        answers = {job_id: future.result() for job_id, future in futures.items()}
    for job_id, answer in answers.items():
        assert answer["status"] == "COMPLETED", answer  # served (the SDK queues them one by one)
        output = answer["output"]
        assert output["job_id"] == job_id and len(output["assets"]) == requests_to_send[job_id]
        for asset in output["assets"]:
            assert f"/harness/{job_id}/" in asset["url"] and f"/harness/{job_id}/" in asset["thumbnail_url"]
        expected = sorted(
            f"harness/{job_id}/{i}.{ext}"
            for i in range(requests_to_send[job_id])
            for ext in ("png", "thumb.webp")
        )
        assert list_keys(s3, f"harness/{job_id}/") == expected
