"""Generated media -> encoded files + thumbnails -> storage -> callback asset entries."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from src.media.images import ImageOutput, thumbnail_webp
from src.media.storage import CONTENT_TYPES, Storage
from src.media.video import encode_mp4

# Encoding and uploads run on these threads (PIL, zlib, libwebp and sockets release the GIL),
# so an image's PNG, its thumbnail and their uploads run in parallel.
_POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="assets")
# A job's assets store in parallel on long-lived threads (a pool per job would start threads per job).
_STORE_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="store")


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image, the family's metadata for it (steps, seed, ...) and how it is stored."""

    image: Image.Image
    metadata: dict[str, Any] = field(default_factory=dict)
    output: ImageOutput = field(default_factory=ImageOutput)


@dataclass(frozen=True)
class GeneratedVideo:
    """One generated video: frames (T, H, W, 3 uint8 RGB), its frame rate and the family's metadata."""

    frames: np.ndarray
    fps: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Generation:
    """What a model family produced for one job."""

    assets: list[GeneratedImage | GeneratedVideo]
    reference_mode: str


def _put(storage: Storage, key: str, data: bytes, fmt: str) -> str:
    storage.put(key, data, CONTENT_TYPES[fmt])
    return f"{storage.bucket}/{key}"


def store_image(storage: Storage, prefix: str, index: int, generated: GeneratedImage) -> dict[str, Any]:
    """Store ``{index}.png`` (or ``.webp``, ``.jpg``: the job's format) and ``{index}.thumb.webp`` under
    ``prefix``; return the callback entry."""
    output = generated.output
    encoded = _POOL.submit(output.encode, generated.image)
    thumbnail_bytes = thumbnail_webp(generated.image)  # the small one: ready first
    thumbnail = _POOL.submit(_put, storage, f"{prefix}/{index}.thumb.webp", thumbnail_bytes, "webp")
    try:
        data = encoded.result()
        url = _put(storage, f"{prefix}/{index}.{output.extension}", data, output.format)
    finally:
        wait([thumbnail])  # a failed job removes what it stored: nothing may land after that
    thumbnail_url = thumbnail.result()
    width, height = generated.image.size
    return {
        "type": "image",
        "url": url,
        "thumbnail_url": thumbnail_url,
        "metadata": {
            "width": width,
            "height": height,
            "format": output.format,
            **generated.metadata,
            "file_size_bytes": len(data),
            "asset_index": index,
        },
    }


def store_video(storage: Storage, prefix: str, index: int, generated: GeneratedVideo) -> dict[str, Any]:
    """Store ``{index}.mp4`` and ``{index}.thumb.webp`` (first frame) under ``prefix``."""
    mp4, thumbnail = encode_mp4(generated.frames, generated.fps)
    url = _put(storage, f"{prefix}/{index}.mp4", mp4, "mp4")
    thumbnail_url = _put(storage, f"{prefix}/{index}.thumb.webp", thumbnail, "webp")
    count, height, width, _ = generated.frames.shape
    return {
        "type": "video",
        "url": url,
        "thumbnail_url": thumbnail_url,
        "metadata": {
            "width": width,
            "height": height,
            "format": "mp4",
            "num_frames": count,
            "fps": generated.fps,
            "duration_seconds": round(count / generated.fps, 4),
            **generated.metadata,
            "file_size_bytes": len(mp4),
            "asset_index": index,
        },
    }


def store_generation(
    storage: Storage, user_id: str, job_id: str, generation: Generation, job_metadata: dict[str, Any]
) -> list[dict[str, Any]]:
    """Store every asset of a job (assets in parallel), each with ``job_metadata`` added to its metadata;
    raises if any object cannot be stored."""
    prefix = f"{user_id}/{job_id}"

    def store(index: int, asset: GeneratedImage | GeneratedVideo) -> dict[str, Any]:
        asset = replace(asset, metadata={**asset.metadata, **job_metadata})
        if isinstance(asset, GeneratedVideo):
            return store_video(storage, prefix, index, asset)
        return store_image(storage, prefix, index, asset)

    if len(generation.assets) == 1:
        return [store(0, generation.assets[0])]
    futures = [_STORE_POOL.submit(store, i, asset) for i, asset in enumerate(generation.assets)]
    wait(futures)  # every upload has ended before a failure is reported (and cleaned up)
    return [future.result() for future in futures]
