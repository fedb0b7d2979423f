"""Seconds per named phase: how the worker times its start-up and each job's stages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Phases:
    """Seconds per named phase, rounded to 10 ms; a phase timed twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Within: adds the time spent to ``seconds[name]`` (also when the block raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 2)


class Stopwatch:
    """Seconds since it started, and since the last lap."""

    def __init__(self) -> None:
        self._started = self._last = time.perf_counter()

    def lap(self) -> tuple[float, float]:
        """(seconds since the last lap, seconds since the start); starts the next lap."""
        now = time.perf_counter()
        since_last, self._last = now - self._last, now
        return since_last, now - self._started
