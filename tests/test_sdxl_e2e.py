"""SDXL jobs end to end: tiny real pipelines, moto S3 over HTTP, every object read back."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from src.worker import Worker
from tests.conftest import BUCKET, ImageServer, list_keys


def run(worker: Worker, payload: dict[str, Any], runpod_id: str = "rp-job") -> dict[str, Any]:
    return worker.handle({"id": runpod_id, "input": payload})


def sdxl_job(job_id: str, **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": job_id,
        "type": "sdxl_image_fast",
        "prompt": "a red fox in the snow",
        "user_id": "user-1",
        "config": {"width": 512, "height": 512, "num_inference_steps": 3, "seed": 1234},
        "metadata": {},
    }
    payload.update(overrides)
    return payload


def get(s3: Any, url: str) -> tuple[bytes, str]:
    bucket, key = url.split("/", 1)
    assert bucket == BUCKET
    obj = s3.get_object(Bucket=bucket, Key=key)
    return obj["Body"].read(), obj["ContentType"]


def check_image_asset(s3: Any, asset: dict[str, Any], size: tuple[int, int]) -> Image.Image:
    """The PNG and its thumbnail exist with the right bytes, types and sizes; return the image."""
    png, png_type = get(s3, asset["url"])
    image = Image.open(io.BytesIO(png))
    assert png_type == "image/png" and image.format == "PNG"
    assert image.size == size
    assert asset["metadata"]["file_size_bytes"] == len(png)
    assert (asset["metadata"]["width"], asset["metadata"]["height"]) == size
    thumb_bytes, thumb_type = get(s3, asset["thumbnail_url"])
    thumb = Image.open(io.BytesIO(thumb_bytes))
    assert thumb_type == "image/webp" and thumb.format == "WEBP"
    assert max(thumb.size) == 256
    assert thumb.size[0] / thumb.size[1] == pytest.approx(size[0] / size[1], rel=0.01)
    return image.convert("RGB")


def test_text_to_image_callback_and_objects(sdxl_worker: Worker, s3: Any) -> None:
    result = run(
        sdxl_worker,
        sdxl_job(
            "t2i-1",
            config={
                "width": 512,
                "height": 768,
                "num_images": 2,
                "seed": 77,
                "num_inference_steps": 3,
                "guidance_scale": 5.0,
            },
        ),
    )
    assert result["status"] == "completed", result
    assert result["job_id"] == "t2i-1"
    assert result["metadata"]["job_type"] == "sdxl_image_fast"
    assert result["metadata"]["reference_mode"] == "none"
    assert result["metadata"]["generation_time"] > 0
    assert [a["url"] for a in result["assets"]] == [
        "workspace-temp/user-1/t2i-1/0.png",
        "workspace-temp/user-1/t2i-1/1.png",
    ]
    assert [a["thumbnail_url"] for a in result["assets"]] == [
        "workspace-temp/user-1/t2i-1/0.thumb.webp",
        "workspace-temp/user-1/t2i-1/1.thumb.webp",
    ]
    for index, asset in enumerate(result["assets"]):
        assert asset["type"] == "image"
        check_image_asset(s3, asset, (512, 768))
        meta = asset["metadata"]
        assert meta["format"] == "png" and meta["asset_index"] == index
        assert (meta["steps"], meta["guidance_scale"], meta["seed"]) == (3, 5.0, 77 + index)
        assert "denoise_strength" not in meta
    assert list_keys(s3, "user-1/t2i-1/") == [
        "user-1/t2i-1/0.png",
        "user-1/t2i-1/0.thumb.webp",
        "user-1/t2i-1/1.png",
        "user-1/t2i-1/1.thumb.webp",
    ]


def test_default_size_is_1024_and_seed_is_reported(sdxl_worker: Worker, s3: Any) -> None:
    result = run(sdxl_worker, sdxl_job("t2i-default", config={"num_inference_steps": 2}))
    assert result["status"] == "completed", result
    check_image_asset(s3, result["assets"][0], (1024, 1024))
    assert isinstance(result["assets"][0]["metadata"]["seed"], int)


def test_same_payload_and_seed_give_the_same_images(sdxl_worker: Worker, s3: Any) -> None:
    config = {"width": 512, "height": 512, "num_images": 2, "seed": 5, "num_inference_steps": 3}
    first = run(sdxl_worker, sdxl_job("same-a", config=config))
    second = run(sdxl_worker, sdxl_job("same-b", config=config))
    other = run(sdxl_worker, sdxl_job("same-c", config={**config, "seed": 6}))
    pixels = [
        [np.asarray(check_image_asset(s3, a, (512, 512))) for a in r["assets"]]
        for r in (first, second, other)
    ]
    assert np.array_equal(pixels[0][0], pixels[1][0]) and np.array_equal(pixels[0][1], pixels[1][1])
    assert not np.array_equal(pixels[0][0], pixels[0][1])  # image i uses seed + i
    assert not np.array_equal(pixels[0][0], pixels[2][0])


def test_img2img_follows_the_reference_aspect(
    sdxl_worker: Worker, s3: Any, image_server: ImageServer, allow_loopback: None
) -> None:
    url = image_server.add_image("/wide.png", (600, 400))
    result = run(
        sdxl_worker,
        sdxl_job(
            "i2i-aspect",
            config={"num_inference_steps": 4, "seed": 3},
            metadata={"reference_image_url": url, "denoise_strength": 0.5},
        ),
    )
    assert result["status"] == "completed", result
    assert result["metadata"]["reference_mode"] == "single"
    meta = result["assets"][0]["metadata"]
    width, height = meta["width"], meta["height"]
    assert width % 8 == 0 and height % 8 == 0
    assert width / height == pytest.approx(1.5, rel=0.02)
    assert width * height == pytest.approx(1024 * 1024, rel=0.03)
    check_image_asset(s3, result["assets"][0], (width, height))
    assert (meta["denoise_strength"], meta["steps"]) == (0.5, 4)


def test_img2img_with_config_size_and_legacy_strength(
    sdxl_worker: Worker,
    s3: Any,
    image_server: ImageServer,
    allow_loopback: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = image_server.add_image("/square.png", (640, 640))
    result = run(
        sdxl_worker,
        sdxl_job(
            "i2i-legacy",
            config={"width": 768, "height": 512, "num_inference_steps": 3},
            metadata={"reference_image_url": url, "reference_strength": 0.85},
        ),
    )
    assert result["status"] == "completed", result
    check_image_asset(s3, result["assets"][0], (768, 512))
    assert result["assets"][0]["metadata"]["denoise_strength"] == pytest.approx(0.15)
    assert "DEPRECATED" in caplog.text


def test_exact_copy_runs_six_steps_promptless(
    sdxl_worker: Worker, s3: Any, image_server: ImageServer, allow_loopback: None
) -> None:
    url = image_server.add_image("/copy.png", (512, 512))
    sent: list[dict[str, Any]] = []
    recorder = Worker(
        sdxl_worker.settings.model_copy(update={"progress_interval_s": 0}),
        sdxl_worker.storage,
        sdxl_worker.families,
        lambda job, update: sent.append(update),
    )
    result = run(
        recorder,
        sdxl_job(
            "exact-1",
            prompt="",
            negative_prompt="ugly",
            config={"guidance_scale": 9, "width": 512, "height": 512},
            metadata={"reference_image_url": url, "denoise_strength": 0.4, "exact_copy_mode": True},
        ),
    )
    assert result["status"] == "completed", result
    meta = result["assets"][0]["metadata"]
    assert (meta["denoise_strength"], meta["guidance_scale"], meta["steps"]) == (0.05, 1.0, 6)
    assert [u["step"] for u in sent] == [1, 2, 3, 4, 5, 6]  # the steps that really ran
    check_image_asset(s3, result["assets"][0], (512, 512))


def test_img2img_shares_every_weight_with_text2img(sdxl_worker: Worker) -> None:
    family = sdxl_worker.families[0]
    # the sampler is built per job; every weight is shared
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert getattr(family.img2img, name) is getattr(family.text2img, name), name


def test_progress_is_throttled(sdxl_worker: Worker) -> None:
    sent: list[dict[str, Any]] = []
    slow = Worker(
        sdxl_worker.settings.model_copy(update={"progress_interval_s": 3600}),
        sdxl_worker.storage,
        sdxl_worker.families,
        lambda job, update: sent.append(update),
    )
    result = run(slow, sdxl_job("progress-1", config={"width": 512, "height": 512, "num_inference_steps": 5}))
    assert result["status"] == "completed"
    assert [u["step"] for u in sent] == [1, 5]  # the first, then nothing until the last


@pytest.mark.parametrize(
    ("job_id", "overrides", "expected"),
    [
        ("bad-prompt", {"prompt": None}, "prompt: "),
        ("bad-type", {"type": "sdxl_image_ultra"}, "type: unknown job type 'sdxl_image_ultra'"),
        (
            "bad-denoise",
            {"metadata": {"reference_image_url": "https://example.com/a.png", "denoise_strength": 1.5}},
            "metadata.denoise_strength: ",
        ),
        ("bad-count", {"config": {"num_images": 0}}, "config.num_images: "),
        ("bad-user", {"user_id": "../../etc"}, "user_id: "),
    ],
)
def test_bad_payloads_fail_clearly_and_store_nothing(
    sdxl_worker: Worker, s3: Any, job_id: str, overrides: dict[str, Any], expected: str
) -> None:
    result = run(sdxl_worker, sdxl_job(job_id, **overrides))
    assert result["status"] == "failed" and result["job_id"] == job_id
    assert isinstance(result["error"], str) and result["error"].startswith(expected), result
    assert "assets" not in result
    assert list_keys(s3, "") == [k for k in list_keys(s3, "") if f"/{job_id}/" not in k]


@pytest.mark.parametrize(
    ("job_id", "make_url", "expected"),
    [
        ("ref-missing", lambda srv: srv.base + "/nothing-here.png", "HTTP 404"),
        (
            "ref-not-image",
            lambda srv: srv.add("/notes.txt", b"hello, not an image", "text/plain"),
            "not a readable image",
        ),
        ("ref-unreachable", lambda srv: "http://127.0.0.1:9/x.png", "could not fetch"),
        ("ref-scheme", lambda srv: "file:///etc/passwd", "refused"),
    ],
)
def test_bad_references_fail_clearly_and_store_nothing(
    sdxl_worker: Worker,
    s3: Any,
    image_server: ImageServer,
    allow_loopback: None,
    job_id: str,
    make_url: Any,
    expected: str,
) -> None:
    result = run(sdxl_worker, sdxl_job(job_id, metadata={"reference_image_url": make_url(image_server)}))
    assert result["status"] == "failed", result
    assert result["error"].startswith("metadata.reference_image_url: ") and expected in result["error"]
    assert list_keys(s3, f"user-1/{job_id}/") == []


@pytest.mark.parametrize("host", ["127.0.0.1", "169.254.169.254", "10.0.0.1"])
def test_private_and_metadata_addresses_are_refused(
    sdxl_worker: Worker, s3: Any, image_server: ImageServer, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)
    url = image_server.add_image("/private.png", (512, 512)).replace("127.0.0.1", host)
    result = run(sdxl_worker, sdxl_job("ref-private", metadata={"reference_image_url": url}))
    assert result["status"] == "failed"
    assert result["error"].startswith("metadata.reference_image_url: refused")
    assert "non-public address" in result["error"]
    assert list_keys(s3, "user-1/ref-private/") == []


def test_images_are_the_pipelines_own_pil_output(sdxl_worker: Worker, s3: Any) -> None:
    """The worker converts to uint8 on the device; the pixels are exactly what output_type="pil" gives."""
    import torch

    config = {"width": 640, "height": 512, "num_images": 2, "seed": 11, "num_inference_steps": 3}
    result = run(sdxl_worker, sdxl_job("pil-equal", config=config))
    assert result["status"] == "completed", result
    stored = [np.asarray(check_image_asset(s3, a, (640, 512))) for a in result["assets"]]
    family = sdxl_worker.families[0]
    with torch.inference_mode():
        expected = family.text2img(
            prompt="a red fox in the snow",
            width=640,
            height=512,
            num_inference_steps=3,
            guidance_scale=result["assets"][0]["metadata"]["guidance_scale"],
            num_images_per_prompt=2,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in (11, 12)],
        ).images
    for got, image in zip(stored, expected, strict=True):
        np.testing.assert_array_equal(got, np.asarray(image))
