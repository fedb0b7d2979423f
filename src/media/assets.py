"""Generated media -> encoded files + thumbnails -> storage -> callback asset entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from src.media.images import encode_png, thumbnail_webp
from src.media.storage import CONTENT_TYPES, Storage
from src.media.video import encode_mp4


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image and the family's metadata for it (steps, seed, ...)."""

    image: Image.Image
    metadata: dict[str, Any] = field(default_factory=dict)


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
    """Store ``{index}.png`` and ``{index}.thumb.webp`` under ``prefix``; return the callback entry."""
    png = encode_png(generated.image)
    url = _put(storage, f"{prefix}/{index}.png", png, "png")
    thumbnail_url = _put(storage, f"{prefix}/{index}.thumb.webp", thumbnail_webp(generated.image), "webp")
    width, height = generated.image.size
    return {
        "type": "image",
        "url": url,
        "thumbnail_url": thumbnail_url,
        "metadata": {
            "width": width,
            "height": height,
            "format": "png",
            **generated.metadata,
            "file_size_bytes": len(png),
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
    storage: Storage, user_id: str, job_id: str, generation: Generation
) -> list[dict[str, Any]]:
    """Store every asset of a job; raises if any object cannot be stored."""
    prefix = f"{user_id}/{job_id}"
    return [
        store_video(storage, prefix, i, asset)
        if isinstance(asset, GeneratedVideo)
        else store_image(storage, prefix, i, asset)
        for i, asset in enumerate(generation.assets)
    ]
