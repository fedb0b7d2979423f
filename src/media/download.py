"""Downloads from URLs a job names (reference images, LoRA files): SSRF-safe, capped, timed.

The runpod SDK's ``safe_get`` refuses private, loopback and metadata addresses (unless
``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true``), pins the resolved address and re-checks every
redirect. The body is capped in bytes and in total time: a watchdog shuts the socket of a server
that drips bytes (a per-read timeout never trips on it). Every failure is a JobError naming the
payload field.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from requests import RequestException, Response

from src.contract import JobError
from src.runpod_sdk import rp_ssrf

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Download:
    """What is fetched (``noun``, for messages: "reference image", "LoRA") and its caps."""

    noun: str
    max_bytes: int
    timeout_s: float


def download(url: str, field: str, spec: Download, write: Callable[[bytes], object]) -> None:
    """Stream ``url`` into ``write``, chunk by chunk; failures raise JobError naming ``field``."""
    try:
        response = rp_ssrf.safe_get(url, timeout=spec.timeout_s, max_bytes=spec.max_bytes)
    except rp_ssrf.SSRFError as err:
        raise JobError(field, _refusal(err, spec)) from None
    except RequestException as err:
        raise JobError(field, f"could not fetch the {spec.noun}: {type(err).__name__}") from None
    timed_out = threading.Event()
    watchdog = threading.Timer(spec.timeout_s, _abort, args=(response, timed_out))
    watchdog.start()
    try:
        with response:
            if response.status_code != 200:
                raise JobError(field, f"could not fetch the {spec.noun}: HTTP {response.status_code}")
            for chunk in rp_ssrf.iter_content_capped(response, CHUNK, spec.max_bytes):
                write(chunk)
    except rp_ssrf.SSRFError as err:
        raise JobError(field, _refusal(err, spec)) from None
    except (RequestException, OSError) as err:
        if timed_out.is_set():
            short = spec.noun.split()[0]
            raise JobError(field, f"{short} download took longer than {spec.timeout_s:g} s") from None
        raise JobError(field, f"could not fetch the {spec.noun}: {type(err).__name__}") from None
    finally:
        watchdog.cancel()


def _refusal(err: rp_ssrf.SSRFError, spec: Download) -> str:
    if "size cap" in str(err):
        return f"{spec.noun} is larger than {spec.max_bytes} bytes"
    return f"refused to fetch the {spec.noun}: {err}"


def _abort(response: Response, timed_out: threading.Event) -> None:
    """Shut the response's socket so a blocked read returns at once."""
    timed_out.set()
    socket_io = getattr(getattr(getattr(response.raw, "_fp", None), "fp", None), "raw", None)
    sock = getattr(socket_io, "_sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
