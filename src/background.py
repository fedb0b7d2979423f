"""Packages compiled while the worker serves (``COMPILE=background``, and ``auto`` on CUDA).

- At start-up, a fast path whose package is missing serves eagerly (``FastPaths.missing``); the
  worker is ready at once.
- Then a thread runs, per family with missing packages, one child process
  (``src/compile_child.py``: its own CUDA context, lower CPU priority) that loads the family and
  compiles the packages one at a time into COMPILE_CACHE_DIR, each checked against the eager model
  and written atomically (``src/aot_package.py``), and reports each one when it is done.
- Each package the child reports serving is activated between jobs: the thread takes the worker's
  job lock and loads the package on the worker's own weights. The start-up record says when
  (``active_after_s``); each asset's ``compiled`` says which path served its job.
- A package the child does not report serving (it crashed, ran out of memory, was killed, or the
  package disagreed) stays eager, with one log line. Each child counts an attempt per package and
  machine; a later start retries at most COMPILE_RETRIES times.
- Where the free GPU memory would not hold the child, nothing is compiled (one log line).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from typing import Any

import torch

from src.families import Family
from src.job_lock import JobLock
from src.settings import Settings
from src.timing import Phases

log = logging.getLogger(__name__)

# GPU memory a child needs beyond the family's weights (inductor's autotuning, the checks' inputs);
# measured on the H200: docs/PERFORMANCE.md.
CHILD_EXTRA_GIB = 8.0


class BackgroundCompiler:
    """Compiles the families' missing packages in child processes and activates them between jobs."""

    def __init__(
        self,
        settings: Settings,
        families: list[Family],
        job_lock: JobLock,
        startup: dict[str, Any],
        resident_gib: dict[str, float],
        ready_at: float,
    ) -> None:
        """``startup``: the worker's start-up record (updated as packages become active, in seconds
        since ``ready_at``, the worker's ``perf_counter`` when it was ready); ``resident_gib``: each
        family's GPU memory, what its child loads again."""
        self.settings = settings
        self.families = [family for family in families if family.fast_paths.missing]
        self.job_lock = job_lock
        self.startup = startup
        self.resident_gib = resident_gib
        self.children: list[subprocess.Popen[str]] = []
        self._ready_at = ready_at
        self._thread = threading.Thread(target=self._run, name="background compile", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for every child to finish and its packages to be activated; False on timeout."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        for family in self.families:
            try:
                self._compile(family)
            except Exception as err:  # compiling is an optimisation: the worker serves eagerly on
                log.error("background compile of %s failed: %s", family.name, err)
                for name in list(family.fast_paths.missing):
                    self._give_up(family, name, f"the background compile failed ({err})")
        self.startup["background_compile_s"] = round(time.perf_counter() - self._ready_at, 2)

    def _compile(self, family: Family) -> None:
        """One child for the family's missing packages; activate each one it reports serving."""
        paths = family.fast_paths
        for name, entry in list(paths.missing.items()):
            if (attempts := entry.attempts()) > self.settings.compile_retries:
                why = f"{attempts} background compiles of it failed on this machine"
                self._give_up(family, name, f"{why} (COMPILE_RETRIES={self.settings.compile_retries})", False)
        if not paths.missing:
            return
        if problem := self._no_room(family):
            for name in list(paths.missing):
                self._give_up(family, name, problem, False)
            return
        names = list(paths.missing)
        for entry in paths.missing.values():
            entry.count_attempt()
        log.info("compiling in the background: %s", ", ".join(names))
        child = subprocess.Popen(
            [sys.executable, "-m", "src.compile_child", family.name, *names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.children.append(child)
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(self.settings.model_dump_json() + "\n")  # through a pipe: no secret in argv
        child.stdin.close()
        for line in child.stdout:
            report = _report(line)
            if report is None:
                continue
            if "peak_gib" in report:
                self.startup.setdefault("background_compile_peak_gib", {})[family.name] = report["peak_gib"]
            elif report.get("status") == "serving" and report.get("path") in paths.missing:
                self._activate(family, report["path"])
            elif report.get("path") in paths.missing:
                self._give_up(family, report["path"], report.get("status", "not compiled"))
        code = child.wait()
        for name in list(paths.missing):
            self._give_up(family, name, f"the compiling process ended ({_exit(code)})")

    def _activate(self, family: Family, name: str) -> None:
        """Between jobs: serve ``name`` from its package."""
        phases = Phases()
        with self.job_lock:
            serving = family.fast_paths.activate(name, phases)
        self.startup["fast_paths"][name] = family.fast_paths.status[name]
        if serving:
            after = round(time.perf_counter() - self._ready_at, 2)
            self.startup.setdefault("active_after_s", {})[name] = after
            log.info("%s: compiled in the background, serving from now on (%.1f s after ready)", name, after)

    def _give_up(self, family: Family, name: str, why: str, failed: bool = True) -> None:
        """``name`` stays eager (one log line); ``failed``: an attempt failed (a later start may retry)."""
        family.fast_paths.give_up(name, why)
        self.startup["fast_paths"][name] = family.fast_paths.status[name]
        retry = (
            f"; later starts retry it up to COMPILE_RETRIES={self.settings.compile_retries} times"
            if failed
            else ""
        )
        log.warning("%s: serving eagerly: %s%s", name, why, retry)

    def _no_room(self, family: Family) -> str | None:
        """Why the GPU would not hold the family's child, or None."""
        if not self.settings.torch_device.startswith("cuda"):
            return None
        free_gib = torch.cuda.mem_get_info()[0] / 2**30
        need_gib = self.resident_gib.get(family.name, 0.0) + CHILD_EXTRA_GIB
        if free_gib >= need_gib:
            return None
        return (
            f"not compiled in the background: {free_gib:.1f} GiB of GPU memory free, "
            f"the compiling process needs ~{need_gib:.1f} GiB"
        )


def _report(line: str) -> dict[str, Any] | None:
    """A line of the child's report (JSON), or None for anything else it printed."""
    try:
        report = json.loads(line)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
