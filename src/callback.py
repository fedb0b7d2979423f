"""The callback-shaped result the handler returns (the original system's contract)."""

from __future__ import annotations

from typing import Any


def completed(
    job_id: str,
    assets: list[dict[str, Any]],
    *,
    generation_time: float,
    job_type: str,
    reference_mode: str,
    ignored_keys: list[str] | None = None,
    enhancement: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A finished job: every asset is already stored. ``ignored_keys``: payload keys nothing read;
    ``enhancement``: the prompt enhancement's keys (both prompts, its time, why it was not used)."""
    metadata: dict[str, Any] = {
        "generation_time": round(generation_time, 3),
        "job_type": job_type,
        "reference_mode": reference_mode,
    }
    if ignored_keys:
        metadata["ignored_keys"] = ignored_keys
    metadata.update(enhancement or {})
    return {"job_id": job_id, "status": "completed", "assets": assets, "metadata": metadata}


def failed(job_id: str | None, error: str) -> dict[str, Any]:
    """A failed job. ``error`` is a string, so RunPod marks the job FAILED."""
    return {"error": error, "job_id": job_id, "status": "failed"}
