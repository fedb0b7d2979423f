"""Storage faults injected for real between the worker and the S3 server: retried, or failed cleanly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from src.media.storage import S3Storage
from src.worker import Worker
from tests.conftest import BUCKET, free_port, list_keys, tiny_settings
from tests.faults import Fault, FaultProxy


@pytest.fixture
def proxy(s3: Any, s3_endpoint: str) -> Iterator[FaultProxy]:
    faulty = FaultProxy(s3_endpoint)
    yield faulty
    faulty.stop()


def worker_via(endpoint: str, sdxl_worker: Worker) -> Worker:
    """The tiny SDXL worker, storing through ``endpoint`` with short timeouts and 3 attempts."""
    settings = tiny_settings(endpoint, ["sdxl"], storage_timeout_s=1.0, storage_max_attempts=3)
    return Worker(settings, S3Storage(settings), sdxl_worker.families)


def job(job_id: str, images: int = 3) -> dict[str, Any]:
    return {
        "id": "rp",
        "input": {
            "id": job_id,
            "type": "sdxl_image_fast",
            "prompt": "a lamp",
            "user_id": "faults",
            "config": {
                "width": 512,
                "height": 512,
                "num_inference_steps": 1,
                "num_images": images,
                "seed": 1,
            },
        },
    }


def expected_keys(job_id: str, images: int) -> list[str]:
    return sorted(f"faults/{job_id}/{i}.{ext}" for i in range(images) for ext in ("png", "thumb.webp"))


def assert_stored(s3: Any, result: dict[str, Any], job_id: str, images: int) -> None:
    assert result["status"] == "completed", result
    assert list_keys(s3, f"faults/{job_id}/") == expected_keys(job_id, images)
    for asset in result["assets"]:
        body = s3.get_object(Bucket=BUCKET, Key=asset["url"].split("/", 1)[1])["Body"].read()
        assert len(body) == asset["metadata"]["file_size_bytes"]


def assert_failed_clean(s3: Any, result: dict[str, Any], job_id: str) -> None:
    assert result["status"] == "failed" and "assets" not in result, result
    assert result["error"].startswith("storage: could not store the assets"), result["error"]
    assert list_keys(s3, f"faults/{job_id}/") == []


def test_transient_503s_are_retried(sdxl_worker: Worker, s3: Any, proxy: FaultProxy) -> None:
    proxy.faults = [Fault("status", status=503, times=2, path_contains="/0.png")]
    result = worker_via(proxy.url, sdxl_worker).handle(job("retry-503"))
    assert_stored(s3, result, "retry-503", 3)
    assert proxy.count("PUT", "retry-503/0.png") == 3  # two 503s, then success


def test_500_then_success_and_slow_answers_are_retried(
    sdxl_worker: Worker, s3: Any, proxy: FaultProxy
) -> None:
    proxy.faults = [
        Fault("status", status=500, times=1, path_contains="/1.png"),
        Fault("delay", seconds=2.5, times=1, path_contains="/2.png"),
    ]  # past the 1 s timeout
    result = worker_via(proxy.url, sdxl_worker).handle(job("retry-slow"))
    assert_stored(s3, result, "retry-slow", 3)
    assert proxy.count("PUT", "retry-slow/1.png") == 2 and proxy.count("PUT", "retry-slow/2.png") == 2


def test_dropped_connections_are_retried(sdxl_worker: Worker, s3: Any, proxy: FaultProxy) -> None:
    proxy.faults = [Fault("close", times=2)]
    result = worker_via(proxy.url, sdxl_worker).handle(job("retry-drop", images=1))
    assert_stored(s3, result, "retry-drop", 1)


def test_persistent_500_fails_and_removes_what_was_stored(
    sdxl_worker: Worker, s3: Any, proxy: FaultProxy
) -> None:
    proxy.faults = [Fault("status", status=500, times=-1, path_contains="/1.png")]
    result = worker_via(proxy.url, sdxl_worker).handle(job("broken-500"))
    assert_failed_clean(s3, result, "broken-500")
    assert proxy.count("PUT", "broken-500/1.png") == 3  # every attempt used
    stored_first = {p for m, p in proxy.seen if m == "PUT" and "/1.png" not in p}
    assert len(stored_first) >= 2 and proxy.count("DELETE", "broken-500/") == len(stored_first)  # all removed


def test_access_denied_is_not_retried(sdxl_worker: Worker, s3: Any, proxy: FaultProxy) -> None:
    proxy.faults = [Fault("status", status=403, times=-1)]
    result = worker_via(proxy.url, sdxl_worker).handle(job("denied", images=1))
    assert_failed_clean(s3, result, "denied")
    puts = [path for method, path in proxy.seen if method == "PUT"]
    assert puts and len(puts) == len(set(puts))  # no object was tried twice


def test_connection_refused_fails_clearly(sdxl_worker: Worker, s3: Any) -> None:
    result = worker_via(f"http://127.0.0.1:{free_port()}", sdxl_worker).handle(job("refused", images=1))
    assert_failed_clean(s3, result, "refused")
    assert "EndpointConnectionError" in result["error"] or "Could not connect" in result["error"]


def test_server_gone_halfway_then_retried_job_leaves_no_strays(
    sdxl_worker: Worker, s3: Any, proxy: FaultProxy
) -> None:
    # Two objects get through, then every request (deletes too) hits a dead connection.
    proxy.faults = [Fault("close", method=None, times=-1, after=2)]
    worker = worker_via(proxy.url, sdxl_worker)
    result = worker.handle(job("gone-halfway"))
    assert result["status"] == "failed" and result["error"].startswith("storage: "), result
    stranded = list_keys(s3, "faults/gone-halfway/")  # which two depends on upload order
    assert len(stranded) == 2 and set(stranded) < set(expected_keys("gone-halfway", 3))
    proxy.faults = []  # the server is back; the platform retries the same job
    assert_stored(s3, worker.handle(job("gone-halfway")), "gone-halfway", 3)
