"""A lock file beside a package while one worker compiles it, so that workers sharing one
COMPILE_CACHE_DIR (a network volume) compile each package once.

- The holder creates ``<package>.lock`` exclusively, writes its token in it, and touches it every
  ``heartbeat_s`` (a thread) until it releases it.
- Another worker that finds the lock waits while its heartbeat is fresh; a lock untouched for
  ``stale_after_s`` (its holder crashed or was killed) is taken over.
- A taken-over lock is replaced atomically; two workers that take over one stale lock at the same
  moment may both compile, and both write the package atomically: never a half-written file.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0  # twelve missed heartbeats: a busy compile never stalls its heartbeat that long


class PackageLock:
    """``path``, held by at most one compiling worker at a time."""

    def __init__(
        self, path: Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S
    ) -> None:
        self.path = path
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.token = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def try_acquire(self) -> bool:
        """Take the lock when it is free or stale; False while another worker's heartbeat is fresh."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not self._stale():
                return False
            log.warning("%s: its holder stopped its heartbeat; taking it over", self.path.name)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(self.token)
            os.replace(tmp, self.path)
        else:
            with os.fdopen(fd, "w") as file:
                file.write(self.token)
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._heartbeat.start()
        return True

    def wait(self, poll_s: float = 0.5) -> None:
        """Return when the lock is released or its heartbeat stopped."""
        while self.path.exists() and not self._stale():
            time.sleep(poll_s)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this one's."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self._ours():
            self.path.unlink(missing_ok=True)

    def _stale(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime > self.stale_after_s
        except FileNotFoundError:
            return False

    def _ours(self) -> bool:
        try:
            return self.path.read_text() == self.token
        except OSError:
            return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._ours():  # taken over after a stall: the other worker holds it now
                return
            try:
                os.utime(self.path)
            except OSError:
                return
