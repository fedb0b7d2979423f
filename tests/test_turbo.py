"""``video_turbo`` on the tiny FastWan model: the DMD sampler against an independent implementation
of the publisher's algorithm, its timesteps against the publisher's list, and the job end to end
through the local API and moto (a playable H.264 MP4 with the right frame count, a thumbnail), with
its refusals storing nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch

from src.models import model_dirs
from src.settings import StartupError
from src.wan.tiny import build_tiny_wan
from src.wan.turbo import DMD_TIMESTEPS, FLOW_SHIFT, DmdScheduler
from src.worker import Worker
from tests.conftest import tiny_settings
from tests.test_harness import api_server, s3_env
from tests.test_wan_e2e import SIZE, check_video_asset, wan_job

# FastVideo's FastWan2_1_T2V_480P_Config (fastvideo/configs/pipelines/wan.py), as published.
PUBLISHED_STEPS = [1000, 757, 522]
PUBLISHED_SHIFT = 8.0


def test_the_timesteps_and_shift_are_the_publishers() -> None:
    scheduler = DmdScheduler()
    scheduler.set_timesteps(50)  # whatever is asked: the distilled steps
    assert scheduler.timesteps.tolist() == PUBLISHED_STEPS == list(DMD_TIMESTEPS)
    assert FLOW_SHIFT == PUBLISHED_SHIFT == scheduler.config.shift


def reference_sampler(pipe: Any, prompt: str, frames: int, seed: int) -> torch.Tensor:
    """The published DMD sampling, written independently: numpy's grid, torch's generator in order."""
    grid_t = np.linspace(1, 1000, 1000, dtype=np.float64)[::-1] / 1000
    grid_sigma = PUBLISHED_SHIFT * grid_t / (1 + (PUBLISHED_SHIFT - 1) * grid_t)
    grid_timestep = grid_sigma * 1000

    def sigma(t: float) -> float:
        return float(grid_sigma[np.argmin(np.abs(grid_timestep - t))])

    generator = torch.Generator().manual_seed(seed)
    embeds, _ = pipe.encode_prompt(
        prompt, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu"
    )
    shape = (1, 16, (frames - 1) // 4 + 1, SIZE[1] // 8, SIZE[0] // 8)
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    for i, t in enumerate(PUBLISHED_STEPS):
        flow = pipe.transformer(
            hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=embeds, return_dict=False
        )[0]
        x0 = x.double() - sigma(t) * flow.double()
        if i + 1 < len(PUBLISHED_STEPS):
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
            s = sigma(PUBLISHED_STEPS[i + 1])
            x = ((1 - s) * x0 + s * noise.double()).float()
        else:
            x = x0.float()
    return x


def test_the_sampler_matches_an_independent_implementation(wan_worker: Worker) -> None:
    (family,) = wan_worker.families
    pipe = family.turbo
    generator = torch.Generator().manual_seed(21)
    pipe.scheduler.generator = generator
    with torch.inference_mode():
        got = pipe(
            "a paper boat on a pond",
            width=SIZE[0],
            height=SIZE[1],
            num_frames=9,
            guidance_scale=1.0,
            generator=generator,
            output_type="latent",
        ).frames
        expected = reference_sampler(pipe, "a paper boat on a pond", 9, seed=21)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected, rtol=1e-4, atol=1e-4)
    assert got.float().std() > 0.1  # not a trivially equal pair of zeros


def test_video_turbo_end_to_end_through_the_local_api(s3: Any, s3_endpoint: str, tmp_path: Path) -> None:
    env = {**s3_env(s3_endpoint), "WORKER_MODELS": "wan"}
    job = wan_job("turbo-api", "video_turbo", negative_prompt="blurry")["input"]
    del job["config"]["num_inference_steps"]
    job["config"]["num_frames"] = 17
    refused = {
        "steps": ({**job, "id": "turbo-steps", "config": {**job["config"], "num_inference_steps": 8}},
                  "config.num_inference_steps: video_turbo runs exactly 3 steps"),
        "guidance": ({**job, "id": "turbo-cfg", "config": {**job["config"], "guidance_scale": 5.0}},
                     "config.guidance_scale: video_turbo runs without classifier-free guidance"),
        "reference": ({**job, "id": "turbo-ref", "config": {**job["config"], "image": "https://example.com/a.png"}},
                      "config.image: video_turbo takes no reference images"),
    }  # fmt: skip
    with api_server(env) as base:
        ok = requests.post(f"{base}/runsync", json={"input": job}, timeout=300).json()
        failed = {
            name: requests.post(f"{base}/runsync", json={"input": payload}, timeout=120).json()
            for name, (payload, _) in refused.items()
        }
    assert ok["status"] == "COMPLETED", ok
    (asset,) = ok["output"]["assets"]
    check_video_asset(s3, asset, 17, tmp_path)
    meta = asset["metadata"]
    assert (meta["model"], meta["steps"], meta["negative_prompt_ignored"]) == ("fastwan-1.3b", 3, True)
    for name, (payload, error) in refused.items():
        assert failed[name]["status"] == "FAILED" and failed[name]["error"].startswith(error), failed[name]
        keys = s3.list_objects_v2(Bucket="workspace-temp", Prefix=f"user-2/{payload['id']}/").get("KeyCount")
        assert keys == 0


def test_every_wan_asset_names_its_model(
    wan_worker: Worker, s3: Any, image_server: Any, allow_loopback: None
) -> None:
    t2v = wan_worker.handle(wan_job("model-t2v"))
    assert t2v["assets"][0]["metadata"]["model"] == "wan2.1-t2v-1.3b"
    reference = image_server.add_image("/turbo-model-ref.png", SIZE)
    vace = wan_worker.handle(wan_job("model-vace", metadata={"reference_image_url": reference}))
    assert vace["assets"][0]["metadata"]["model"] == "wan2.1-vace-1.3b"


def test_without_turbo_the_jobs_are_refused_and_missing_weights_say_what_to_bake(
    wan_worker: Worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (family,) = wan_worker.families
    monkeypatch.setattr(family, "turbo", None)
    result = wan_worker.handle(wan_job("no-turbo", "video_turbo"))
    assert result["error"] == "type: video_turbo is off on this worker (WAN_TURBO=false)"
    settings = tiny_settings("http://x", ["wan"], models_dir=tmp_path, model_profile="full")
    for name in ("wan-t2v", "wan-vace"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    from src.wan.family import TURBO_HINT

    with pytest.raises(StartupError) as refused:
        model_dirs(settings, ["wan-t2v", "wan-vace", "wan-turbo"], build_tiny_wan, TURBO_HINT)
    assert f"{tmp_path / 'wan-turbo'} has no model_index.json" in str(refused.value)
    assert str(refused.value).endswith("WAN_TURBO=false starts without it")
