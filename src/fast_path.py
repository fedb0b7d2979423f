"""One way to serve a module's calls from a faster runner (a compiled package, a CUDA graph).

- A **fast path** (``FastPath``) is prepared once at start-up: it loads or builds its runner,
  checks it against the module's own call, and returns the routes it installed; or it raises
  ``UnavailableError`` saying why it cannot serve.
- A **route** (``route``) sends a module's call to the runner when the runner serves that call
  (``serves``) and to the module's own class method otherwise; its handle (``Route``) undoes it.
- ``FastPaths`` prepares a family's fast paths and applies the one policy: a path whose setting
  is explicitly ``on`` must serve (else the worker refuses to start); any other falls back to
  the eager call with one log line and says so in the start-up record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree

from src.settings import StartupError
from src.timing import Phases

log = logging.getLogger(__name__)

SERVING = "serving"


class UnavailableError(Exception):
    """A fast path cannot serve; the message says why."""


class FastRunner(Protocol):
    """Runs some of a module's calls faster; takes the same arguments as the module's method."""

    def serves(self, *args: Any, **kwargs: Any) -> bool:
        """True when this call gives what the module's own method would (within float rounding)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The call, answered as the module's own method answers it."""


class FastPath(Protocol):
    """A fast path of a family, prepared once at start-up."""

    name: str  # e.g. "sdxl-unet": the start-up record's key
    setting: str  # the setting that turned it on, e.g. "COMPILE"

    def prepare(self, phases: Phases) -> list[Route]:
        """Load or build the runner, check it, install its routes; raise UnavailableError if it
        cannot serve."""


@dataclass
class Route:
    """A module's method routed to a runner; ``undo`` gives the module its own method back."""

    module: torch.nn.Module
    method: str
    runner: FastRunner
    installed: Any = field(repr=False)

    def undo(self) -> None:
        """Serve every call with the module's own method again."""
        if vars(self.module).get(self.method) is self.installed:
            delattr(self.module, self.method)


def route(module: torch.nn.Module, method: str, runner: FastRunner) -> Route:
    """Send ``module.<method>`` calls to ``runner`` where it serves them, to the class's method elsewhere."""
    own = getattr(type(module), method).__get__(module)

    def routed(*args: Any, **kwargs: Any) -> Any:
        if runner.serves(*args, **kwargs):
            return runner(*args, **kwargs)
        return own(*args, **kwargs)

    setattr(module, method, routed)
    return Route(module, method, runner, routed)


class FastPaths:
    """A family's fast paths: prepared at warm-up; the routes they installed; what each one does."""

    def __init__(self, candidates: Sequence[FastPath], required: frozenset[str] = frozenset()) -> None:
        """``required``: the settings explicitly on (``COMPILE=on``): their paths must serve."""
        self.candidates = list(candidates)
        self.required = required
        self.routes: list[Route] = []
        self.status: dict[str, str] = {}  # name -> "serving" or "eager: <why>"

    def named(self, name: str) -> FastPath:
        """The candidate called ``name``."""
        return next(path for path in self.candidates if path.name == name)

    def prepare(self, phases: Phases) -> None:
        """Prepare every candidate; raise StartupError when a required one cannot serve."""
        for path in self.candidates:
            try:
                self.routes += path.prepare(phases)
            except UnavailableError as err:
                if path.setting in self.required:
                    raise StartupError(
                        f"{path.setting}=on, but {path.name} cannot serve: {err}. "
                        f"Set {path.setting}=auto to serve eagerly instead"
                    ) from None
                log.warning("%s: serving eagerly (%s)", path.name, err)
                self.status[path.name] = f"eager: {err}"
            else:
                self.status[path.name] = SERVING

    def undo(self) -> None:
        """Every module serves with its own methods again."""
        for installed in reversed(self.routes):
            installed.undo()
        self.routes = []


def relative_error(got: Any, expected: Any) -> float:
    """The largest ``|got - expected| / |expected|`` (float32) over the outputs; infinite when not finite."""
    errors = []
    for out, reference in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected), strict=True):
        reference = reference.float()
        errors.append(((out.float() - reference).norm() / reference.norm().clamp_min(1e-12)).item())
    error = max(errors)
    return error if math.isfinite(error) else math.inf


GRAPH_MAX_RELATIVE_ERROR = 1e-3  # a CUDA graph's replay vs eager: the same kernels, so ~0


def check_graph_replay(name: str, error: float) -> None:
    """Raise UnavailableError when a CUDA graph's replay disagrees with the eager call (``error``:
    ``relative_error`` of the two); else log the agreement."""
    if error > GRAPH_MAX_RELATIVE_ERROR:  # infinite when not finite
        raise UnavailableError(f"the CUDA graph's replay disagrees with eager (relative error {error:.3g})")
    log.info("%s: CUDA graph replay vs eager: relative error %.3g", name, error)
