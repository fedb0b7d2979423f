"""Shared fixtures: a moto S3 server and an image server on 127.0.0.1, tiny-model workers."""

from __future__ import annotations

import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from PIL import Image

from src.settings import Settings
from src.worker import Worker, start_worker

REPO = Path(__file__).resolve().parent.parent
TEST_MODELS_DIR = Path(os.environ.get("TEST_MODELS_DIR", REPO / ".cache" / "test-models"))
BUCKET = "workspace-temp"
CREDENTIALS = {"bucket_access_key_id": "testing", "bucket_secret_access_key": "testing"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> None:
    """Block until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto's server mode, its own process) over HTTP on 127.0.0.1."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def s3(s3_endpoint: str) -> Any:
    """A boto3 client on the moto server, with the worker's bucket created."""
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    return client


def list_keys(s3: Any, prefix: str) -> list[str]:
    """Every key under ``prefix`` in the worker's bucket."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def tiny_settings(s3_endpoint: str, families: list[str], **overrides: Any) -> Settings:
    """Worker settings for tiny models and the moto bucket."""
    values: dict[str, Any] = {
        "models_dir": TEST_MODELS_DIR,
        "model_profile": "tiny",
        "worker_models": families,
        "device": "cpu",
        "bucket_endpoint_url": s3_endpoint,
        "bucket_name": BUCKET,
        **CREDENTIALS,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def sdxl_worker(s3: Any, s3_endpoint: str) -> Worker:
    """A worker with the tiny SDXL family loaded and warmed, storing into moto."""
    return start_worker(tiny_settings(s3_endpoint, ["sdxl"]))


@pytest.fixture(scope="session")
def wan_worker(s3: Any, s3_endpoint: str) -> Worker:
    """A worker with the tiny Wan family loaded and warmed, storing into moto."""
    return start_worker(tiny_settings(s3_endpoint, ["wan"]))


@pytest.fixture(scope="session")
def fast_aot_build() -> Iterator[None]:
    """A quicker C++ build of AOTInductor wrappers for the CPU tests (same graph, same kernels)."""
    from src import aot_package

    patch = pytest.MonkeyPatch()
    patch.setitem(aot_package.INDUCTOR_CONFIGS, "aot_inductor.compile_wrapper_opt_level", "O0")
    yield
    patch.undo()


@pytest.fixture(scope="session")
def sdxl_pipe(s3_endpoint: str) -> Any:
    """The tiny SDXL text-to-image pipeline (float32, CPU), loaded once; tests restore what they patch."""
    from diffusers import StableDiffusionXLPipeline

    from src.models import model_dirs
    from src.sdxl.tiny import build_tiny_sdxl

    (path,) = model_dirs(tiny_settings(s3_endpoint, ["sdxl"]), ["sdxl"], build_tiny_sdxl)
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def both_worker(sdxl_worker: Worker, wan_worker: Worker) -> Worker:
    """A worker serving both families (sharing the loaded models of the two above)."""
    settings = sdxl_worker.settings.model_copy(update={"worker_models": ["sdxl", "wan"]})
    return Worker(settings, sdxl_worker.storage, sdxl_worker.families + wan_worker.families)


class ImageServer:
    """Serves registered byte bodies over HTTP on 127.0.0.1."""

    def __init__(self) -> None:
        self.bodies: dict[str, tuple[bytes, str]] = {}
        self.routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]] = {}
        self.hits: Counter[str] = Counter()  # GET requests per path
        bodies, routes, hits = self.bodies, self.routes, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                hits[path] += 1
                if path in routes:
                    routes[path](self)
                    return
                body = bodies.get(path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", body[1])
                self.send_header("Content-Length", str(len(body[0])))
                self.end_headers()
                self.wfile.write(body[0])

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, path: str, body: bytes, content_type: str = "image/png") -> str:
        """Serve ``body`` at ``path``; return its URL."""
        self.bodies[path] = (body, content_type)
        return self.base + path

    def add_route(self, path: str, respond: Callable[[http.server.BaseHTTPRequestHandler], None]) -> str:
        """Answer GET ``path`` with ``respond(handler)``; return its URL."""
        self.routes[path] = respond
        return self.base + path

    def add_image(self, path: str, size: tuple[int, int], color: tuple[int, int, int] = (200, 40, 40)) -> str:
        """Serve a PNG of ``size`` (a gradient, so resizing shows) at ``path``."""
        image = Image.linear_gradient("L").resize(size).convert("RGB")
        image = Image.blend(image, Image.new("RGB", size, color), 0.5)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return self.add(path, buffer.getvalue())


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    """An HTTP server for reference images, on 127.0.0.1."""
    server = ImageServer()
    yield server
    server.server.shutdown()


@pytest.fixture
def allow_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the SSRF-safe fetch reach the test's image server on 127.0.0.1."""
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
