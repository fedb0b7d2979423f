"""The ``background`` phase: a worker on a new machine (empty COMPILE_CACHE_DIR, ``COMPILE=auto``).

After its (timed) start, one job runs again and again while the packages compile in the background,
each run noting whether compiled packages served it; then the same job compiled, and eager on the
idle GPU (the packages' routes undone), to compare with. Recorded: ``jobs_during_compile`` (each run: seconds,
``compiled``, seconds since ready), ``background_compile_s``, ``active_after_s``, the child's peak
GPU memory, and ``jobs_during_compile_slowdown``: the median eager run during the compile over the
best eager run on the idle GPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

IDLE_RUNS = 3


def _run(worker: Any, job: dict[str, Any]) -> tuple[float, bool]:
    started = time.perf_counter()
    result = worker.handle(job)
    seconds = time.perf_counter() - started
    if result.get("status") != "completed":
        raise RuntimeError(f"background phase: {result}")
    return round(seconds, 3), result["assets"][0]["metadata"]["compiled"]


def jobs_while_compiling(worker: Any, job: dict[str, Any], out: dict[str, Any]) -> None:
    """Run ``job`` until the background compile ends, then compiled and eager on the idle GPU."""
    ready = time.perf_counter()
    during: list[dict[str, Any]] = []
    background = worker.background
    while background is not None and not background.wait(0):
        seconds, compiled = _run(worker, job)
        during.append({"s": seconds, "compiled": compiled, "at_s": round(time.perf_counter() - ready, 1)})
    compiled_idle = [_run(worker, job)[0] for _ in range(IDLE_RUNS)]
    for family in worker.families:  # the compiled packages only: the CUDA graphs keep serving
        for installed in family.fast_paths.compiled_routes():
            installed.undo()
    eager_idle = [_run(worker, job)[0] for _ in range(IDLE_RUNS)]
    eager_during = [run["s"] for run in during if not run["compiled"]]
    compiled_during = [run["s"] for run in during if run["compiled"]]
    out["background"] = {
        "jobs_during_compile": during,
        "compiled_idle_s": compiled_idle,
        "eager_idle_s": eager_idle,
        "background_compile_s": worker.startup.get("background_compile_s"),
        "active_after_s": worker.startup.get("active_after_s", {}),
        "child_peak_gib": worker.startup.get("background_compile_peak_gib", {}),
        "fast_paths": worker.startup["fast_paths"],
    }
    if eager_during:
        out["background"]["jobs_during_compile_slowdown"] = round(
            statistics.median(eager_during) / min(eager_idle), 3
        )
    if compiled_during:
        out["background"]["compiled_jobs_during_compile_slowdown"] = round(
            statistics.median(compiled_during) / min(compiled_idle), 3
        )
    print(f"background: {out['background']}", flush=True)
