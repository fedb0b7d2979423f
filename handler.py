"""RunPod serverless entry point: load settings, warm the model families, serve jobs.

``--test_input '<job JSON>'`` runs one job locally and prints its result as JSON (src/local_run.py);
``--rp_serve_api`` serves the runpod SDK's local API; otherwise the worker takes RunPod's jobs.
"""

import sys

from src.local_run import LocalInputError, read_test_input, run_test_input
from src.runpod_sdk import runpod  # first: the SDK without its CPU probe (src/runpod_sdk.py)
from src.settings import StartupError, load_settings


def main() -> None:
    """Start the worker; exit with one clear line if it cannot start."""
    try:
        test_input = read_test_input(sys.argv[1:])  # checked before any model loads
    except LocalInputError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    try:
        settings = load_settings()
        from src.console import configure_console

        configure_console(settings.log_level)
        from src.worker import start_worker  # torch, diffusers: after the console is set up

        worker = start_worker(settings)
    except StartupError as err:
        print(f"worker cannot start: {err}", file=sys.stderr)
        sys.exit(1)
    if test_input is not None:
        sys.exit(run_test_input(worker.handle, test_input))
    runpod.serverless.start({"handler": worker.handle})


if __name__ == "__main__":
    main()
