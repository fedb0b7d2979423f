"""The model families this worker can load, by name."""

from __future__ import annotations

import logging
import time

from src.sdxl.plan import DEFAULTS as SDXL_TYPES
from src.settings import Settings
from src.wan.plan import DEFAULTS as WAN_TYPES
from src.worker import ModelFamily

log = logging.getLogger(__name__)

JOB_TYPES = {"sdxl": frozenset(SDXL_TYPES), "wan": frozenset(WAN_TYPES)}
ALL_JOB_TYPES = frozenset().union(*JOB_TYPES.values())


# What the last start-up took, for logs and the benchmark: seconds per phase and family.
STARTUP: dict[str, object] = {}


def load_families(settings: Settings) -> list[ModelFamily]:
    """Load and warm every family named in WORKER_MODELS, once, at start-up.

    With COMPILE on, the compile cache is loaded before the warm-ups (which compile) and
    saved after them when it was missing; then jobs run with compilation off.
    """
    from src import acceleration

    STARTUP.clear()
    device = settings.torch_device
    families: list[ModelFamily] = []
    for name in settings.worker_models:
        started = time.perf_counter()
        families.append(_load(name, settings))
        STARTUP[f"load_{name}_s"] = round(time.perf_counter() - started, 2)
    compiling = acceleration.compile_enabled(settings, device)
    cache = None
    if compiling:
        started = time.perf_counter()
        cache = acceleration.CompileCache.for_worker(settings, device, {})
        STARTUP["compile_cache"] = "loaded" if cache.load() else "missing"
        STARTUP["cache_load_s"] = round(time.perf_counter() - started, 2)
    # Wan's torch.compile warm-up runs before SDXL's ahead-of-time compile: compiling the SDXL
    # package first changes inductor state that keys Wan's cached graphs, so the next worker
    # missed the compile cache (7 of 7 graphs; 7 of 7 hit in this order, tests/test_compile_cache.py).
    for family in sorted(families, key=lambda family: family.name == "sdxl"):
        started = time.perf_counter()
        phases = family.warm_up()
        STARTUP[f"warm_up_{family.name}_s"] = round(time.perf_counter() - started, 2)
        STARTUP.update({f"warm_up_{family.name}_{phase}_s": seconds for phase, seconds in phases.items()})
        log.info(
            "%s ready: load %.1f s, warm-up %.1f s",
            family.name,
            STARTUP[f"load_{family.name}_s"],
            STARTUP[f"warm_up_{family.name}_s"],
        )
    if cache is not None:
        if not cache.loaded:
            started = time.perf_counter()
            STARTUP["compile_cache"] = "saved" if cache.save() else "not saved"
            STARTUP["cache_save_s"] = round(time.perf_counter() - started, 2)
        acceleration.serve_without_compiling()
    return families


def _load(name: str, settings: Settings) -> ModelFamily:
    if name == "sdxl":
        from src.sdxl.family import SdxlFamily

        return SdxlFamily.load(settings)
    from src.wan.family import WanFamily

    return WanFamily.load(settings)
