"""The families loaded behind a ready worker (READY_AFTER=first): the worker serves the first family
named in WORKER_MODELS while a thread loads the others, one at a time, in their order.

- Loading a family (its imports and weights) runs beside jobs; its warm-up (CUDA-graph captures,
  package checks, the first calls) takes the worker's job lock, so it never overlaps a job.
- A job for a family still loading waits for it (``wait_until``), before it takes the job lock.
- A family that fails to load is recorded (``failed``): its jobs fail saying why, and ask RunPod
  for a fresh worker. The others still load and serve.
- The start-up record gains each family's load and warm-up phases and ``ready_after_s``: seconds
  from the worker being ready to each family being warm. ``then`` runs once every family is done
  (the background compile starts there: its memory check needs every family resident).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from src.families import Family, load_families
from src.job_lock import JobLock
from src.settings import Settings

log = logging.getLogger(__name__)


class FamilyUnavailableError(Exception):
    """A job needs a family that failed to load behind the ready worker."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"the {name} family failed to load on this worker ({reason})")


class LateFamilies:
    """Loads ``names`` in a thread; hands each warm family to ``add`` under the job lock."""

    def __init__(
        self,
        settings: Settings,
        names: list[str],
        job_lock: JobLock,
        startup: dict[str, Any],
        add: Callable[[Family], None],
        then: Callable[[], None],
        ready_at: float,
    ) -> None:
        """``ready_at``: the worker's ``perf_counter`` when it was ready (``ready_after_s`` counts
        from it)."""
        self.settings = settings
        self.names = names
        self.job_lock = job_lock
        self.startup = startup
        self.add = add
        self.then = then
        self.failed: dict[str, str] = {}  # family name -> why it did not load
        self.done = False
        self._changed = threading.Condition()
        self._ready_at = ready_at
        self._thread = threading.Thread(target=self._run, name="late families", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every family is loaded (or failed); False on timeout."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def wait_until(self, servable: Callable[[], bool]) -> None:
        """Return once ``servable()`` holds or every family is done (``servable`` is checked under
        the thread's condition each time a family is added)."""
        with self._changed:
            self._changed.wait_for(lambda: self.done or servable())

    def _run(self) -> None:
        ready_after: dict[str, float] = self.startup.setdefault("ready_after_s", {})
        for name in self.names:
            try:
                self._load(name)
                ready_after[name] = round(time.perf_counter() - self._ready_at, 2)
            except Exception as err:  # at start-up this would stop the worker; here its jobs say why
                self.failed[name] = f"{type(err).__name__}: {err}"
                log.error("the %s family failed to load behind the ready worker: %s", name, err, exc_info=err)
        with self._changed:
            self.done = True
            self._changed.notify_all()
        self.then()

    def _load(self, name: str) -> None:
        families, record = load_families(self.settings, [name], warm_up_lock=self.job_lock)
        (family,) = families
        with self.job_lock, self._changed:
            self.add(family)
            for key, value in record.items():
                if isinstance(value, dict):
                    self.startup.setdefault(key, {}).update(value)
                else:
                    self.startup[key] = value
            gc.collect()
            gc.freeze()  # as start_worker does: what loading built lives as long as the worker
            self._changed.notify_all()
        log.info("%s loaded behind the ready worker", name)
