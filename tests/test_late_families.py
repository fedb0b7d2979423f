"""READY_AFTER: the worker is ready with the first family of WORKER_MODELS and loads the others
behind it (tiny models, real start_worker, moto). The later family's load is held on an event, so
what a job does while it loads is seen without timing anything."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from src.sdxl.family import SdxlFamily
from src.settings import Settings
from src.wan.family import WanFamily
from src.worker import Worker, start_worker
from tests.conftest import tiny_settings
from tests.test_enhance import keys_under, small_job, stored_object
from tests.test_harness import job


def sdxl_job(job_id: str, **config: Any) -> dict[str, Any]:
    """A one-step 512x512 SDXL job stored under user-2 (as the Wan jobs here)."""
    config = {"width": 512, "height": 512, "num_inference_steps": 1, "seed": 3, **config}
    return job(job_id, user_id="user-2", prompt="a red kite", config=config)


class Held:
    """WanFamily.load held until ``release`` (or failing with ``error``); its warm-up records
    whether the worker's job lock was held around it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, error: Exception | None = None) -> None:
        self.started = threading.Event()
        self.released = threading.Event()
        self.warm_ups_under_lock: list[bool] = []
        self.worker: Worker | None = None
        load, warm_up = WanFamily.load.__func__, WanFamily.warm_up  # type: ignore[attr-defined]

        def held_load(cls: type[WanFamily], settings: Settings) -> WanFamily:
            self.started.set()
            assert self.released.wait(120)
            if error is not None:
                raise error
            return load(cls, settings)

        def recorded_warm_up(family: WanFamily, phases: Any) -> None:
            assert self.worker is not None
            self.warm_ups_under_lock.append(self.worker.job_lock.locked())
            warm_up(family, phases)

        monkeypatch.setattr(WanFamily, "load", classmethod(held_load))
        monkeypatch.setattr(WanFamily, "warm_up", recorded_warm_up)

    def start(self, settings: Settings) -> Worker:
        self.worker = start_worker(settings)
        return self.worker


def in_thread(worker: Worker, job: dict[str, Any]) -> tuple[threading.Thread, list[dict[str, Any]]]:
    results: list[dict[str, Any]] = []
    thread = threading.Thread(target=lambda: results.append(worker.handle(job)), daemon=True)
    thread.start()
    return thread, results


@pytest.fixture
def late_settings(s3: Any, s3_endpoint: str) -> Iterator[Settings]:
    yield tiny_settings(s3_endpoint, ["sdxl", "wan", "prompt"], enhance_max_new_tokens=8)


def test_ready_with_the_first_family_while_the_others_load(
    s3: Any, late_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = Held(monkeypatch)
    worker = held.start(late_settings)
    assert [family.name for family in worker.families] == ["sdxl"]  # ready: Wan not loaded yet
    assert worker.late is not None and held.started.wait(60)

    video, video_result = in_thread(worker, small_job("late-video", "video_fast"))
    enhanced, enhanced_result = in_thread(worker, sdxl_job("late-enhanced", enhance_prompt=True))
    result = worker.handle(sdxl_job("late-image"))  # served while Wan loads
    assert result["status"] == "completed", result
    body, content_type = stored_object(s3, result["assets"][0]["url"])
    assert content_type == "image/png" and body.startswith(b"\x89PNG")
    video.join(1)
    enhanced.join(0.1)
    assert video.is_alive() and enhanced.is_alive()  # waiting for Wan, and for the LLM behind it
    assert keys_under(s3, "late-video") == 0

    held.released.set()
    video.join(300)
    enhanced.join(300)
    assert worker.late.wait(300)
    assert video_result[0]["status"] == "completed", video_result
    assert stored_object(s3, video_result[0]["assets"][0]["url"])[1] == "video/mp4"
    assert enhanced_result[0]["status"] == "completed", enhanced_result
    assert enhanced_result[0]["assets"][0]["metadata"]["prompt_enhanced"] is True
    assert [family.name for family in worker.families] == ["sdxl", "wan", "prompt"]
    assert held.warm_ups_under_lock == [True]  # never beside a job
    ready_after = worker.startup["ready_after_s"]
    assert set(ready_after) == {"wan", "prompt"} and 0 < ready_after["wan"] <= ready_after["prompt"]
    for name in ("wan", "prompt"):
        assert f"load_{name}_s" in worker.startup and f"warm_up_{name}_s" in worker.startup
        assert name in worker.startup["resident_gib"]


def test_a_family_that_fails_to_load_fails_its_jobs_and_asks_for_a_new_worker(
    s3: Any, late_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = Held(monkeypatch, error=OSError("No space left on device"))
    worker = held.start(late_settings.model_copy(update={"worker_models": ["sdxl", "wan"]}))
    video, video_result = in_thread(worker, small_job("failed-video", "video_fast"))
    held.released.set()
    video.join(120)
    assert worker.late is not None and worker.late.wait(120)
    assert video_result == [
        {
            "job_id": "failed-video",
            "status": "failed",
            "error": "the wan family failed to load on this worker (OSError: No space left on device)",
            "refresh_worker": True,
        }
    ]
    assert keys_under(s3, "failed-video") == 0
    assert worker.handle(sdxl_job("after-failure"))["status"] == "completed"  # SDXL still serves


def test_ready_after_all_loads_every_family_first(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    for cls in (SdxlFamily, WanFamily):
        original = cls.load.__func__  # type: ignore[attr-defined]
        monkeypatch.setattr(
            cls, "load", classmethod(lambda c, s, _o=original: loaded.append(c.name) or _o(c, s))
        )
    worker = start_worker(tiny_settings(s3_endpoint, ["wan", "sdxl"], ready_after="all"))
    assert worker.late is None and loaded == ["wan", "sdxl"]
    assert [family.name for family in worker.families] == ["wan", "sdxl"]
