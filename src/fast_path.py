"""One way to serve a module's calls from a faster runner (a compiled package, a CUDA graph).

- A **fast path** (``FastPath``) is prepared once at start-up: it loads or builds its runner,
  checks it against the module's own call, and returns the routes it installed; or it raises
  ``UnavailableError`` saying why it cannot serve.
- A **route** (``route``) sends a module's call to the runner when the runner serves that call
  (``serves``) and to the module's own class method otherwise; its handle (``Route``) undoes it.
- ``FastPaths`` prepares a family's fast paths and applies the one policy: a path whose setting
  is explicitly ``on`` must serve (else the worker refuses to start); any other falls back to
  the eager call with one log line and says so in the start-up record. A path whose package is
  compiled in the background (``PackageMissingError``) is activated between jobs once it is there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.utils._pytree as pytree

from src.settings import StartupError
from src.timing import Phases

if TYPE_CHECKING:
    from src.compile_cache import CacheEntry

log = logging.getLogger(__name__)

SERVING = "serving"
BACKGROUND = "eager: compiling in the background"


class UnavailableError(Exception):
    """A fast path cannot serve; the message says why."""


class PackageMissingError(UnavailableError):
    """A compiled path has no usable package yet and does not compile here (the background
    compiler does: ``src/background.py``); ``entry``: where the package goes."""

    def __init__(self, message: str, entry: CacheEntry) -> None:
        super().__init__(message)
        self.entry = entry


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
    """A module's method routed to a runner; ``undo`` gives the module its own method back.

    ``served``: the calls the runner answered so far.
    """

    module: torch.nn.Module
    method: str
    runner: FastRunner
    installed: Any = field(default=None, repr=False)
    served: int = 0

    def undo(self) -> None:
        """Serve every call with the module's own method again."""
        if vars(self.module).get(self.method) is self.installed:
            delattr(self.module, self.method)


def route(module: torch.nn.Module, method: str, runner: FastRunner) -> Route:
    """Send ``module.<method>`` calls to ``runner`` where it serves them, to the class's method elsewhere."""
    own = getattr(type(module), method).__get__(module)
    handle = Route(module, method, runner)

    def routed(*args: Any, **kwargs: Any) -> Any:
        if runner.serves(*args, **kwargs):
            handle.served += 1
            return runner(*args, **kwargs)
        return own(*args, **kwargs)

    handle.installed = routed
    setattr(module, method, routed)
    return handle


class FastPaths:
    """A family's fast paths: prepared at warm-up; the routes they installed; what each one does."""

    def __init__(self, candidates: Sequence[FastPath], required: frozenset[str] = frozenset()) -> None:
        """``required``: the settings explicitly on (``COMPILE=on``): their paths must serve."""
        self.candidates = list(candidates)
        self.required = required
        self.routes_of: dict[str, list[Route]] = {}  # path name -> the routes it installed
        self.status: dict[str, str] = {}  # name -> "serving" or "eager: <why>"
        self.missing: dict[str, CacheEntry] = {}  # paths waiting for a package compiled in the background
        self.report: Callable[[str, str], None] | None = None  # told each path's status once prepared

    @property
    def routes(self) -> list[Route]:
        return [installed for routes in self.routes_of.values() for installed in routes]

    def named(self, name: str) -> FastPath:
        """The candidate called ``name``."""
        return next(path for path in self.candidates if path.name == name)

    def keep(self, names: Sequence[str]) -> None:
        """Prepare only the candidates called ``names`` (the background compiler's child)."""
        self.candidates = [path for path in self.candidates if path.name in names]

    def prepare(self, phases: Phases) -> None:
        """Prepare every candidate; raise StartupError when a required one cannot serve."""
        for path in self.candidates:
            try:
                self.routes_of[path.name] = path.prepare(phases)
            except PackageMissingError as err:
                log.info("%s: serving eagerly until its package is compiled (%s)", path.name, err)
                self.missing[path.name] = err.entry
                self.status[path.name] = BACKGROUND
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
            if self.report is not None:
                self.report(path.name, self.status[path.name])

    def activate(self, name: str, phases: Phases) -> bool:
        """Between jobs: prepare the path ``name`` again (its package now compiled); True when it serves."""
        del self.missing[name]
        try:
            self.routes_of[name] = self.named(name).prepare(phases)
        except UnavailableError as err:
            log.warning("%s: still serving eagerly (%s)", name, err)
            self.status[name] = f"eager: {err}"
            return False
        self.status[name] = SERVING
        return True

    def give_up(self, name: str, why: str) -> None:
        """The path ``name`` stays eager: its package is not compiled in the background (``why``)."""
        del self.missing[name]
        self.status[name] = f"eager: {why}"

    def compiled_routes(self) -> list[Route]:
        """The routes installed by the paths of the ``COMPILE`` setting (compiled packages)."""
        return [
            installed
            for name, routes in self.routes_of.items()
            if self.named(name).setting == "COMPILE"
            for installed in routes
        ]

    def compiled_calls(self) -> int:
        """Calls answered so far by compiled packages."""
        return sum(installed.served for installed in self.compiled_routes())

    def undo(self) -> None:
        """Every module serves with its own methods again."""
        for installed in reversed(self.routes):
            installed.undo()
        self.routes_of = {}


GRAPH_MAX_RELATIVE_ERROR = 1e-3  # a CUDA graph's replay vs eager: the same kernels, so ~0


def check_graph_replay(name: str, error: float) -> None:
    """Raise UnavailableError when a CUDA graph's replay disagrees with the eager call (``error``:
    ``relative_error`` of the two); else log the agreement."""
    if error > GRAPH_MAX_RELATIVE_ERROR:  # infinite when not finite
        raise UnavailableError(f"the CUDA graph's replay disagrees with eager (relative error {error:.3g})")
    log.info("%s: CUDA graph replay vs eager: relative error %.3g", name, error)


def relative_error(got: Any, expected: Any) -> float:
    """The largest ``|got - expected| / |expected|`` (float32) over the outputs; infinite when not finite."""
    errors = []
    for out, reference in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected), strict=True):
        reference = reference.float()
        errors.append(((out.float() - reference).norm() / reference.norm().clamp_min(1e-12)).item())
    error = max(errors)
    return error if math.isfinite(error) else math.inf
