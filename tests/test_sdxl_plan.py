"""The job contract and every SDXL mode rule of the seed, without running a model."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from src.contract import JobError, parse_request
from src.sdxl.plan import SdxlPlan, img2img_schedule, plan_sdxl

REF = "https://example.com/reference.jpg"


def plan(payload: dict[str, Any], runpod_id: str = "rp-1") -> SdxlPlan:
    return plan_sdxl(parse_request({"id": runpod_id, "input": payload}))


def job(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": "job-123",
        "type": "sdxl_image_high",
        "prompt": "beautiful woman in garden",
        "user_id": "user-123",
        "config": {},
        "metadata": {},
    }
    payload.update(overrides)
    return payload


def error_of(payload: dict[str, Any]) -> str:
    with pytest.raises(JobError) as caught:
        plan(payload)
    return str(caught.value)


def test_type_defaults() -> None:
    fast = plan(job(type="sdxl_image_fast"))
    high = plan(job())
    assert (fast.steps, fast.guidance_scale) == (15, 6.0)
    assert (high.steps, high.guidance_scale) == (25, 7.5)
    assert high.size == (1024, 1024)
    assert len(high.seeds) == 1
    assert high.reference_url is None and high.denoise_strength is None


def test_config_overrides() -> None:
    p = plan(
        job(
            config={
                "num_inference_steps": 30,
                "guidance_scale": 4.5,
                "num_images": 3,
                "seed": 7,
                "width": 768,
                "height": 1344,
            }
        )
    )
    assert (p.steps, p.guidance_scale, p.size, p.seeds) == (30, 4.5, (768, 1344), [7, 8, 9])
    assert plan(job(config={"resolution": "1216x832"})).size == (1216, 832)


def test_seed_is_picked_and_consecutive_without_config_seed() -> None:
    p = plan(job(config={"num_images": 4}))
    assert p.seeds == list(range(p.seeds[0], p.seeds[0] + 4))


def test_platform_id_wins_and_runpod_id_is_the_fallback() -> None:
    assert parse_request({"id": "rp-1", "input": job()}).id == "job-123"
    payload = job()
    del payload["id"]
    assert parse_request({"id": "rp-1", "input": payload}).id == "rp-1"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"config": {"num_images": 0}}, "config.num_images"),
        ({"config": {"num_images": 9}}, "config.num_images"),
        ({"config": {"width": 1020, "height": 1024}}, "config.width"),
        ({"config": {"width": 1024, "height": 4096}}, "config.height"),
        ({"config": {"width": 504, "height": 1024}}, "config.width"),
        ({"config": {"width": 1024}}, "config.height"),
        ({"config": {"resolution": "1024x1020"}}, "config.resolution"),
        ({"config": {"resolution": "big"}}, "config.resolution"),
        ({"config": {"resolution": "1024x1024", "width": 1024}}, "config.resolution"),
        ({"config": {"num_inference_steps": 0}}, "config.num_inference_steps"),
        ({"config": {"guidance_scale": float("nan")}}, "config.guidance_scale"),
        ({"config": {"seed": -1}}, "config.seed"),
        ({"config": "steps=3"}, "config"),
        ({"metadata": {"reference_image_url": REF, "denoise_strength": 1.5}}, "metadata.denoise_strength"),
        ({"metadata": {"exact_copy_mode": True}}, "metadata.exact_copy_mode"),
        ({"user_id": "../etc"}, "user_id"),
        ({"user_id": "a/b"}, "user_id"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "ü"}, "user_id"),
        ({"user_id": "x" * 129}, "user_id"),
        ({"id": "job/1"}, "id"),
        ({"id": "-job"}, "id"),
    ],
)
def test_bad_payload_names_the_field(overrides: dict[str, Any], field: str) -> None:
    assert error_of(job(**overrides)).startswith(f"{field}: ")


def test_ids_in_storage_keys_accept_the_documented_alphabet() -> None:
    p = parse_request({"id": "x", "input": job(id="Job_1-a", user_id="U" + "x" * 127)})
    assert p.id == "Job_1-a" and len(p.user_id) == 128


def test_reference_modify_mode_uses_values_as_provided() -> None:
    p = plan(
        job(
            config={"num_inference_steps": 30, "guidance_scale": 9.0},
            metadata={"reference_image_url": REF, "denoise_strength": 0.7},
        )
    )
    assert (p.denoise_strength, p.guidance_scale, p.steps, p.exact_copy) == (0.7, 9.0, 30, False)
    assert p.size is None  # follows the reference's aspect


def test_denoise_from_config_when_metadata_has_none() -> None:
    p = plan(job(config={"denoise_strength": 0.3}, metadata={"reference_image_url": REF}))
    assert p.denoise_strength == 0.3


def test_legacy_reference_strength_converts_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        p = plan(job(metadata={"reference_image_url": REF, "reference_strength": 0.85}))
    assert p.denoise_strength == pytest.approx(0.15)
    assert "DEPRECATED" in caplog.text and "reference_strength" in caplog.text


def test_denoise_defaults_to_one_minus_the_legacy_default() -> None:
    assert plan(job(metadata={"reference_image_url": REF})).denoise_strength == 0.5


def test_exact_copy_mode_follows_the_seed() -> None:
    p = plan(
        job(
            prompt=None,
            negative_prompt="ugly",
            config={"num_inference_steps": 40, "guidance_scale": 9.0},
            metadata={"reference_image_url": REF, "denoise_strength": 0.7, "exact_copy_mode": True},
        )
    )
    assert p.denoise_strength == 0.05
    assert p.guidance_scale == 1.0
    assert p.negative_prompt is None
    assert p.prompt == ""
    assert 6 <= p.steps <= 10 and p.steps == 6  # min(max(6, int(0.05 * 100)), 10)
    assert p.exact_copy


def test_exact_copy_keeps_a_lower_denoise() -> None:
    p = plan(job(metadata={"reference_image_url": REF, "denoise_strength": 0.02, "exact_copy_mode": True}))
    assert p.denoise_strength == 0.02 and p.steps == 6


SCHEDULE_CASES = [
    (steps, strength)
    for steps in (1, 6, 10, 15, 25, 50)
    for strength in (0.01, 0.02, 0.05, 0.15, 0.3, 0.33, 0.5, 0.7, 0.99, 1.0)
    if steps <= int(1000 * strength)  # the 1000-step schedule's limit at this strength
]


@pytest.mark.parametrize(("steps", "strength"), SCHEDULE_CASES)
def test_img2img_schedule_runs_exactly_the_intended_steps(steps: int, strength: float) -> None:
    length = img2img_schedule(steps, strength)
    assert int(length * strength) == steps  # what diffusers runs
    assert length <= 1000


def test_steps_never_zero_even_at_zero_denoise() -> None:
    p = plan(job(metadata={"reference_image_url": REF, "denoise_strength": 0.0}))
    assert p.denoise_strength == 0.01 and p.steps == 10
    assert int(p.schedule_steps * p.denoise_strength) == p.steps


def test_text_to_image_schedule_is_the_step_count() -> None:
    assert plan(job(config={"num_inference_steps": 12})).schedule_steps == 12
