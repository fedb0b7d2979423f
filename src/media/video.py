"""MP4 encoding with the ffmpeg bundled by imageio-ffmpeg, and first-frame thumbnails."""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
from PIL import Image

from src.media.images import thumbnail_webp

CRF = 18  # visually lossless H.264
# x264's "veryfast": at CRF 18 its files are as good to the eye as "medium"'s and about as large,
# encoded 2-4x faster (the encode is most of a video job's time outside the GPU: docs/PERFORMANCE.md).
PRESET = "veryfast"


def encode_mp4(frames: np.ndarray, fps: int) -> tuple[bytes, bytes]:
    """Encode ``frames`` (T, H, W, 3 uint8 RGB) as H.264/yuv420p MP4 with ``+faststart``.

    Returns the MP4 bytes and a WEBP thumbnail of the first frame as decoded
    back from the MP4 (what a player shows first).
    """
    _, height, width, _ = frames.shape
    with tempfile.TemporaryDirectory(prefix="wan-video-") as tmp:
        path = Path(tmp) / "video.mp4"
        writer = imageio_ffmpeg.write_frames(
            str(path),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=["-crf", str(CRF), "-preset", PRESET, "-movflags", "+faststart"],
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        return path.read_bytes(), thumbnail_webp(first_frame(path))


def first_frame(path: Path) -> Image.Image:
    """The first frame of a video file, decoded with OpenCV, as an RGB image."""
    capture = cv2.VideoCapture(str(path))
    try:
        ok, bgr = capture.read()
    finally:
        capture.release()
    if not ok:
        raise RuntimeError(f"could not decode the first frame of {path.name}")
    return Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
