"""The model families a worker can load: their protocols, the registry, loading and warming them."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

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


def load_families(settings: Settings) -> tuple[list[Family], dict[str, Any]]:
    """Load and warm every family named in WORKER_MODELS, once, at start-up.

    Returns the families and the start-up record: seconds per phase (``load_<family>_s``,
    ``warm_up_<family>_<phase>_s``, ...), ``fast_paths``, what each fast path does (``serving``,
    or ``eager: <why>``), and ``resident_gib``, each family's GPU memory. With COMPILE on, the
    warm-ups load the compiled packages (``wait``/``on``: compiling the missing ones first).
    """
    check_names(settings.worker_models)  # before any model loads
    phases = Phases()
    families: list[Family] = []
    resident_gib: dict[str, float] = {}
    for name in settings.worker_models:
        with phases.phase(f"load_{name}"):
            with phases.phase(f"load_{name}_imports"):  # the first import of diffusers and transformers
                cls = family_class(name)
            before = _gpu_bytes()
            families.append(cls.load(settings))
            resident_gib[name] = round((_gpu_bytes() - before) / 2**30, 2)
    fast_paths: dict[str, str] = {}
    for family in families:
        warm_up = Phases()
        with phases.phase(f"warm_up_{family.name}"):
            family.warm_up(warm_up)
        phases.seconds.update({f"warm_up_{family.name}_{phase}": s for phase, s in warm_up.seconds.items()})
        fast_paths.update(family.fast_paths.status)
        log.info(
            "%s ready: load %.1f s, warm-up %.1f s; fast paths: %s",
            family.name,
            phases.seconds[f"load_{family.name}"],
            phases.seconds[f"warm_up_{family.name}"],
            ", ".join(f"{path} {status}" for path, status in family.fast_paths.status.items()) or "none",
        )
    record: dict[str, Any] = {f"{phase}_s": seconds for phase, seconds in phases.seconds.items()}
    return families, {**record, "fast_paths": fast_paths, "resident_gib": resident_gib}


def _gpu_bytes() -> int:
    """GPU memory allocated by PyTorch (0 without CUDA)."""
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
