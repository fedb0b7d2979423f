"""The worker's job lock: held during each job; handed to its waiters in the order they came.

Between jobs, a package compiled in the background is switched to and a family loaded behind the
ready worker is warmed up (src/background.py, src/late_families.py), each waiting for this lock.
``threading.Lock`` is not fair: a caller running jobs back to back takes it again before a waiting
thread wakes, so on the H200 (2026-12-05, docs/PERFORMANCE.md) the compiled SDXL UNet, ready in
the background, waited 2.7 minutes of back-to-back jobs to be switched to. Here each ``acquire``
takes a ticket and the lock goes to the lowest ticket waiting.
"""

from __future__ import annotations

import threading
from types import TracebackType


class JobLock:
    """A mutual-exclusion lock served first come, first served (a ticket lock)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next_ticket = 0  # the ticket the next acquire takes
        self._serving = 0  # the ticket that holds, or may take, the lock

    def acquire(self) -> None:
        with self._changed:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._changed.wait_for(lambda: self._serving == ticket)

    def release(self) -> None:
        with self._changed:
            if self._serving == self._next_ticket:
                raise RuntimeError("release of an unlocked JobLock")
            self._serving += 1
            self._changed.notify_all()

    def locked(self) -> bool:
        """Whether a thread holds the lock."""
        with self._changed:
            return self._serving != self._next_ticket

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()
