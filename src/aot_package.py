"""One module call compiled ahead of time (AOTInductor) into a package without weights.

- The call is exported with ``torch.export`` at fixed shapes except one dynamic dimension (the
  batch of the SDXL UNet, the tokens of a Wan block), and compiled by AOTInductor into a ``.pt2``
  package **without weights**, saved under ``COMPILE_CACHE_DIR`` and loaded by the next worker:
  no tracing, no compile.
- The package runs on the live module's own tensors (user-managed constants, or weights passed
  as inputs) and derives none from them: no copy, no GPU memory beyond the weights, any
  checkpoint of the architecture.
- A loaded package is checked against the eager call on random inputs before it serves; a
  package that disagrees or does not load (a stale or corrupt file) is compiled again. A package
  that agreed gets a record beside it (``src/compile_cache.py``): later starts load a file with
  that digest without checking it again.
- One worker compiles a package at a time (``src/compile_lock.py``); the others wait for it. With
  ``compile_missing`` off, a missing package is not compiled here: ``PackageMissingError`` (the
  background compiler's child compiles it: ``src/background.py``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from src.compile_cache import CacheEntry
from src.compile_lock import PackageLock
from src.fast_path import PackageMissingError, UnavailableError, relative_error
from src.timing import Phases

log = logging.getLogger(__name__)

MAX_RELATIVE_ERROR = 2e-2  # compiled vs eager on the same inputs (fp16 rounding is ~1e-3)
# No weights in the package, and no constants derived from them: runtime constant folding would
# materialise a transposed copy of every Linear weight (gigabytes for the UNet) for no speed.
INDUCTOR_CONFIGS: dict[str, Any] = {
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.use_runtime_constant_folding": False,
}

# Extra settings for packages with convolutions (the SDXL UNet and VAE decode): channels-last
# convolutions. Inductor picks that layout only for static shapes, and their batch is dynamic: in
# NCHW, cuDNN transposes every activation to NHWC and back around each convolution. The weights
# are transposed in the graph (a few hundred MB per call; measured faster: docs/PERFORMANCE.md).
CHANNELS_LAST: dict[str, Any] = {"force_layout_optimization": True}

# Instances of the compiled model in a loaded package; they share the constants. A call waits
# until the instance it gets has finished its previous run on the GPU: with one instance, each
# call (a denoising step, a Wan block) would wait for the previous one to finish before
# launching its kernels; with two, it is queued while the previous one runs.
MODEL_INSTANCES = 2

Inputs = tuple[Any, ...]  # tensors, or lists of tensors


@dataclass(frozen=True)
class DynamicDim:
    """The one dimension a package takes at any size in ``[low, high]``.

    ``checked``: the sizes a loaded package is checked at against the eager call; the last one
    is the size exported, which inductor tunes its kernels for.
    """

    name: str
    low: int
    high: int
    checked: tuple[int, ...]


class _Runner:
    """A loaded package, called like the exported module; its output structure is parsed once.

    The loader is built directly: ``aoti_load_package`` would first dry-compile CPU feature
    probes with the C++ compiler, for a warning only (pytorch/pytorch#191715).
    """

    def __init__(self, path: Path, device: torch.device) -> None:
        from torch.export.pt2_archive._package import AOTICompiledModel

        index = (device.index or 0) if device.type == "cuda" else -1
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, MODEL_INSTANCES, index)
        self.model = AOTICompiledModel(loader)
        self.out_spec = pytree.treespec_loads(self.model.loader.get_call_spec()[1])

    def __call__(self, *inputs: Any) -> Any:
        # The compiled code reads every input in the example's layout (contiguous): a transposed
        # view (the Wan patch embedding's output, passed to the first block) is copied first.
        flat = [tensor.contiguous() for tensor in pytree.tree_leaves(inputs)]
        return pytree.tree_unflatten(self.model.loader.boxed_run(flat), self.out_spec)

    def get_constant_fqns(self) -> list[str]:
        return self.model.get_constant_fqns()

    def load_constants(self, tensors: dict[str, torch.Tensor]) -> None:
        """Run on these tensors (every constant the package names), without copying them."""
        self.model.load_constants(tensors, check_full_update=True, user_managed=True)


class AotPackage:
    """An AOTInductor package of ``module`` (tensors in, tensors out), one dimension dynamic.

    ``example(size)`` gives random inputs of the served shapes, ``dim`` at ``size``;
    ``dynamic_shapes(dim)`` marks where ``dim`` is in them (``torch.export``'s ``dynamic_shapes``).
    ``identity`` (``compile_cache.package_identity``) names the file, with the compiler settings:
    INDUCTOR_CONFIGS and ``inductor``, settings for this package only. ``compile_missing``: compile
    a missing or unusable package in ``prepare`` (else raise PackageMissingError).
    """

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        example: Callable[[int], Inputs],
        dim: DynamicDim,
        dynamic_shapes: Callable[[torch.export.Dim], Any],
        identity: dict[str, Any],
        cache_dir: Path,
        device: torch.device,
        inductor: dict[str, Any] | None = None,
        compile_missing: bool = True,
    ) -> None:
        self.name = name
        self.module = module
        self.example = example
        self.dim = dim
        self.dynamic_shapes = dynamic_shapes
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.inductor = inductor or {}
        identity = {**identity, "inductor": INDUCTOR_CONFIGS}
        if self.inductor:
            identity["inductor_extra"] = self.inductor
        self.cache = CacheEntry(cache_dir, name, identity)
        self.compile_missing = compile_missing
        self.runner: Any = None

    def prepare(self, phases: Phases, prefix: str) -> None:
        """Load the package (or compile and save it) and check it (once per file): then ``runner``
        serves.

        Times ``{prefix}_compile``, ``_wait`` (for another worker's compile), ``_load`` and
        ``_check`` (no ``_check`` for a file checked before). Raises PackageMissingError when no usable
        package is there and ``compile_missing`` is off, UnavailableError (with the reason) when
        none results.
        """
        problem = self._load_checked(phases, prefix) if self.cache.path.is_file() else "no package yet"
        if problem is None:
            return
        if not self.compile_missing:
            raise PackageMissingError(f"{self.name}: {problem}", self.cache)
        try:
            problem = self._compile_once(phases, prefix)
        except Exception as err:  # compiling is an optimisation: the caller decides what a failure means
            problem = f"not compiled ({type(err).__name__}: {err})"
        if problem is not None:
            raise UnavailableError(f"{self.name}: {problem}")

    def _compile_once(self, phases: Phases, prefix: str) -> str | None:
        """Compile and save the package, or wait for the worker that holds its lock and load theirs;
        then load and check it. What is wrong with it, or None when it serves."""
        lock = PackageLock(self.cache.lock_path)
        while not lock.try_acquire():
            log.info("%s: another worker is compiling it (%s): waiting", self.name, lock.path)
            with phases.phase(f"{prefix}_wait"):
                lock.wait()
            if self.cache.path.is_file() and self._load_checked(phases, prefix) is None:
                return None
        try:  # held until the package is checked: a worker that waited trusts its record
            with phases.phase(f"{prefix}_compile"):
                self._compile()
            return self._load_checked(phases, prefix)
        finally:
            lock.release()

    def run(self, inputs: Inputs, label: str) -> Any:
        """The package on ``inputs``; on the GPU, a failure is reported as the device's.

        The inputs were checked by the caller, so a failure is the device's: AOTInductor reports
        CUDA errors, out-of-memory too, as a generic "API call failed"; the message says "CUDA
        error" so that the worker is replaced (``src/faults.py``).
        """
        try:
            return self.runner(*inputs)
        except RuntimeError as err:
            if not self.on_gpu:
                raise
            raise RuntimeError(f"CUDA error in the compiled {label}: {err}") from err

    def _load_runner(self) -> _Runner:
        """A new runner of the package on the module's own tensors."""
        runner = _Runner(self.cache.path, self.device)
        names = set(runner.get_constant_fqns())
        runner.load_constants({name: t for name, t in self.module.state_dict().items() if name in names})
        return runner

    def _load_checked(self, phases: Phases, prefix: str) -> str | None:
        """Load the package and check it against the eager call (once per file); what is wrong
        with it (logged), or None when it serves."""
        try:
            before = torch.cuda.memory_allocated(self.device) if self.on_gpu else 0
            with phases.phase(f"{prefix}_load"):
                self.runner = self._load_runner()
            if self._agrees_once(phases, prefix):
                if self.on_gpu:
                    extra = (torch.cuda.memory_allocated(self.device) - before) / 2**30
                    log.info("%s loaded: %.2f GiB of GPU memory beyond the weights", self.name, extra)
                return None
            problem = f"disagrees with the eager call (over {MAX_RELATIVE_ERROR:g} relative error)"
        except Exception as err:  # a stale or corrupt package is compiled again
            problem = f"unusable ({type(err).__name__}: {err})"
        log.warning("%s (%s) %s", self.name, self.cache.path, problem)
        self.runner = None
        return problem

    def _agrees_once(self, phases: Phases, prefix: str) -> bool:
        """True when this very file agreed before (its record), or agrees now (then recorded)."""
        digest = self.cache.sha256()
        if self.cache.checked_before(digest):
            log.info("%s: checked against the eager call before (%s)", self.name, self.cache.record_path.name)
            return True
        with phases.phase(f"{prefix}_check"):
            errors = self._check()
        if errors is None:
            return False
        self.cache.write_record(digest, MAX_RELATIVE_ERROR, errors)
        return True

    def _check(self) -> dict[str, float] | None:
        """Compiled vs eager on random inputs: the relative error at each checked size, or None
        when one is over MAX_RELATIVE_ERROR."""
        errors: dict[str, float] = {}
        with torch.inference_mode():
            for size in self.dim.checked:
                inputs = self.example(size)
                error = relative_error(self.runner(*inputs), self.module(*inputs))
                level = logging.WARNING if error > MAX_RELATIVE_ERROR else logging.INFO
                where = f"{self.dim.name} {size}"
                log.log(level, "%s vs eager: relative error %.3g at %s", self.name, error, where)
                if error > MAX_RELATIVE_ERROR:
                    return None
                errors[where] = error
        return errors

    def _compile(self) -> None:
        """Export at the last checked size (``dim`` dynamic), compile, and write the package atomically."""
        path = self.cache.path
        dim = torch.export.Dim(self.dim.name, min=self.dim.low, max=self.dim.high)
        log.info("compiling %s ahead of time (once; saved to %s)", self.name, path)
        with torch.inference_mode():
            program = torch.export.export(
                self.module,
                self.example(self.dim.checked[-1]),
                dynamic_shapes=self.dynamic_shapes(dim),
                strict=False,
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".pt2")
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=tmp, inductor_configs={**INDUCTOR_CONFIGS, **self.inductor}
            )
            os.replace(tmp, path)
            log.info("%s saved: %s (%.1f MB)", self.name, path, path.stat().st_size / 1e6)
        finally:
            Path(tmp).unlink(missing_ok=True)
