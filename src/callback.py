"""The callback-shaped result the handler returns (the seed's contract)."""

from __future__ import annotations

from typing import Any


def completed(
    job_id: str,
    assets: list[dict[str, Any]],
    *,
    generation_time: float,
    job_type: str,
    reference_mode: str,
) -> dict[str, Any]:
    """A finished job: every asset is already stored."""
    return {
        "job_id": job_id,
        "status": "completed",
        "assets": assets,
        "metadata": {
            "generation_time": round(generation_time, 3),
            "job_type": job_type,
            "reference_mode": reference_mode,
        },
    }


def failed(job_id: str | None, error: str) -> dict[str, Any]:
    """A failed job. ``error`` is a string, so RunPod marks the job FAILED."""
    return {"error": error, "job_id": job_id, "status": "failed"}
