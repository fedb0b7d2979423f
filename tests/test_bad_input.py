"""Every payload of the hostile corpus fails clearly and stores nothing; then a valid job still works."""

from __future__ import annotations

import http.server
import io
import struct
import time
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from runpod.serverless.utils import rp_ssrf

from src.media.reference import FetchLimits
from src.worker import Worker
from tests.bad_payloads import CORPUS, SRV
from tests.conftest import BUCKET, ImageServer, list_keys

LIMITS = FetchLimits(max_bytes=5 * 1024 * 1024, max_pixels=40_000_000, timeout_s=1.5)
VALID = {
    "type": "sdxl_image_fast",
    "prompt": "a calm lake",
    "user_id": "corpus",
    "config": {"width": 512, "height": 512, "num_inference_steps": 1, "seed": 3},
}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _drip(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    try:
        for _ in range(100):
            handler.wfile.write(b"\x89")
            handler.wfile.flush()
            time.sleep(0.3)
    except OSError:
        pass


def _huge(chunked: bool) -> Any:
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        block = b"\0" * (1024 * 1024)
        handler.send_response(200)
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Content-Length", str(100 * len(block)))
        handler.end_headers()
        try:
            for _ in range(100):
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
        except OSError:
            pass

    return respond


def _redirect(location: str) -> Any:
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return respond


@pytest.fixture(scope="module")
def hostile(image_server: ImageServer) -> ImageServer:
    """The reference server's hostile and broken routes."""
    image_server.add_image("/ok.png", (64, 64))
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (9, 99, 199)).save(buffer, format="PNG")
    png = buffer.getvalue()
    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    image_server.add("/truncated.png", png[: len(png) // 2])
    image_server.add("/truncated.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")
    image_server.add("/text.txt", b"just some words", "text/plain")
    image_server.add("/page.html", b"<html><body>404 but 200</body></html>", "text/html")
    image_server.add("/empty.png", b"")
    image_server.add("/bomb.png", png_header_only(50_000, 50_000))
    image_server.add("/big.png", png_header_only(8000, 6000))
    image_server.add_route("/slow.png", _drip)
    image_server.add_route("/huge-declared.png", _huge(chunked=False))
    image_server.add_route("/huge-chunked.png", _huge(chunked=True))
    image_server.add_route("/error-500", lambda h: h.send_error(500))
    image_server.add_route("/redirect-private", _redirect("http://10.0.0.1/a.png"))
    image_server.add_route("/redirect-metadata", _redirect("http://169.254.169.254/latest/meta-data/"))
    image_server.add_route("/redirect-file", _redirect("file:///etc/passwd"))
    image_server.add_route("/redirect-loop", _redirect("/redirect-loop"))
    return image_server


@pytest.fixture
def guarded(both_worker: Worker, monkeypatch: pytest.MonkeyPatch) -> Worker:
    """Both families with the SDK's SSRF rules on; only the test server (127.0.0.1) counts as public."""
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)
    real = rp_ssrf.is_safe_address
    monkeypatch.setattr(rp_ssrf, "is_safe_address", lambda ip: ip == "127.0.0.1" or real(ip))
    for family in both_worker.families:
        monkeypatch.setattr(family, "limits", LIMITS)
    return both_worker


def fill(value: Any, base: str) -> Any:
    """``value`` with every ``{srv}`` replaced by the server's base URL."""
    if isinstance(value, str):
        return value.replace(SRV, base)
    if isinstance(value, dict):
        return {k: fill(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, base) for v in value]
    return value


def test_the_corpus_is_large_and_named_uniquely() -> None:
    names = [name for name, _, _ in CORPUS]
    assert len(names) >= 60 and len(set(names)) == len(names)


@pytest.mark.parametrize(("name", "payload", "expected"), CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_payload(
    guarded: Worker, hostile: ImageServer, s3: Any, name: str, payload: Any, expected: str
) -> None:
    before = list_keys(s3, "")
    started = time.monotonic()
    result = guarded.handle({"id": f"rp-{name}", "input": fill(payload, hostile.base)})
    assert time.monotonic() - started < 15
    assert set(result) == {"error", "job_id", "status"} and result["status"] == "failed", result
    assert isinstance(result["error"], str) and result["error"].startswith(expected), result["error"]
    assert list_keys(s3, "") == before  # nothing stored
    after = guarded.handle({"id": f"rp-ok-{name}", "input": VALID})
    assert after["status"] == "completed", after  # the worker is still fine


def test_odd_but_valid_references_are_normalised(guarded: Worker, hostile: ImageServer, s3: Any) -> None:
    """CMYK, 16-bit, palette-with-alpha and animated references are converted, not refused."""
    samples = {
        "/cmyk.jpg": Image.new("CMYK", (300, 200), (0, 255, 255, 0)),
        "/gray16.png": Image.new("I;16", (300, 200), 40000),
        "/palette.png": Image.new("P", (300, 200), 3),
        "/animated.gif": Image.new("RGB", (300, 200), (255, 0, 0)),
    }
    for path, image in samples.items():
        buffer = io.BytesIO()
        if path.endswith(".gif"):
            image.save(
                buffer,
                format="GIF",
                save_all=True,
                append_images=[Image.new("RGB", (300, 200), (0, 0, 255))],
                duration=100,
            )
        else:
            image.save(
                buffer,
                format="JPEG" if path.endswith(".jpg") else "PNG",
                **({"transparency": 3} if path == "/palette.png" else {}),
            )
        url = hostile.add(path, buffer.getvalue())
        result = guarded.handle(
            {
                "id": "rp",
                "input": {
                    **VALID,
                    "id": f"odd{path.replace('/', '-').replace('.', '-')}",
                    "metadata": {"reference_image_url": url},
                },
            }
        )
        assert result["status"] == "completed", (path, result)
        assert len(list_keys(s3, f"corpus/{result['job_id']}/")) == 2


def _payloads() -> st.SearchStrategy[Any]:
    small = st.sampled_from([256, 512, 520, 0, -8, 4096, "512", None, 2.5])
    number = st.one_of(
        st.integers(-3, 12),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=3),
        st.none(),
        st.booleans(),
    )
    config = st.fixed_dictionaries(
        {"width": small, "height": small, "num_inference_steps": st.sampled_from([1, 2, 0, 500, 1.5, "2"])},
        optional={
            "num_images": number,
            "seed": number,
            "guidance_scale": number,
            "num_frames": number,
            "denoise_strength": number,
            "resolution": st.sampled_from(["256x256", "512x512", "1x1", "x"]),
        },
    )
    metadata = st.fixed_dictionaries(
        {},
        optional={
            "reference_image_url": st.sampled_from(["http://10.0.0.1/x.png", "file:///etc/hosts", "", 5]),
            "exact_copy_mode": st.one_of(st.booleans(), st.text(max_size=2)),
            "reference_strength": number,
        },
    )
    payload = st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                ["sdxl_image_fast", "sdxl_image_high", "video_fast", "image_high", "nope", 7]
            ),
            "user_id": st.sampled_from(["u1", "a/b", "", "ü", 3]),
            "config": st.one_of(config, st.just([]), st.none()),
        },
        optional={
            "prompt": st.one_of(st.text(max_size=40), st.none(), st.integers()),
            "metadata": metadata,
            "id": st.one_of(
                st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,8}", fullmatch=True), st.text(max_size=5)
            ),
            "negative_prompt": st.one_of(st.text(max_size=10), st.none()),
        },
    )
    return st.one_of(payload, st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=_payloads())
def test_the_handler_never_raises(guarded: Worker, s3: Any, payload: Any) -> None:
    """Any payload gives a completed callback whose assets all exist, or a string error."""
    result = guarded.handle({"id": "rp-hypothesis", "input": payload})
    if result.get("status") == "completed":
        assert set(result) == {"job_id", "status", "assets", "metadata"}
        keys = set(list_keys(s3, f"{payload['user_id']}/{result['job_id']}/"))
        for asset in result["assets"]:
            for url in (asset["url"], asset["thumbnail_url"]):
                assert url.startswith(f"{BUCKET}/") and url.split("/", 1)[1] in keys
    else:
        assert result["status"] == "failed" and isinstance(result["error"], str) and result["error"]
