"""Wan jobs end to end: tiny real T2V and VACE pipelines, real ffmpeg, moto S3, objects read back."""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import pytest
from diffusers import WanPipeline, WanVACEPipeline
from PIL import Image

from src.media.images import fit_cover
from src.worker import Worker
from tests.conftest import BUCKET, ImageServer, list_keys

SIZE = (256, 256)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    """Records the keyword arguments each real pipeline is called with (and still runs it)."""
    recorded: dict[str, list[dict[str, Any]]] = {"t2v": [], "vace": []}
    for name, cls in (("t2v", WanPipeline), ("vace", WanVACEPipeline)):
        real = cls.__call__

        def spy(self: Any, *args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            recorded[_name].append(kwargs)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)
    return recorded


def wan_job(job_id: str, job_type: str = "video_fast", **overrides: Any) -> dict[str, Any]:
    config = {"width": SIZE[0], "height": SIZE[1], "num_inference_steps": 2, "seed": 11}
    if job_type.startswith("video"):
        config["num_frames"] = 9
    payload: dict[str, Any] = {
        "id": job_id,
        "type": job_type,
        "prompt": "a paper boat on a pond",
        "user_id": "user-2",
        "config": config,
        "metadata": {},
    }
    payload.update(overrides)
    return {"id": "rp-" + job_id, "input": payload}


def read(s3: Any, url: str) -> tuple[bytes, str]:
    bucket, key = url.split("/", 1)
    assert bucket == BUCKET
    obj = s3.get_object(Bucket=bucket, Key=key)
    return obj["Body"].read(), obj["ContentType"]


