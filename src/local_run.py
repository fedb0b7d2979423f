"""``python handler.py --test_input '<job JSON>'``: one job, run locally, its result printed as JSON.

The argument is checked before any model loads: JSON that does not parse, or a file name given
instead of the JSON, ends the process with one line. The job runs through the runpod SDK's own
job runner (``run_job``, as on RunPod); its result (``{"output": ...}``, plus ``"error"`` when
the job failed) is the only thing printed on stdout, so it pipes into ``jq``. Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

FLAG = "--test_input"
LOCAL_JOB_ID = "local_test"


class LocalInputError(ValueError):
    """``--test_input`` cannot be run; the message says why, in one line."""


def read_test_input(argv: list[str]) -> dict[str, Any] | None:
    """The job ``--test_input`` carries (``--test_input VALUE`` or ``--test_input=VALUE``), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == FLAG:
            if i + 1 >= len(argv):
                raise LocalInputError(f"{FLAG} needs the job's JSON as its value")
            value = argv[i + 1]
        elif arg.startswith(f"{FLAG}="):
            value = arg.partition("=")[2]
    if value is None:
        return None
    try:
        job = json.loads(value)
    except json.JSONDecodeError as err:
        if _is_file(value):
            raise LocalInputError(
                f"{FLAG} takes the job's JSON, not a file name: pass its contents "
                f'({FLAG} "$(cat {value})") or run make run INPUT={value}'
            ) from None
        where = f"line {err.lineno} column {err.colno}"
        raise LocalInputError(f"{FLAG} is not valid JSON: {where}: {err.msg}") from None
    if not isinstance(job, dict) or not isinstance(job.get("input"), dict):
        raise LocalInputError(f'{FLAG} must be a JSON object with an "input" object: {{"input": {{...}}}}')
    return job


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except OSError:  # a name too long for the file system is no file
        return False


def run_test_input(handler: Any, job: dict[str, Any]) -> int:
    """Run ``job`` through the SDK's job runner, print its result as JSON; 0 when it completed."""
    from src.runpod_sdk import runpod

    job = {"id": LOCAL_JOB_ID, **job}
    with contextlib.redirect_stdout(sys.stderr):  # the SDK's own log lines print to stdout
        result = asyncio.run(runpod.serverless.modules.rp_job.run_job(handler, job))
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 1 if result.get("error") else 0
