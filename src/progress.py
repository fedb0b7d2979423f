"""Throttled per-step progress updates for a running job."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

Sender = Callable[[dict[str, Any], Any], None]


def runpod_sender() -> Sender | None:
    """The runpod SDK's ``progress_update`` when running on RunPod, else None.

    Outside RunPod (local harness, tests) there is no job-status endpoint to post to.
    """
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        return None
    from runpod.serverless import progress_update

    return progress_update


class Progress:
    """Sends ``{"stage", "step", "total_steps"}`` at most every ``interval_s`` seconds.

    The final step is always sent.
    """

    def __init__(self, job: dict[str, Any], send: Sender | None, interval_s: float) -> None:
        self._job = job
        self._send = send
        self._interval_s = interval_s
        self._last_sent = float("-inf")

    def step(self, done: int, total: int, stage: str = "generating") -> None:
        """Report that ``done`` of ``total`` steps have finished."""
        now = time.monotonic()
        if self._send is None or (done < total and now - self._last_sent < self._interval_s):
            return
        self._last_sent = now
        self._send(self._job, {"stage": stage, "step": done, "total_steps": total})
