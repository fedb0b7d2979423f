"""RunPod serverless entry point: load settings, warm the model families, serve jobs."""

import logging
import sys

from src.runpod_sdk import runpod
from src.settings import StartupError, load_settings
from src.worker import start_worker


def main() -> None:
    """Start the worker; exit with one clear message if it cannot start."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        worker = start_worker(load_settings())
    except StartupError as err:
        print(f"worker cannot start: {err}", file=sys.stderr)
        sys.exit(1)
    runpod.serverless.start({"handler": worker.handle})


if __name__ == "__main__":
    main()
