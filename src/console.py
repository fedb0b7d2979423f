"""What the worker prints: log levels, library warnings and progress bars (LOG_LEVEL).

Called once at start, before diffusers and transformers are imported (their import-time warnings
read the verbosity from the environment). Below DEBUG, library warnings that mean nothing to a
user and weight-loading progress bars are hidden; the runpod SDK logs at the same level.
"""

from __future__ import annotations

import logging
import os
import warnings

# The runpod SDK's names for the logging levels.
RUNPOD_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARN", "ERROR": "ERROR"}
LIBRARIES = ("diffusers", "transformers", "torch", "huggingface_hub", "accelerate", "peft")


def configure_console(level: str) -> None:
    """Log at ``level`` (the worker's records and the runpod SDK's); quiet the libraries below DEBUG."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from src.runpod_sdk import runpod

    runpod.serverless.modules.rp_logger.RunPodLogger.level = RUNPOD_LEVELS[level]
    if level == "DEBUG":
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for library in LIBRARIES:
        logging.getLogger(library).setLevel(max(logging.ERROR, logging.getLevelName(level)))
        warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")
    from diffusers.utils import logging as diffusers_logging  # after the variables above: it reads them

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components"; transformers reads the variable
