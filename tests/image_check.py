"""What ``tests/image_test.sh`` checks of the image's runs (standard library only: it runs on the host).

Usage: python3 tests/image_check.py WORK_DIR (the runs' ``NAME.out``, ``NAME.err``, ``NAME.rc`` and
the storage folder ``out/``).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

USER = "image-test"


def printed(work: Path, name: str) -> dict[str, Any]:
    """What ``--test_input`` printed: ``{"output": <the result>}``, and ``"error"`` for a failed job."""
    text = (work / f"{name}.out").read_text()
    try:
        return json.loads(text)
    except ValueError as err:
        raise AssertionError(
            f"{name}: no job result ({err}): {printed(work, name)} {stderr_tail(work, name)}"
        ) from None


def output(work: Path, name: str) -> dict[str, Any]:
    """The job result."""
    try:
        return printed(work, name)["output"]
    except KeyError as err:
        raise AssertionError(
            f"{name}: no job result ({err}): {printed(work, name)} {stderr_tail(work, name)}"
        ) from None


def stderr_tail(work: Path, name: str) -> str:
    return "stderr: " + " | ".join((work / f"{name}.err").read_text().splitlines()[-5:])


def stored(work: Path, asset: dict[str, Any], key: str) -> bytes:
    """The file the asset's ``key`` URL names, from the storage folder (``bucket/user/job/file``)."""
    path = work / "out" / asset[key].split("/", 1)[1]
    assert path.is_file(), f"{asset[key]}: no file {path}"
    return path.read_bytes()


def check_webp(data: bytes, what: str) -> None:
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP", f"{what}: not a WEBP file"


def check_sdxl(work: Path) -> None:
    result = output(work, "sdxl")
    assert result["status"] == "completed", result
    (asset,) = result["assets"]
    assert asset["url"] == f"workspace-temp/{USER}/sdxl-1/0.png", asset["url"]
    png = stored(work, asset, "url")
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "0.png: not a PNG file"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert (width, height) == (512, 512) and len(png) == asset["metadata"]["file_size_bytes"]
    check_webp(stored(work, asset, "thumbnail_url"), "0.thumb.webp")


def check_video(work: Path) -> None:
    result = output(work, "video")
    assert result["status"] == "completed", result
    (asset,) = result["assets"]
    assert asset["url"] == f"workspace-temp/{USER}/video-1/0.mp4", asset["url"]
    mp4 = stored(work, asset, "url")
    assert mp4[4:8] == b"ftyp" and len(mp4) == asset["metadata"]["file_size_bytes"], "0.mp4: not an MP4 file"
    meta = asset["metadata"]
    assert (meta["width"], meta["height"], meta["num_frames"]) == (256, 256, 5), meta
    check_webp(stored(work, asset, "thumbnail_url"), "0.thumb.webp")


def check_bad(work: Path) -> None:
    result = printed(work, "bad")
    assert result["output"].get("status") == "failed", result
    assert result["error"].startswith("config.width: width must be a multiple of 8"), result["error"]
    assert int((work / "bad.rc").read_text()) != 0
    assert not (work / "out" / USER / "bad-1").exists(), "the failed job stored files"


def check_models_ro(work: Path) -> None:
    rc = int((work / "models_ro.rc").read_text())
    err = (work / "models_ro.err").read_text()
    lines = [line for line in err.splitlines() if "MODELS_DIR" in line]
    assert rc != 0, "the worker started with an unwritable MODELS_DIR"
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and "MODEL_PROFILE=tiny builds its models under MODELS_DIR/tiny" in lines[0], err[
        -1000:
    ]


def check_cache_ro(work: Path) -> None:
    result = output(work, "cache_ro")
    assert result["status"] == "completed", result
    err = (work / "cache_ro.err").read_text()
    warnings = [
        line
        for line in err.splitlines()
        if "COMPILE_CACHE_DIR=/usr/share/compile-cache is not writable" in line
    ]
    assert len(warnings) == 1, err[-1000:]


def main() -> int:
    work = Path(sys.argv[1])
    failures = 0
    for check in (check_sdxl, check_video, check_bad, check_models_ro, check_cache_ro):
        try:
            check(work)
            print(f"  ok   {check.__name__}")
        except AssertionError as err:
            failures += 1
            print(f"  FAIL {check.__name__}: {err}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
