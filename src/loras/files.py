"""A job's LoRA files: named ones from LORAS_DIR, downloaded ones through a local cache.

- ``name``: ``LORAS_DIR/<name>.safetensors``; nothing outside the directory is ever read.
- ``url``: fetched like reference images (``src/media/download.py``), capped by MAX_LORA_BYTES and
  LORA_TIMEOUT_S, hashed while it streams to a temporary name, checked, then renamed to
  ``LORA_CACHE_DIR/<sha256>.safetensors`` (atomic: concurrent writers cannot corrupt it). An
  index ``LORA_CACHE_DIR/urls/<sha256 of the URL>`` names the file a URL gave, so the same URL, or
  the same ``sha256`` under another (signed) URL, downloads nothing. Least recently used files go
  first once the cache holds more than LORA_CACHE_GB. A cache directory that cannot be written
  means a private temporary file per job instead.
- Every file must be safetensors: its header is parsed (JSON, dtypes, tensor offsets within the
  file), whatever its name says; a pickle is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from src.contract import JobError, LoraSpec
from src.media.download import Download, download
from src.settings import Settings

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
_QUERY = re.compile(r"[?#].*$")


@dataclass(frozen=True)
class LoraFile:
    """A job's LoRA, checked and on local disk; ``temporary`` files are removed after the job."""

    path: Path
    sha256: str
    scale: float
    field: str  # the payload field it came from, e.g. "config.loras[1]"
    source: dict[str, str]  # {"name": ...} or {"url": ...} (without its query string)
    temporary: bool = False

    @property
    def metadata(self) -> dict[str, Any]:
        """What the asset's metadata says of it."""
        return {**self.source, "scale": self.scale, "sha256": self.sha256}