def top_level_boxes(mp4: bytes) -> list[str]:
    """The MP4's top-level box types, in file order."""
    boxes, offset = [], 0
    while offset + 8 <= len(mp4):
        size, kind = struct.unpack(">I4s", mp4[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", mp4[offset + 8 : offset + 16])[0]
        boxes.append(kind.decode("latin-1"))
        if size < 8:
            break
        offset += size
    return boxes


def probe(path: Path) -> str:
    """What the bundled ffmpeg says about the file's streams."""
    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True
    )
    return result.stderr


def decoded_frames(path: Path) -> list[np.ndarray]:
    """Every frame, decoded by the bundled ffmpeg (an independent decoder from OpenCV's)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    width, height = meta["size"]
    return [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]


def check_video_asset(s3: Any, asset: dict[str, Any], frames: int, tmp_path: Path) -> list[np.ndarray]:
    mp4, content_type = read(s3, asset["url"])
    assert content_type == "video/mp4" and asset["type"] == "video"
    meta = asset["metadata"]
    assert meta["file_size_bytes"] == len(mp4) and meta["format"] == "mp4"
    assert (meta["width"], meta["height"], meta["num_frames"], meta["fps"]) == (*SIZE, frames, 16)
    assert meta["duration_seconds"] == pytest.approx(frames / 16)
    boxes = top_level_boxes(mp4)
    assert boxes.index("moov") < boxes.index("mdat")  # +faststart: plays while downloading
    path = tmp_path / "video.mp4"
    path.write_bytes(mp4)
    info = probe(path)
    assert "Video: h264" in info and "yuv420p" in info and f"{SIZE[0]}x{SIZE[1]}" in info and "16 fps" in info
    decoded = decoded_frames(path)
    assert len(decoded) == frames
    thumb_bytes, thumb_type = read(s3, asset["thumbnail_url"])
    thumb = Image.open(io.BytesIO(thumb_bytes))
    assert thumb_type == "image/webp" and thumb.format == "WEBP" and thumb.size == (256, 256)

    def distance(frame: np.ndarray) -> float:
        small = np.asarray(Image.fromarray(frame).resize(thumb.size, Image.Resampling.LANCZOS), np.float32)
        return float(np.abs(small - np.asarray(thumb.convert("RGB"), np.float32)).mean())

    assert distance(decoded[0]) < 6.0  # the first frame, within encoding tolerance
    assert distance(decoded[0]) < distance(decoded[-1])
    return decoded


@pytest.mark.parametrize("job_type", ["video_fast", "video_high"])
def test_text_to_video(wan_worker: Worker, s3: Any, tmp_path: Path, calls: dict, job_type: str) -> None:
    job_id = f"t2v-{job_type}"
    result = wan_worker.handle(
        wan_job(
            job_id,
            job_type,
            config={
                "resolution": "256x256",
                "num_frames": 10,
                "num_inference_steps": 2,
                "seed": 5,
                "guidance_scale": 5.0,
            },
        )
    )
    assert result["status"] == "completed", result
    assert result["metadata"]["job_type"] == job_type and result["metadata"]["reference_mode"] == "none"
    assert len(result["assets"]) == 1
    asset = result["assets"][0]
    assert asset["url"] == f"workspace-temp/user-2/{job_id}/0.mp4"
    assert asset["thumbnail_url"] == f"workspace-temp/user-2/{job_id}/0.thumb.webp"
    check_video_asset(s3, asset, 9, tmp_path)  # 10 frames normalised to 4k+1
    assert asset["metadata"]["generation_seed"] == 5 and "denoise_strength" not in asset["metadata"]
    assert list_keys(s3, f"user-2/{job_id}/") == [f"user-2/{job_id}/0.mp4", f"user-2/{job_id}/0.thumb.webp"]
    assert len(calls["t2v"]) == 1 and calls["vace"] == []  # text-only jobs use the T2V model
    assert calls["t2v"][0]["guidance_scale"] == 5.0 and calls["t2v"][0]["num_frames"] == 9


@pytest.mark.parametrize("job_type", ["image_fast", "image_high"])
def test_text_to_image(wan_worker: Worker, s3: Any, job_type: str) -> None:
    result = wan_worker.handle(
        wan_job(
            f"t2i-{job_type}",
            job_type,
            config={"width": 320, "height": 256, "num_inference_steps": 2, "seed": 8},
        )
    )
    assert result["status"] == "completed", result
    asset = result["assets"][0]
    assert asset["type"] == "image" and asset["url"].endswith(f"/t2i-{job_type}/0.png")
    png, content_type = read(s3, asset["url"])
    assert content_type == "image/png" and Image.open(io.BytesIO(png)).size == (320, 256)
    thumb, thumb_type = read(s3, asset["thumbnail_url"])
    assert thumb_type == "image/webp" and Image.open(io.BytesIO(thumb)).size == (256, 205)
    meta = asset["metadata"]
    assert (meta["width"], meta["height"], meta["format"], meta["file_size_bytes"]) == (
        320,
        256,
        "png",
        len(png),
    )
    steps = 2
    assert (meta["steps"], meta["generation_seed"], meta["seed"]) == (steps, 8, 8)


def test_same_seed_same_video_and_seed_reported(wan_worker: Worker, s3: Any) -> None:
    first = wan_worker.handle(wan_job("seed-a", "image_fast"))
    second = wan_worker.handle(wan_job("seed-b", "image_fast"))
    unseeded = wan_worker.handle(
        wan_job("seed-c", "image_fast", config={"width": 256, "height": 256, "num_inference_steps": 2})
    )
    a, b = (Image.open(io.BytesIO(read(s3, r["assets"][0]["url"])[0])) for r in (first, second))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(unseeded["assets"][0]["metadata"]["generation_seed"], int)


def test_vace_shares_encoder_tokenizer_and_vae(wan_worker: Worker) -> None:
    family = wan_worker.families[0]
    for name in ("text_encoder", "tokenizer", "vae"):
        assert getattr(family.vace, name) is getattr(family.text2video, name), name
    assert family.vace.transformer is not family.text2video.transformer


MODES = {
    "single": ({"image": "/single.png"}, {}),
    "start": ({}, {"start_reference_url": "/start.png"}),
    "end": ({"last_frame": "/end.png"}, {}),
    "both": ({}, {"start_reference_url": "/start.png", "end_reference_url": "/end.png"}),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_reference_modes_reach_vace(
    wan_worker: Worker,
    s3: Any,
    image_server: ImageServer,
    allow_loopback: None,
    tmp_path: Path,
    calls: dict,
    mode: str,
) -> None:
    colors = {"/single.png": (20, 200, 20), "/start.png": (220, 20, 20), "/end.png": (20, 20, 220)}
    urls = {path: image_server.add_image(path, (320, 200), color) for path, color in colors.items()}
    config_refs, metadata_refs = MODES[mode]
    config = {
        "width": 256,
        "height": 256,
        "num_frames": 9,
        "num_inference_steps": 2,
        "seed": 4,
        **{k: urls[v] for k, v in config_refs.items()},
    }
    metadata = {"denoise_strength": 0.4, **{k: urls[v] for k, v in metadata_refs.items()}}
    result = wan_worker.handle(wan_job(f"mode-{mode}", config=config, metadata=metadata))
    assert result["status"] == "completed", result
    assert result["metadata"]["reference_mode"] == mode
    asset = result["assets"][0]
    assert asset["metadata"]["denoise_strength"] == 0.4
    check_video_asset(s3, asset, 9, tmp_path)
    assert calls["t2v"] == [] and len(calls["vace"]) == 1
    kwargs = calls["vace"][0]
    assert kwargs["conditioning_scale"] == pytest.approx(0.6)  # 1 - denoise_strength
    served = {path: Image.open(io.BytesIO(image_server.bodies[path][0])).convert("RGB") for path in colors}
    if mode == "single":
        (reference,) = kwargs["reference_images"]
        assert np.array_equal(np.asarray(reference), np.asarray(served["/single.png"]))
        assert "mask" not in kwargs and "video" not in kwargs
        return
    pinned = {"start": [0], "end": [8], "both": [0, 8]}[mode]
    masks = [int(np.asarray(m).max()) for m in kwargs["mask"]]
    assert masks == [0 if i in pinned else 255 for i in range(9)]
    for index, frame in enumerate(kwargs["video"]):
        source = "/start.png" if index == 0 else "/end.png"
        expected = (
            fit_cover(served[source], SIZE) if index in pinned else Image.new("RGB", SIZE, (128, 128, 128))
        )
        assert np.array_equal(np.asarray(frame), np.asarray(expected)), index


def test_the_start_frame_changes_the_video(
    wan_worker: Worker, s3: Any, image_server: ImageServer, allow_loopback: None
) -> None:
    """The references really condition generation (the seed's worker silently ignored them)."""
    red = image_server.add_image("/cond-red.png", (256, 256), (255, 0, 0))
    blue = image_server.add_image("/cond-blue.png", (256, 256), (0, 0, 255))
    thumbs = []
    for name, url in (("red", red), ("blue", blue)):
        result = wan_worker.handle(wan_job(f"cond-{name}", metadata={"start_reference_url": url}))
        assert result["status"] == "completed", result
        thumbs.append(np.asarray(Image.open(io.BytesIO(read(s3, result["assets"][0]["thumbnail_url"])[0]))))
    assert np.abs(thumbs[0].astype(int) - thumbs[1].astype(int)).mean() > 1.0


@pytest.mark.parametrize(
    ("job_id", "config", "metadata", "expected"),
    [
        ("bad-frames", {"num_frames": 0}, {}, "config.num_frames: "),
        ("bad-size", {"width": 250, "height": 256}, {}, "config.width: width must be a multiple of 16"),
        (
            "bad-ref",
            {},
            {"start_reference_url": "http://127.0.0.1:9/gone.png"},
            "metadata.start_reference_url: could not fetch",
        ),
    ],
)
def test_bad_payloads_fail_clearly_and_store_nothing(
    wan_worker: Worker,
    s3: Any,
    allow_loopback: None,
    job_id: str,
    config: dict,
    metadata: dict,
    expected: str,
) -> None:
    result = wan_worker.handle(wan_job(job_id, config=config, metadata=metadata))
    assert result["status"] == "failed" and isinstance(result["error"], str), result
    assert result["error"].startswith(expected), result["error"]
    assert list_keys(s3, f"user-2/{job_id}/") == []


def test_a_worker_without_wan_says_so(sdxl_worker: Worker) -> None:
    result = sdxl_worker.handle(wan_job("no-wan"))
    assert result["status"] == "failed"
    assert result["error"] == (
        "type: 'video_fast' needs a model family this worker does not load (WORKER_MODELS=sdxl)"
    )


def test_legacy_reference_strength_payload(
    wan_worker: Worker,
    s3: Any,
    image_server: ImageServer,
    allow_loopback: None,
    calls: dict,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = image_server.add_image("/legacy-start.png", (256, 256))
    result = wan_worker.handle(
        wan_job("legacy-wan", metadata={"start_reference_url": url, "reference_strength": 0.7})
    )
    assert result["status"] == "completed", result
    assert result["assets"][0]["metadata"]["denoise_strength"] == pytest.approx(0.3)
    assert calls["vace"][0]["conditioning_scale"] == pytest.approx(0.7)
    assert "DEPRECATED" in caplog.text
