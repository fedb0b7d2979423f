"""Wan job rules and VACE conditioning, without running a model."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from PIL import Image

from src.contract import JobError, parse_request
from src.wan.conditioning import vace_inputs
from src.wan.plan import WanPlan, normalise_frames, plan_wan

URL = "https://example.com/ref.png"


def job(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": "job-124",
        "type": "video_fast",
        "prompt": "woman walking in garden",
        "user_id": "user-123",
        "config": {},
        "metadata": {},
    }
    payload.update(overrides)
    return payload


def plan(payload: dict[str, Any]) -> WanPlan:
    return plan_wan(parse_request({"id": "rp", "input": payload}))


def error_of(payload: dict[str, Any]) -> str:
    with pytest.raises(JobError) as caught:
        plan(payload)
    return str(caught.value)


@pytest.mark.parametrize(
    ("job_type", "steps", "guidance", "frames"),
    [
        ("video_fast", 25, 6.5, 81),
        ("video_high", 50, 7.5, 81),
        ("image_fast", 25, 6.5, 1),
        ("image_high", 50, 7.5, 1),
    ],
)
def test_type_defaults(job_type: str, steps: int, guidance: float, frames: int) -> None:
    p = plan(job(type=job_type))
    assert (p.steps, p.guidance_scale, p.num_frames, p.size) == (steps, guidance, frames, (832, 480))
    assert p.is_video == job_type.startswith("video")
    assert p.reference_mode == "none" and p.denoise_strength is None
    assert p.flow_shift == 3.0


def test_config_overrides() -> None:
    p = plan(
        job(config={"num_inference_steps": 8, "guidance_scale": 3.0, "seed": 99, "resolution": "480x832"})
    )
    assert (p.steps, p.guidance_scale, p.seed, p.size) == (8, 3.0, 99, (480, 832))
    assert plan(job(config={"width": 1280, "height": 720})).flow_shift == 5.0


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(1, 1), (5, 5), (16, 17), (17, 17), (18, 17), (80, 81), (81, 81), (83, 85), (161, 161)],
)
def test_frame_counts_follow_the_4k_plus_1_rule(requested: int, expected: int) -> None:
    assert normalise_frames(requested) == expected


def test_length_from_frames_or_duration() -> None:
    assert plan(job(config={"num_frames": 50})).num_frames == 49
    assert plan(job(config={"duration_seconds": 5})).num_frames == 81
    assert plan(job(config={"duration_seconds": 2.5})).num_frames == 41


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"config": {"num_frames": 0}}, "config.num_frames"),
        ({"config": {"num_frames": 2}}, "config.num_frames"),
        ({"config": {"num_frames": 500}}, "config.num_frames"),
        ({"config": {"duration_seconds": 0}}, "config.duration_seconds"),
        ({"config": {"duration_seconds": 60}}, "config.duration_seconds"),
        ({"config": {"num_frames": 81, "duration_seconds": 5}}, "config.duration_seconds"),
        ({"config": {"width": 840, "height": 480}}, "config.width"),
        ({"config": {"width": 832, "height": 488}}, "config.height"),
        ({"config": {"resolution": "832x490"}}, "config.resolution"),
        ({"config": {"width": 1280, "height": 1280}}, "config.width"),
        ({"config": {"width": 128, "height": 128}}, "config.width"),
        ({"prompt": ""}, "prompt"),
        ({"type": "image_fast", "config": {"num_frames": 17}}, "config.num_frames"),
        ({"type": "image_fast", "metadata": {"start_reference_url": URL}}, "metadata.start_reference_url"),
        ({"config": {"image": URL}, "metadata": {"end_reference_url": URL}}, "config.image"),
        ({"metadata": {"start_reference_url": URL, "denoise_strength": -0.1}}, "metadata.denoise_strength"),
    ],
)
def test_bad_payload_names_the_field(overrides: dict[str, Any], field: str) -> None:
    assert error_of(job(**overrides)).startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("config", "metadata", "mode", "fields"),
    [
        ({"image": URL}, {}, "single", {"single": "config.image"}),
        ({}, {"reference_image_url": URL}, "single", {"single": "metadata.reference_image_url"}),
        ({}, {"start_reference_url": URL}, "start", {"start": "metadata.start_reference_url"}),
        ({"first_frame": URL}, {}, "start", {"start": "config.first_frame"}),
        ({}, {"end_reference_url": URL}, "end", {"end": "metadata.end_reference_url"}),
        ({"last_frame": URL}, {}, "end", {"end": "config.last_frame"}),
        (
            {"first_frame": URL},
            {"end_reference_url": URL},
            "both",
            {"start": "config.first_frame", "end": "metadata.end_reference_url"},
        ),
    ],
)
def test_reference_mode_from_the_payload(config: dict, metadata: dict, mode: str, fields: dict) -> None:
    p = plan(job(config=config, metadata=metadata))
    assert p.reference_mode == mode
    assert {m: r.field for m, r in p.references.items()} == fields
    assert p.denoise_strength == 0.15 and p.conditioning_scale == pytest.approx(0.85)


def test_single_reference_works_for_image_jobs() -> None:
    assert plan(job(type="image_high", config={"image": URL})).reference_mode == "single"


def test_legacy_reference_strength(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        p = plan(job(metadata={"start_reference_url": URL, "reference_strength": 0.7}))
    assert p.denoise_strength == pytest.approx(0.3) and p.conditioning_scale == pytest.approx(0.7)
    assert "DEPRECATED" in caplog.text


def _plan_for(mode_metadata: dict[str, Any], frames: int = 9) -> WanPlan:
    return plan(
        job(
            config={"width": 256, "height": 256, "num_frames": frames, "denoise_strength": 0.25},
            metadata=mode_metadata,
        )
    )


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_single_mode_passes_the_reference_image() -> None:
    ref = Image.new("RGB", (300, 200), (10, 200, 30))
    inputs = vace_inputs(_plan_for({"reference_image_url": URL}), {"single": ref})
    assert inputs["reference_images"] == [ref] and "video" not in inputs and "mask" not in inputs
    assert inputs["conditioning_scale"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("metadata", "pinned"),
    [
        ({"start_reference_url": URL}, {0}),
        ({"end_reference_url": URL}, {8}),
        ({"start_reference_url": URL, "end_reference_url": URL}, {0, 8}),
    ],
)
def test_frame_modes_pin_the_right_frames(metadata: dict[str, Any], pinned: set[int]) -> None:
    p = _plan_for(metadata)
    start, end = Image.new("RGB", (400, 200), (255, 0, 0)), Image.new("RGB", (200, 400), (0, 0, 255))
    images = {m: {"start": start, "end": end}[m] for m in p.references}
    inputs = vace_inputs(p, images)
    assert "reference_images" not in inputs
    assert len(inputs["video"]) == len(inputs["mask"]) == 9
    for index, (frame, mask) in enumerate(zip(inputs["video"], inputs["mask"], strict=True)):
        assert frame.size == mask.size == (256, 256)
        if index in pinned:
            assert np.all(_pixels(mask) == 0)
            expected = (255, 0, 0) if index == 0 else (0, 0, 255)
            assert tuple(_pixels(frame)[128, 128]) == expected
        else:
            assert np.all(_pixels(mask) == 255)
            assert np.all(_pixels(frame) == 128)
    assert inputs["conditioning_scale"] == pytest.approx(0.75)
