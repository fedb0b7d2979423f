"""Generated media -> encoded files + thumbnails -> storage -> callback asset entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from src.media.images import encode_png, thumbnail_webp
from src.media.storage import CONTENT_TYPES, Storage


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image and the family's metadata for it (steps, seed, ...)."""

    image: Image.Image
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Generation:
    """What a model family produced for one job."""

    assets: list[GeneratedImage]
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


def store_generation(
    storage: Storage, user_id: str, job_id: str, generation: Generation
) -> list[dict[str, Any]]:
    """Store every asset of a job; raises if any object cannot be stored."""
    prefix = f"{user_id}/{job_id}"
    return [store_image(storage, prefix, i, asset) for i, asset in enumerate(generation.assets)]
