"""Where a compiled package lives in COMPILE_CACHE_DIR, what names it, and the record of its check.

A package's file name carries a digest of its identity (versions, GPU, settings, the model's
configuration and shapes): a package is reused only by the same combination. Beside it, a
``.checked.json`` record holds the SHA-256 of a file that agreed with the eager call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
    """A package's file and its check record in the cache directory."""

    def __init__(self, cache_dir: Path, name: str, identity: dict[str, Any]) -> None:
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = cache_dir / f"{name}-{digest}.pt2"
        self.record_path = cache_dir / f"{name}-{digest}.checked.json"

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
        """Record that this file agreed (written atomically). A cache directory that cannot be
        written only means that the next start checks again."""
        record = {"package_sha256": digest, "max_relative_error": limit, "errors": errors}
        tmp = self.record_path.with_name(f".{self.record_path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, self.record_path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            log.warning("%s: no record written (%s): the next start checks again", self.path.name, err)
