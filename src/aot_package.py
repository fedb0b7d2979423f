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
  that agreed gets a record beside it (its SHA-256 and the errors measured): later starts load a
  file with that digest without checking it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.utils._pytree as pytree

log = logging.getLogger(__name__)

MAX_RELATIVE_ERROR = 2e-2  # compiled vs eager on the same inputs (fp16 rounding is ~1e-3)
# No weights in the package, and no constants derived from them: runtime constant folding would
# materialise every transposed Linear weight (a 4.3 GiB copy of the UNet on the H100) for no speed.
INDUCTOR_CONFIGS: dict[str, Any] = {
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.use_runtime_constant_folding": False,
}

# Extra settings for packages with convolutions (the SDXL UNet and VAE decode): channels-last
# convolutions. Inductor picks that layout only for static shapes, and their batch is dynamic: in
# NCHW, cuDNN transposes every activation to NHWC and back around each convolution. The weights
# are transposed in the graph (a few hundred MB per call; measured: the VAE decode of one image
# 50 -> 38 ms on the H100).
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


def relative_error(got: Any, expected: Any) -> float:
    """The largest ``|got - expected| / |expected|`` (float32) over the outputs; infinite when not finite."""
    errors = []
    for out, reference in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected), strict=True):
        reference = reference.float()
        errors.append(((out.float() - reference).norm() / reference.norm().clamp_min(1e-12)).item())
    error = max(errors)
    return error if math.isfinite(error) else math.inf


def _file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def timed_phase(timings: dict[str, float], name: str, step: Callable[[], Any]) -> Any:
    """Run ``step``, adding its seconds to ``timings[name]``."""
    started = time.perf_counter()
    result = step()
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - started, 2)
    return result


def package_identity(fmt: int, device: torch.device, **specific: Any) -> dict[str, Any]:
    """What a package is specific to: versions, GPU, compiler settings, and what the caller adds
    (dtype, shapes, the model's configuration)."""
    return {
        "format": fmt,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **specific,
        "inductor": INDUCTOR_CONFIGS,
    }


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
    ``identity`` (versions, GPU, configuration) names the file: a package is reused only by the
    same combination. ``inductor``: settings compiled with beside INDUCTOR_CONFIGS (part of the
    identity too).
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
    ) -> None:
        self.name = name
        self.module = module
        self.example = example
        self.dim = dim
        self.dynamic_shapes = dynamic_shapes
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.inductor = inductor or {}
        if self.inductor:
            identity = {**identity, "inductor_extra": self.inductor}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = cache_dir / f"{name}-{digest}.pt2"
        self.record_path = cache_dir / f"{name}-{digest}.checked.json"
        self.runner: Any = None

    def prepare(self, timings: dict[str, float], prefix: str) -> bool:
        """Load the package (or compile and save it) and check it (once per file); True when
        ``runner`` serves.

        Adds the seconds of each phase to ``timings`` (``{prefix}_compile``, ``_load``, ``_check``;
        no ``_check`` for a file checked before).
        Any failure is logged and leaves ``runner`` None: the caller serves eagerly.
        """
        try:
            if self.path.is_file() and self._load_checked(timings, prefix):
                return True
            timed_phase(timings, f"{prefix}_compile", self._compile)
            if self._load_checked(timings, prefix):
                return True
            log.warning("the freshly compiled %s is unusable: serving eagerly", self.name)
        except Exception as err:  # compiling is an optimisation: the worker serves eagerly without it
            log.warning("%s not compiled (%s: %s): serving eagerly", self.name, type(err).__name__, err)
        return False

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
        runner = _Runner(self.path, self.device)
        names = set(runner.get_constant_fqns())
        runner.load_constants({name: t for name, t in self.module.state_dict().items() if name in names})
        return runner

    def _load_checked(self, timings: dict[str, float], prefix: str) -> bool:
        """Load the package and check it against the eager call (once per file); False (logged)
        when either fails."""
        try:
            before = torch.cuda.memory_allocated(self.device) if self.on_gpu else 0
            self.runner = timed_phase(timings, f"{prefix}_load", self._load_runner)
            if self._agrees_once(timings, prefix):
                if self.on_gpu:
                    extra = (torch.cuda.memory_allocated(self.device) - before) / 2**30
                    log.info("%s loaded: %.2f GiB of GPU memory beyond the weights", self.name, extra)
                return True
            log.warning("%s (%s) disagrees with the eager call", self.name, self.path)
        except Exception as err:  # a stale or corrupt package is compiled again
            log.warning("%s (%s) unusable (%s: %s)", self.name, self.path, type(err).__name__, err)
        self.runner = None
        return False

    def _agrees_once(self, timings: dict[str, float], prefix: str) -> bool:
        """True when this very file agreed before (its record), or agrees now (then recorded)."""
        digest = _file_sha256(self.path)
        if self._checked_before(digest):
            log.info("%s: checked against the eager call before (%s)", self.name, self.record_path.name)
            return True
        errors = timed_phase(timings, f"{prefix}_check", self._check)
        if errors is None:
            return False
        self._write_record(digest, errors)
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

    def _checked_before(self, digest: str) -> bool:
        """True when the record says this file (by SHA-256) agreed with the eager call."""
        try:
            return json.loads(self.record_path.read_text())["package_sha256"] == digest
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _write_record(self, digest: str, errors: dict[str, float]) -> None:
        """Record that this file agreed (written atomically). A cache directory that cannot be
        written only means that the next start checks again."""
        record = {"package_sha256": digest, "max_relative_error": MAX_RELATIVE_ERROR, "errors": errors}
        tmp = self.record_path.with_name(f".{self.record_path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, self.record_path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            log.warning("%s: no record written (%s): the next start checks again", self.name, err)

    def _compile(self) -> None:
        """Export at the last checked size (``dim`` dynamic), compile, and write the package atomically."""
        dim = torch.export.Dim(self.dim.name, min=self.dim.low, max=self.dim.high)
        log.info("compiling %s ahead of time (once; saved to %s)", self.name, self.path)
        with torch.inference_mode():
            program = torch.export.export(
                self.module,
                self.example(self.dim.checked[-1]),
                dynamic_shapes=self.dynamic_shapes(dim),
                strict=False,
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".pt2")
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=tmp, inductor_configs={**INDUCTOR_CONFIGS, **self.inductor}
            )
            os.replace(tmp, self.path)
            log.info("%s saved: %s (%.1f MB)", self.name, self.path, self.path.stat().st_size / 1e6)
        finally:
            Path(tmp).unlink(missing_ok=True)
