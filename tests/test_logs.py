"""One structured log line per job stage; no credentials, signed URLs or whole prompts in any log."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from src.joblog import redact
from src.media.storage import S3Storage
from src.worker import Worker
from tests.conftest import ImageServer, tiny_settings

SECRET = "S3cr3t-Do-Not-Log-4242"
SIGNATURE = "X-Amz-Signature=feedfacecafebeef1234"


def job_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "worker.job"]


def test_each_stage_logs_one_structured_line(
    sdxl_worker: Worker,
    s3_endpoint: str,
    image_server: ImageServer,
    allow_loopback: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = tiny_settings(s3_endpoint, ["sdxl"], bucket_secret_access_key=SECRET)
    worker = Worker(settings, S3Storage(settings), sdxl_worker.families)
    url = image_server.add_image("/signed.png", (512, 512)) + f"?X-Amz-Credential=AKIA123&{SIGNATURE}"
    prompt = "a very long prompt " * 40
    with caplog.at_level(logging.DEBUG):
        result = worker.handle(
            {
                "id": "rp",
                "input": {
                    "id": "log-1",
                    "type": "sdxl_image_fast",
                    "prompt": prompt,
                    "user_id": "logs",
                    "config": {"width": 512, "height": 512, "num_inference_steps": 2},
                    "metadata": {"reference_image_url": url, "denoise_strength": 0.5},
                },
            }
        )
        failed = worker.handle(
            {
                "id": "rp",
                "input": {
                    "id": "log-2",
                    "type": "sdxl_image_fast",
                    "prompt": "x",
                    "user_id": "logs",
                    "metadata": {"reference_image_url": "ftp://user:pw@example.com/a.png?" + SIGNATURE},
                },
            }
        )
    assert result["status"] == "completed" and failed["status"] == "failed"
    lines = job_lines(caplog)
    first = [line for line in lines if line["job_id"] == "log-1"]
    assert [line["stage"] for line in first] == ["received", "planned", "generated", "stored", "completed"]
    for line in first:
        assert (
            line["type"] == "sdxl_image_fast"
            and line["stage_s"] >= 0
            and line["elapsed_s"] >= line["stage_s"]
        )
    assert first[-1]["elapsed_s"] == pytest.approx(result["metadata"]["generation_time"], abs=0.01)
    assert len(first[0]["prompt"]) < 120 and first[0]["prompt"].startswith("a very long prompt")
    second = [line for line in lines if line["job_id"] == "log-2"]
    assert [line["stage"] for line in second] == ["received", "planned", "failed"]
    everything = caplog.text + json.dumps(result) + json.dumps(failed)
    for secret in (SECRET, SIGNATURE, "feedfacecafebeef", "user:pw", prompt):
        assert secret not in everything, secret


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "GET https://b.s3.amazonaws.com/k.png?X-Amz-Signature=abc&X-Amz-Expires=60 failed",
            "GET https://b.s3.amazonaws.com/k.png?<redacted> failed",
        ),
        ("refused: ftp://bob:hunter2@host/x", "refused: ftp://***@host/x"),
        ("no url here", "no url here"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected
