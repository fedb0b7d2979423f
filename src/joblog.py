"""One structured (JSON) log line per job stage, with secrets and signed URLs kept out."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from src.timing import Stopwatch

log = logging.getLogger("worker.job")

PROMPT_CHARS = 80
_URL_QUERY = re.compile(r"(?P<base>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"]*)[?#][^\s'\"]*")
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")


def redact(text: str) -> str:
    """``text`` with URL query strings (signatures, tokens) and user:password@ parts removed."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _URL_QUERY.sub(r"\g<base>?<redacted>", text)


def preview(prompt: object) -> str | None:
    """A prompt cut to a loggable length (None when it is not text)."""
    if not isinstance(prompt, str) or len(prompt) <= PROMPT_CHARS:
        return prompt if isinstance(prompt, str) else None
    return prompt[:PROMPT_CHARS] + f"...(+{len(prompt) - PROMPT_CHARS} chars)"


class JobLog:
    """Logs ``{"event": "job", "stage": ..., "job_id", "type", "stage_s", "elapsed_s", ...}``."""

    def __init__(self, job_id: str | None, job_type: Any) -> None:
        self.job_id = job_id
        self.job_type = job_type if isinstance(job_type, str) else None
        self._clock = Stopwatch()

    def bind(self, job_id: str, job_type: str) -> None:
        """Use the validated id and type from now on."""
        self.job_id, self.job_type = job_id, job_type

    def stage(self, stage: str, level: int = logging.INFO, **fields: Any) -> float:
        """Log one stage; returns the seconds since the job started."""
        stage_s, elapsed_s = self._clock.lap()
        record = {
            "event": "job",
            "stage": stage,
            "job_id": self.job_id,
            "type": self.job_type,
            "stage_s": round(stage_s, 3),
            "elapsed_s": round(elapsed_s, 3),
            **fields,
        }
        log.log(level, redact(json.dumps(record, ensure_ascii=False, default=str)))
        return elapsed_s
