"""Where a compiled package lives in COMPILE_CACHE_DIR, what names it, and the records beside it.

A package's file name carries a digest of its identity (versions, GPU, settings, the model's
configuration and shapes): a package is reused only by the same combination. Beside it:

- ``.checked.json``: the SHA-256 of a file that agreed with the eager call;
- ``.lock``: held while a worker compiles it (``src/compile_lock.py``);
- ``.attempts.json``: background compiles started per machine, so that one that keeps failing
  (a crash, out of memory, a package that disagrees) is not retried on every start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import diffusers
import torch

log = logging.getLogger(__name__)


def package_identity(fmt: int, device: torch.device, **specific: Any) -> dict[str, Any]:
    """What a package is specific to: its format, versions, GPU, and what the caller adds
    (dtype, shapes, the model's configuration)."""
    return {
        "format": fmt,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **specific,
    }


class CacheEntry:
    """A package's file and the records beside it in the cache directory."""

    def __init__(self, cache_dir: Path, name: str, identity: dict[str, Any]) -> None:
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = cache_dir / f"{name}-{digest}.pt2"
        self.record_path = cache_dir / f"{name}-{digest}.checked.json"
        self.lock_path = cache_dir / f"{name}-{digest}.lock"
        self.attempts_path = cache_dir / f"{name}-{digest}.attempts.json"

    def sha256(self) -> str:
        """The package file's SHA-256."""
        with self.path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()

    def checked_before(self, digest: str) -> bool:
        """True when the record says the file with this SHA-256 agreed with the eager call."""
        try:
            return json.loads(self.record_path.read_text())["package_sha256"] == digest
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def write_record(self, digest: str, limit: float, errors: dict[str, float]) -> None:
        """Record that this file agreed. A cache directory that cannot be written only means that
        the next start checks again."""
        record = {"package_sha256": digest, "max_relative_error": limit, "errors": errors}
        if not _write_json(self.record_path, record):
            log.warning("%s: no record written: the next start checks again", self.path.name)

    def attempts(self) -> int:
        """Background compiles of this package started on this machine."""
        return _read_json(self.attempts_path).get(socket.gethostname(), 0)

    def count_attempt(self) -> None:
        """Count one more background compile started on this machine (best effort)."""
        attempts = _read_json(self.attempts_path)
        attempts[socket.gethostname()] = attempts.get(socket.gethostname(), 0) + 1
        _write_json(self.attempts_path, attempts)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json(path: Path, value: dict[str, Any]) -> bool:
    """Write ``value`` to ``path`` atomically; False when the directory cannot be written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(value, indent=2))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        log.debug("%s not written: %s", path, err)
        return False
    return True
