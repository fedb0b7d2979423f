"""Files read and written with their hashes: source files checked against what their source says
they should be, output files written through a temporary name with the sha256 the manifest records.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from builder.errors import CorruptFileError
from builder.sources import FileMeta

CHUNK = 16 * 1024 * 1024


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read a chunk at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class SourceVerifier:
    """Hashes a source file as it is read and checks it against its FileMeta at the end."""

    def __init__(self, rel: str, path: Path, meta: FileMeta) -> None:
        self.rel, self.meta = rel, meta
        self.size = path.stat().st_size
        if meta.size is not None and meta.size != self.size:
            raise CorruptFileError(rel, f"size {self.size} bytes, expected {meta.size}")
        self.sha256 = hashlib.sha256() if meta.sha256 else None
        self.sha1 = None
        if meta.git_sha1:
            self.sha1 = hashlib.sha1(usedforsecurity=False)
            self.sha1.update(f"blob {self.size}\0".encode())

    def update(self, data: bytes | memoryview) -> None:
        if self.sha256:
            self.sha256.update(data)
        if self.sha1:
            self.sha1.update(data)

    def check(self) -> bool:
        """Raise CorruptFileError on a mismatch; False when nothing could be verified."""
        if self.sha256 and (got := self.sha256.hexdigest()) != self.meta.sha256:
            raise CorruptFileError(self.rel, f"sha256 {got}, expected {self.meta.sha256}")
        if self.sha1 and (got := self.sha1.hexdigest()) != self.meta.git_sha1:
            raise CorruptFileError(self.rel, f"git sha1 {got}, expected {self.meta.git_sha1}")
        return bool(self.sha256 or self.sha1 or self.meta.size is not None)


class HashingWriter:
    """Writes an output file through a temporary name, hashing what is written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = path.with_name(f".{path.name}.part")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def finish(self) -> dict[str, Any]:
        """Move the file into place; return its manifest entry (size and sha256)."""
        self.file.close()
        os.chmod(self.tmp, 0o644)
        self.tmp.replace(self.path)
        return {"size": self.size, "sha256": self.sha256.hexdigest()}

    def abort(self) -> None:
        """Drop the partial file."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)
