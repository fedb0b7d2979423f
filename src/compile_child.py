"""The background compiler's child process: ``python -m src.compile_child <family> <path>...``.

Reads the worker's settings (JSON, one line on stdin), loads the family as the worker does, and
prepares only the named fast paths, one at a time, with ``COMPILE=wait``: each missing package is
compiled (or waited for, when another worker holds its lock), checked against the eager model and
saved into COMPILE_CACHE_DIR. Prints one JSON line per path (``{"path", "status"}``) as soon as it
is done, then ``{"peak_gib"}``; everything else goes to the log (stderr).
"""

from __future__ import annotations

import json
import os
import sys

from src.acceleration import configure_cuda_allocator
from src.console import configure_console
from src.settings import Settings

NICENESS = 10  # below the worker's jobs: compiling takes the CPU time they leave


def _say(report: dict[str, object]) -> None:
    print(json.dumps(report), flush=True)


def main(argv: list[str]) -> None:
    family_name, *paths = argv
    os.nice(NICENESS)
    settings = Settings(
        **{
            **json.loads(sys.stdin.readline()),
            "compile": "wait",
            "cuda_graphs": False,
            "worker_models": [family_name],
        }
    )
    configure_console(settings.log_level)
    configure_cuda_allocator()
    import torch

    from src.families import family_class
    from src.timing import Phases

    family = family_class(family_name).load(settings)
    family.fast_paths.keep(paths)
    family.fast_paths.report = lambda name, status: _say({"path": name, "status": status})
    family.warm_up(Phases())
    peak = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0
    _say({"peak_gib": round(peak, 2)})


if __name__ == "__main__":
    main(sys.argv[1:])
