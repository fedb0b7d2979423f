"""The weights of the families a worker is ready with, read into the page cache while Python imports.

On a new machine the weight files are on a cold disk or a network volume, and a family's load
would start reading them only after the imports it needs (diffusers, transformers: 5-6 s). A
thread reads them from the start of ``start_worker`` instead, so the loads find them in memory;
then, behind the ready worker, the weights of the families loaded after it.
Reading waits on the disk, not on the interpreter; but copying files that are in memory already
(a restarted worker, or files just written) slowed the imports beside it by about 1 s on the H200
host (docs/PERFORMANCE.md), so such files are skipped: sampled pages read with ``RWF_NOWAIT``,
which fails rather than wait for the disk, tell them apart. It reads at most half the memory
available at start, so that what it read is not evicted before the load uses it (the container's
limit counts), and it stops quietly at an unreadable file (the load then reports it).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from src.models import family_dirs
from src.settings import Settings
from src.timing import Phases

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
WEIGHT_SUFFIX = ".safetensors"  # what from_pretrained reads (configs and tokenizers are small)
PROBES = 64  # pages of a file sampled to tell whether it is in the page cache
PAGE_BYTES = 4096


def in_page_cache(fd: int) -> bool:
    """Whether the open file ``fd`` is in the page cache already: PROBES pages, evenly spread,
    each read with ``RWF_NOWAIT`` (which fails instead of reading from the disk). False where the
    system cannot tell (no ``RWF_NOWAIT``, or a file system without it): the file is read."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None:
        return False
    size = os.fstat(fd).st_size
    page = bytearray(PAGE_BYTES)
    try:
        for probe in range(PROBES):
            os.preadv(fd, [page], size * probe // PROBES // PAGE_BYTES * PAGE_BYTES, nowait)
    except OSError:  # EAGAIN: a page is on the disk; EOPNOTSUPP: the file system cannot tell
        return False
    return True


def weight_files(settings: Settings, families: list[str]) -> list[Path]:
    """The weight files of ``families``, family by family (those that exist)."""
    return [
        path
        for family in families
        for directory in family_dirs(family, settings)
        for path in sorted(directory.rglob(f"*{WEIGHT_SUFFIX}"))
        if path.is_file()
    ]


# The container's memory limit and use: cgroup v2, then v1 (absent or "max": no limit).
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def available_bytes() -> int | None:
    """The memory the page cache could hold without evicting what the worker reads: the machine's
    ``MemAvailable``, or less where the container's memory limit leaves less; None where unknown."""
    figures = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                figures.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in CGROUP_FILES:
        try:
            limit, usage = (int(Path(name).read_text()) for name in (limit_file, usage_file))
        except (OSError, ValueError):  # no such cgroup file, or "max"
            continue
        figures.append(max(limit - usage, 0))
        break
    return min(figures) if figures else None


class WeightPrefetch:
    """Reads ``files`` (the ready families' weights) in a thread, then ``later`` (the families loaded
    behind the ready worker), up to ``budget`` bytes in all (None: no limit)."""

    def __init__(self, files: list[Path], later: list[Path], budget: int | None) -> None:
        self.files = files
        self.later = later
        self.budget = budget
        self.bytes_read = 0
        self.ready_bytes = 0  # of ``files``
        self.cached_bytes = 0  # of ``files`` and ``later``: found in the page cache, not read
        self.ready_cached_bytes = 0  # of ``files``
        self.phases = Phases()
        self.files_read = threading.Event()  # set once ``files`` are read, or the reading stopped
        self._thread = threading.Thread(target=self._read_all, name="weight-prefetch", daemon=True)

    @classmethod
    def start_for(cls, settings: Settings, now: list[str], later: list[str]) -> WeightPrefetch:
        """Start reading the weights of the families ``now``, then ``later`` (half the available
        memory at most)."""
        available = available_bytes()
        budget = None if available is None else available // 2
        prefetch = cls(weight_files(settings, now), weight_files(settings, later), budget)
        prefetch.start()
        return prefetch

    def start(self) -> None:
        self._thread.start()

    def _read_all(self) -> None:
        buffer = memoryview(bytearray(CHUNK_BYTES))
        try:
            with self.phases.phase("prefetch"):
                going = self._read(self.files, buffer)
        finally:
            self.ready_bytes = self.bytes_read
            self.ready_cached_bytes = self.cached_bytes
            self.files_read.set()
        if going and self.later:
            with self.phases.phase("prefetch_later"):
                self._read(self.later, buffer)
            later_gib = (self.bytes_read - self.ready_bytes) / 2**30
            log.info("weight prefetch: %.1f GiB of the later families read", later_gib)

    def _read(self, files: list[Path], buffer: memoryview) -> bool:
        """Read ``files`` through ``buffer``; False once the reading stopped (the budget, an error)."""
        for path in files:
            try:
                with path.open("rb", buffering=0) as file:
                    if in_page_cache(file.fileno()):
                        self.cached_bytes += os.fstat(file.fileno()).st_size
                        continue
                    while self.budget is None or self.bytes_read < self.budget:
                        count = file.readinto(buffer)
                        if not count:
                            break
                        self.bytes_read += count
            except OSError as err:
                log.warning("weight prefetch stopped at %s (%s)", path, err)
                return False
            if self.budget is not None and self.bytes_read >= self.budget:
                log.info("weight prefetch: stopped at half the available memory")
                return False
        return True

    def record(self) -> dict[str, Any]:
        """For the start-up record, once the ready families' weights are read: the bytes read, those
        found in the page cache (skipped), and how long it took (the later families' go on being
        read behind the ready worker)."""
        self.files_read.wait()
        return {
            "prefetch_bytes": self.ready_bytes,
            "prefetch_cached_bytes": self.ready_cached_bytes,
            "prefetch_s": self.phases.seconds.get("prefetch", 0.0),
        }
