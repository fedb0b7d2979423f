"""The model families a worker can load: their protocols, the registry, loading and warming them."""

from __future__ import annotations

import importlib
import logging
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from src.job_lock import JobLock
from src.settings import Settings, StartupError
from src.timing import Phases

if TYPE_CHECKING:
    from src.contract import JobRequest
    from src.fast_path import FastPaths
    from src.media.assets import Generation
    from src.progress import Progress

log = logging.getLogger(__name__)

# Family name (as in WORKER_MODELS) -> "module:class", imported only when needed (diffusers, torch).
REGISTRY = {
    "sdxl": "src.sdxl.family:SdxlFamily",
    "wan": "src.wan.family:WanFamily",
    "prompt": "src.prompt.family:PromptFamily",
}


class Family(Protocol):
    """Models a worker loads and warms once, at start-up."""

    name: str
    job_types: frozenset[str]  # the job types it generates (none for ``prompt``)
    fast_paths: FastPaths

    @classmethod
    def load(cls, settings: Settings) -> Family:
        """Load the weights (once, at start-up)."""

    def warm_up(self, phases: Phases) -> None:
        """Prepare the fast paths and run the models once, so the first job pays no first-call cost."""


class ModelFamily(Family, Protocol):
    """A family of models (SDXL, Wan) that generates some job types."""

    config_model: type[BaseModel]  # the job's ``config``
    metadata_model: type[BaseModel]  # the ``metadata`` keys the family reads

    def plan(self, request: JobRequest) -> Any:
        """Validate the family-specific payload; raise JobError naming the field."""

    def generate(self, plan: Any, progress: Progress) -> Generation:
        """Run the models for a plan."""


def check_names(names: list[str]) -> None:
    """Raise StartupError naming WORKER_MODELS for a name not in REGISTRY."""
    for name in names:
        if name not in REGISTRY:
            raise StartupError(
                f"WORKER_MODELS: unknown model family {name!r}; expected one of: {', '.join(REGISTRY)}"
            )


def family_class(name: str) -> type[Family]:
    """The class of the family called ``name`` (imported now)."""
    check_names([name])
    module, _, attribute = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def all_job_types() -> dict[str, str]:
    """Every job type any family serves -> its family's name."""
    return {job_type: name for name in REGISTRY for job_type in family_class(name).job_types}


def ready_order(settings: Settings) -> tuple[list[str], list[str]]:
    """The families loaded before the worker is ready, and those loaded behind it.

    READY_AFTER ``first``: the first family named in WORKER_MODELS that generates jobs (``prompt``
    only rewrites their prompts), then the others in their order; ``all``, and COMPILE ``on`` or
    ``wait`` (their packages are compiled, or refused, before the worker is ready): every family first.
    """
    names = settings.worker_models
    check_names(names)  # every name, before any model loads
    if settings.ready_after == "all" or settings.compile in ("on", "wait"):
        return list(names), []
    first = next(name for name in names if name != "prompt")
    return [first], [name for name in names if name != first]


def load_families(
    settings: Settings, names: list[str], warm_up_lock: JobLock | None = None
) -> tuple[list[Family], dict[str, Any]]:
    """Load and warm the families called ``names``, in order; each warm-up under ``warm_up_lock``
    when given (the worker's job lock, for families loaded behind a ready worker).

    Returns the families and their start-up record: seconds per phase (``load_<family>_s``,
    ``warm_up_<family>_<phase>_s``, ...), ``fast_paths``, what each fast path does (``serving``,
    or ``eager: <why>``), and ``resident_gib``, each family's GPU memory. With COMPILE on, the
    warm-ups load the compiled packages (``wait``/``on``: compiling the missing ones first).
    """
    check_names(names)
    phases = Phases()
    families: list[Family] = []
    resident_gib: dict[str, float] = {}
    for name in names:
        with phases.phase(f"load_{name}"):
            with phases.phase(f"load_{name}_imports"):  # the first import of diffusers and transformers
                cls = family_class(name)
            before = _gpu_bytes()
            families.append(cls.load(settings))
            resident_gib[name] = round((_gpu_bytes() - before) / 2**30, 2)
    fast_paths: dict[str, str] = {}
    for family in families:
        with warm_up_lock or nullcontext():
            fast_paths.update(warm_up(family, phases))
    record: dict[str, Any] = {f"{phase}_s": seconds for phase, seconds in phases.seconds.items()}
    return families, {**record, "fast_paths": fast_paths, "resident_gib": resident_gib}


def warm_up(family: Family, phases: Phases) -> dict[str, str]:
    """Warm ``family`` up, timed into ``phases`` (``warm_up_<family>`` and its own phases); what
    each of its fast paths does."""
    own = Phases()
    with phases.phase(f"warm_up_{family.name}"):
        family.warm_up(own)
    phases.seconds.update({f"warm_up_{family.name}_{phase}": s for phase, s in own.seconds.items()})
    log.info(
        "%s ready: load %.1f s, warm-up %.1f s; fast paths: %s",
        family.name,
        phases.seconds.get(f"load_{family.name}", 0.0),
        phases.seconds[f"warm_up_{family.name}"],
        ", ".join(f"{path} {status}" for path, status in family.fast_paths.status.items()) or "none",
    )
    return dict(family.fast_paths.status)


def _gpu_bytes() -> int:
    """GPU memory allocated by PyTorch (0 without CUDA)."""
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