def check_safetensors(path: Path, field: str) -> None:
    """Raise JobError unless ``path`` is a well-formed safetensors file (header and offsets)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            if not list(handle.keys()):
                raise JobError(field, "is not a LoRA: the safetensors file holds no tensors")
    except (SafetensorError, OSError, ValueError) as err:
        raise JobError(field, f"is not a valid safetensors file ({err})") from None


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass
class LoraFiles:
    """Resolves a job's ``config.loras`` to checked local files (one instance per worker)."""

    loras_dir: Path
    cache_dir: Path
    cache_bytes: int
    max_loras: int
    fetch: Download
    _digests: dict[tuple[str, int, int], str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings) -> LoraFiles:
        """LORAS_DIR, LORA_CACHE_DIR, LORA_CACHE_GB, MAX_LORAS, MAX_LORA_BYTES and LORA_TIMEOUT_S."""
        return cls(
            loras_dir=settings.loras_path,
            cache_dir=settings.lora_cache_dir,
            cache_bytes=int(settings.lora_cache_gb * 2**30),
            max_loras=settings.max_loras,
            fetch=Download("LoRA", settings.max_lora_bytes, settings.lora_timeout_s),
        )

    def resolve(self, specs: list[LoraSpec]) -> list[LoraFile]:
        """Every spec as a checked local file, in order; JobError naming the field otherwise."""
        if len(specs) > self.max_loras:
            raise JobError(
                "config.loras", f"at most {self.max_loras} LoRAs per job (MAX_LORAS), got {len(specs)}"
            )
        files: list[LoraFile] = []
        try:
            for index, spec in enumerate(specs):
                where = f"config.loras[{index}]"
                files.append(self._named(spec, where) if spec.name else self._downloaded(spec, where))
        except BaseException:
            self.release(files)
            raise
        return files

    def release(self, files: list[LoraFile]) -> None:
        """Remove the job's temporary files (the cache keeps the others)."""
        for lora in files:
            if lora.temporary:
                shutil.rmtree(lora.path.parent, ignore_errors=True)

    def _named(self, spec: LoraSpec, where: str) -> LoraFile:
        assert spec.name is not None
        root = self.loras_dir.resolve()
        path = (root / f"{spec.name}{SUFFIX}").resolve()
        if path.parent != root or not path.is_file():  # a link out of the directory is not followed
            raise JobError(f"{where}.name", f"no LoRA {spec.name}{SUFFIX} in LORAS_DIR")
        check_safetensors(path, where)
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        digest = self._digests.get(key) or self._digests.setdefault(key, file_sha256(path))
        self._check_digest(spec, digest, where)
        return LoraFile(path, digest, spec.scale, where, {"name": spec.name})

    def _downloaded(self, spec: LoraSpec, where: str) -> LoraFile:
        assert spec.url is not None
        source = {"url": _QUERY.sub("", spec.url)}
        cached = self._cached(spec)
        if cached is not None:
            check_safetensors(cached, where)
            self._check_digest(spec, cached.stem, where)
            return LoraFile(cached, cached.stem, spec.scale, where, source)
        directory, temporary = self._writable_dir()
        fd, name = tempfile.mkstemp(dir=directory, prefix=".download-", suffix=".part")
        part = Path(name)
        try:
            hasher = hashlib.sha256()
            with os.fdopen(fd, "wb") as handle:

                def write(chunk: bytes) -> None:
                    hasher.update(chunk)
                    handle.write(chunk)

                download(spec.url, f"{where}.url", self.fetch, write)
            digest = hasher.hexdigest()
            check_safetensors(part, where)
            self._check_digest(spec, digest, where)
            path = directory / f"{digest}{SUFFIX}"
            os.replace(part, path)
        except BaseException:
            part.unlink(missing_ok=True)
            if temporary:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        if not temporary:
            self._index(spec.url, digest)
            self._evict(keep=path)
        return LoraFile(path, digest, spec.scale, where, source, temporary=temporary)

    @staticmethod
    def _check_digest(spec: LoraSpec, digest: str, where: str) -> None:
        if spec.sha256 is not None and spec.sha256.lower() != digest:
            raise JobError(f"{where}.sha256", f"the file's SHA-256 is {digest}, not {spec.sha256.lower()}")

    def _cached(self, spec: LoraSpec) -> Path | None:
        """The cached file for this spec (by its sha256, else by its URL), touched; None if absent."""
        assert spec.url is not None
        digest = spec.sha256.lower() if spec.sha256 else None
        if digest is None:
            with contextlib.suppress(OSError):
                digest = self._url_index(spec.url).read_text().strip()
        if not digest or not re.fullmatch(r"[0-9a-f]{64}", digest):
            return None
        path = self.cache_dir / f"{digest}{SUFFIX}"
        try:
            os.utime(path)  # most recently used
        except OSError:
            return None
        return path

    def _url_index(self, url: str) -> Path:
        return self.cache_dir / "urls" / hashlib.sha256(url.encode()).hexdigest()

    def _writable_dir(self) -> tuple[Path, bool]:
        """The cache directory, or a private temporary one when the cache cannot be written."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.cache_dir):
                pass
            return self.cache_dir, False
        except OSError as err:
            log.warning(
                "LORA_CACHE_DIR %s is not writable (%s): downloading without a cache", self.cache_dir, err
            )
            return Path(tempfile.mkdtemp(prefix="lora-")), True

    def _index(self, url: str, digest: str) -> None:
        index = self._url_index(url)
        with contextlib.suppress(OSError):
            index.parent.mkdir(exist_ok=True)
            tmp = index.with_name(f".{index.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(digest)
            os.replace(tmp, index)

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used files until the cache holds at most LORA_CACHE_GB."""
        with self._lock:
            files = []
            for path in self.cache_dir.glob(f"*{SUFFIX}"):
                with contextlib.suppress(OSError):
                    stat = path.stat()
                    files.append((stat.st_mtime, stat.st_size, path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.cache_bytes:
                    break
                if path != keep:
                    path.unlink(missing_ok=True)
                    total -= size
