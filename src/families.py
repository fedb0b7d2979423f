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


def load_families(settings: Settings) -> list[ModelFamily]:
    """Load and warm every family named in WORKER_MODELS, once, at start-up."""
    families: list[ModelFamily] = []
    for name in settings.worker_models:
        started = time.perf_counter()
        family = _load(name, settings)
        loaded = time.perf_counter()
        family.warm_up()
        log.info(
            "%s ready: load %.1f s, warm-up %.1f s",
            name,
            loaded - started,
            time.perf_counter() - loaded,
        )
        families.append(family)
    return families


def _load(name: str, settings: Settings) -> ModelFamily:
    if name == "sdxl":
        from src.sdxl.family import SdxlFamily

        return SdxlFamily.load(settings)
    from src.wan.family import WanFamily

    return WanFamily.load(settings)
