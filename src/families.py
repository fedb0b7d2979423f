"""The model families this worker can load, by name."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from src.sdxl.plan import DEFAULTS as SDXL_TYPES
from src.settings import Settings
from src.wan.plan import DEFAULTS as WAN_TYPES
from src.worker import ModelFamily

if TYPE_CHECKING:
    from src.sdxl.family import SdxlFamily
    from src.wan.family import WanFamily

log = logging.getLogger(__name__)

JOB_TYPES = {"sdxl": frozenset(SDXL_TYPES), "wan": frozenset(WAN_TYPES)}
ALL_JOB_TYPES = frozenset().union(*JOB_TYPES.values())


# What the last start-up took, for logs and the benchmark: seconds per phase and family.
STARTUP: dict[str, object] = {}


def load_families(settings: Settings) -> list[ModelFamily]:
    """Load and warm every family named in WORKER_MODELS, once, at start-up.

    With COMPILE on, the warm-ups load the compiled packages (compiling them the first time).
    """
    STARTUP.clear()
    families: list[ModelFamily] = []
    for name in settings.worker_models:
        started = time.perf_counter()
        family_class = _family_class(name)  # the first import of diffusers and transformers: seconds
        imported = time.perf_counter()
        families.append(family_class.load(settings))
        STARTUP[f"load_{name}_s"] = round(time.perf_counter() - started, 2)
        STARTUP[f"load_{name}_imports_s"] = round(imported - started, 2)
    for family in families:
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
    return families


def _family_class(name: str) -> type[SdxlFamily] | type[WanFamily]:
    if name == "sdxl":
        from src.sdxl.family import SdxlFamily

        return SdxlFamily
    from src.wan.family import WanFamily

    return WanFamily
