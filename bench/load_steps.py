"""Where a worker's load time goes (GPU only): each step of what loading SDXL does, timed apart.

    python -m bench.load_steps --models /tmp/bench-models [--prefetch]

Prints the seconds of ``import torch``, ``import diffusers, transformers``, the families' modules
(pipelines, models, runpod), CUDA initialisation and SDXL's ``from_pretrained`` onto the GPU.
Run it in a fresh process each time (imports are what it measures); under ``python -m cProfile
-s cumtime`` it also names what the imports spend their time on (docs/PERFORMANCE.md).
``--prefetch``: the worker's weight prefetch (``src/prefetch.py``, the families of WORKER_MODELS
under MODELS_DIR) reads beside the imports, as in ``start_worker``: run with and without it,
alternately, to see what it costs the imports.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument("--prefetch", action="store_true", help="the weight prefetch beside the imports")
    args = parser.parse_args()
    started = time.time()
    import torch

    if args.prefetch:
        from src.families import ready_order
        from src.prefetch import WeightPrefetch
        from src.settings import load_settings

        settings = load_settings()
        WeightPrefetch.start_for(settings, *ready_order(settings))

    torch_s = time.time()
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    libraries_s = time.time()
    from src.sdxl.family import SdxlFamily  # noqa: F401
    from src.wan.family import WanFamily  # noqa: F401

    modules_s = time.time()
    torch.zeros(1, device="cuda")
    cuda_s = time.time()
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.from_pretrained(args.models / "sdxl", dtype=torch.float16, device_map="cuda")
    torch.cuda.synchronize()
    done = time.time()
    print(
        f"prefetch {'on' if args.prefetch else 'off'}: torch {torch_s - started:.2f} "
        f"diffusers+transformers {libraries_s - torch_s:.2f} "
        f"families' modules {modules_s - libraries_s:.2f} cuda init {cuda_s - modules_s:.2f} "
        f"sdxl from_pretrained {done - cuda_s:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
