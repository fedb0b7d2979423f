"""Dropping files from the kernel's page cache, for starts on a "new machine" (``cold`` phase).

The benchmark builds its models just before it starts workers, so their files are in the page
cache and a start never waits on the disk; a worker on a new machine reads them from a cold disk
(or a network volume). ``POSIX_FADV_DONTNEED`` drops a file's clean cached pages, without
privileges: each file is written to the disk first (fsync), so that pages the build has just
written are dropped too.
"""

from __future__ import annotations

import os
from pathlib import Path


def evict(roots: list[Path]) -> int:
    """Drop every file under ``roots`` from the page cache; the bytes they hold."""
    dropped = 0
    for root in roots:
        for path in root.rglob("*") if root.is_dir() else []:
            if path.is_file() and not path.is_symlink():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                dropped += path.stat().st_size
    return dropped
