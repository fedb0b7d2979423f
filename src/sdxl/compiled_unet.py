"""The SDXL UNet compiled ahead of time (AOTInductor): compiled once, loaded in seconds.

- The UNet is exported with ``torch.export`` at one latent size (1024x1024 images), its batch
  dimension dynamic (1-16 rows: ``num_images`` 1-8, with or without CFG), and compiled by
  AOTInductor into a ``.pt2`` package **without weights**. The package is saved under
  ``COMPILE_CACHE_DIR`` and loaded by the next worker: no tracing and no compile at start-up.
- The package runs on the live UNet's own tensors (user-managed constants) and derives none from
  them: no copy, no GPU memory beyond the UNet's weights, any checkpoint of the architecture.
- A loaded package is checked against the eager UNet on random inputs before it serves; a
  package that disagrees or does not load (a stale or corrupt file) is compiled again.
- Calls it was not compiled for (other sizes, ControlNet residuals, ...) run the eager UNet.
- On CUDA, one-image calls replay CUDA graphs of the package (``src/sdxl/cuda_graphs.py``).
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
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from src.sdxl.cuda_graphs import GraphedCall

log = logging.getLogger(__name__)

MAX_BATCH = 16  # 8 images x 2 CFG rows
TEXT_TOKENS = 77  # CLIP's context length: SDXL prompt embeddings always have 77 rows
GRAPHED_BATCHES = (1, 2)  # one image, without and with CFG: CUDA graphs on GPU
MAX_RELATIVE_ERROR = 2e-2  # compiled vs eager on the same inputs (fp16 rounding is ~1e-3)
FORMAT = 1  # bump when the exported signature changes
# No weights in the package, and no constants derived from them: runtime constant folding would
# materialise every transposed Linear weight (a 4.3 GiB copy of the UNet on the H100) for no speed.
INDUCTOR_CONFIGS: dict[str, Any] = {
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.use_runtime_constant_folding": False,
}
# Keyword arguments the pipelines pass that the compiled graph covers when they are None.
_NONE_KWARGS = (
    "timestep_cond",
    "attention_mask",
    "cross_attention_kwargs",
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
    "encoder_attention_mask",
)


def _gpu_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class _Exported(torch.nn.Module):
    """The UNet call the SDXL pipelines make, with tensors only (what torch.export takes)."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet  # named "unet" in the package's constants
        self.eager = type(unet).forward.__get__(unet)  # never a compiled forward installed on the instance

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.eager(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


def example_inputs(
    unet: UNet2DConditionModel, latent_size: tuple[int, int], batch: int
) -> tuple[torch.Tensor, ...]:
    """Random inputs of the shapes and dtypes the pipelines pass (the timestep as a float32 scalar)."""
    config, device, dtype = unet.config, unet.device, unet.dtype
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return (
        torch.randn(batch, config.in_channels, *latent_size, device=device, dtype=dtype),
        torch.tensor(999.0, device=device),
        torch.randn(batch, TEXT_TOKENS, config.cross_attention_dim, device=device, dtype=dtype),
        torch.randn(batch, pooled, device=device, dtype=dtype),
        torch.randn(batch, 6, device=device, dtype=dtype),
    )


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``|got - expected| / |expected|`` in float32; infinite when not finite."""
    expected = expected.float()
    error = ((got.float() - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    return error if math.isfinite(error) else math.inf


class CompiledUnet:
    """An AOTInductor package of one UNet at one latent size, and the routing to it."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        latent_size: tuple[int, int],
        cache_dir: Path,
        cuda_graphs: bool = True,
    ) -> None:
        self.unet = unet
        self.latent_size = latent_size
        self.exported = _Exported(unet)  # the call that is compiled, checked against, and named by constants
        self.eager_forward: Callable[..., Any] = self.exported.eager
        self.runner: Any = None
        self.call: Callable[..., torch.Tensor] | None = None  # the runner, or CUDA graphs of it
        device = unet.device
        self.on_gpu = device.type == "cuda"
        self.cuda_graphs = cuda_graphs and self.on_gpu
        identity = {
            "format": FORMAT,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(unet.dtype),
            "latent_size": list(latent_size),
            "max_batch": MAX_BATCH,
            "config": {k: v for k, v in unet.config.items() if not k.startswith("_")},
            "inductor": INDUCTOR_CONFIGS,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = cache_dir / f"sdxl-unet-{digest}.pt2"

    def prepare(self) -> dict[str, float]:
        """Load the package (or compile and save it), check it, and route matching calls to it.

        Returns the seconds each phase took. Any failure leaves the eager UNet serving.
        """
        timings: dict[str, float] = {}
        try:
            if self.path.is_file() and self._load_checked(timings):
                self._install(timings)
                return timings
            self._timed(timings, "aot_compile", self._compile)
            if self._load_checked(timings):
                self._install(timings)
            else:
                log.warning("the freshly compiled UNet is unusable: serving eagerly")
        except Exception as err:  # compiling is an optimisation: the worker serves eagerly without it
            log.warning("SDXL UNet not compiled (%s: %s): serving eagerly", type(err).__name__, err)
        return timings

    def _load_checked(self, timings: dict[str, float]) -> bool:
        """Load the package and check it against the eager UNet; False (logged) when either fails."""
        try:
            before = _gpu_bytes(self.unet.device)
            self._timed(timings, "aot_load", self._load)
            if self._timed(timings, "aot_check", self._agrees):
                extra = (_gpu_bytes(self.unet.device) - before) / 2**30
                log.info("compiled UNet loaded: %.2f GiB of GPU memory beyond the UNet's weights", extra)
                return True
            log.warning("compiled UNet %s disagrees with the eager UNet", self.path)
        except Exception as err:  # a stale or corrupt package is compiled again
            log.warning("compiled UNet %s unusable (%s: %s)", self.path, type(err).__name__, err)
        self.runner = None
        return False

    @staticmethod
    def _timed(timings: dict[str, float], name: str, step: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = step()
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - started, 2)
        return result

    def _compile(self) -> None:
        """Export at batch 2 (batch dynamic), compile, and write the package atomically."""
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        dynamic = ({0: batch}, None, {0: batch}, {0: batch}, {0: batch})
        log.info("compiling the SDXL UNet ahead of time (once; saved to %s)", self.path)
        with torch.inference_mode():
            program = torch.export.export(
                self.exported,
                example_inputs(self.unet, self.latent_size, 2),
                dynamic_shapes=dynamic,
                strict=False,
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".pt2")
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=tmp, inductor_configs=dict(INDUCTOR_CONFIGS)
            )
            os.replace(tmp, self.path)
            log.info("compiled UNet saved: %s (%.1f MB)", self.path, self.path.stat().st_size / 1e6)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _load(self) -> None:
        """Load the package and point its constants at the UNet's own tensors.

        The loader is built directly: ``aoti_load_package`` would first dry-compile CPU
        feature probes with the C++ compiler, for a warning only (pytorch/pytorch#191715).
        """
        from torch.export.pt2_archive._package import AOTICompiledModel

        device = self.unet.device
        index = (device.index or 0) if device.type == "cuda" else -1
        self.runner = AOTICompiledModel(
            torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, 1, index)
        )
        names = set(self.runner.get_constant_fqns())
        tensors = {name: tensor for name, tensor in self.exported.state_dict().items() if name in names}
        self.runner.load_constants(tensors, check_full_update=True, user_managed=True)

    def _agrees(self) -> bool:
        """Compiled vs eager on random inputs at two batch sizes: relative error within MAX_RELATIVE_ERROR."""
        with torch.inference_mode():
            for batch in (1, 2):
                inputs = example_inputs(self.unet, self.latent_size, batch)
                error = _relative_error(self.runner(*inputs), self.exported(*inputs))
                if error > MAX_RELATIVE_ERROR:
                    log.warning("compiled UNet relative error %.3g at batch %d", error, batch)
                    return False
        return True

    def _capture_graphs(self) -> Callable[..., torch.Tensor]:
        """CUDA graphs of the package at GRAPHED_BATCHES, checked against it; the package if that fails."""
        try:
            reserved = torch.cuda.memory_reserved(self.unet.device)
            graphed = GraphedCall(self.runner)
            for batch in GRAPHED_BATCHES:
                graphed.capture(example_inputs(self.unet, self.latent_size, batch))
            with torch.inference_mode():
                for batch in GRAPHED_BATCHES:
                    inputs = example_inputs(self.unet, self.latent_size, batch)
                    if _relative_error(graphed(*inputs), self.runner(*inputs)) > MAX_RELATIVE_ERROR:
                        log.warning("CUDA graphs of the compiled UNet disagree at batch %d: not used", batch)
                        return self.runner
            extra = (torch.cuda.memory_reserved(self.unet.device) - reserved) / 2**30
            log.info("compiled UNet: CUDA graphs for batches %s (%.2f GiB reserved)", GRAPHED_BATCHES, extra)
            return graphed
        except Exception as err:  # graphs are an optimisation: the package serves without them
            log.warning("CUDA graphs of the compiled UNet failed (%s: %s): not used", type(err).__name__, err)
            return self.runner

    def _install(self, timings: dict[str, float]) -> None:
        self.call = (
            self._timed(timings, "cuda_graphs", self._capture_graphs) if self.cuda_graphs else self.runner
        )
        self.unet.forward = self.forward
        log.info("SDXL UNet: compiled for %s latents, batch 1-%d", self.latent_size, MAX_BATCH)

    def covers(self, sample: torch.Tensor, timestep: Any, kwargs: dict[str, Any]) -> bool:
        """True when the compiled graph computes this call exactly like the eager UNet."""
        added = kwargs.get("added_cond_kwargs") or {}
        states = kwargs.get("encoder_hidden_states")
        return (
            tuple(sample.shape[-2:]) == self.latent_size
            and 1 <= sample.shape[0] <= MAX_BATCH
            and sample.dtype == self.unet.dtype
            and isinstance(timestep, torch.Tensor)
            and timestep.ndim == 0
            and timestep.dtype == torch.float32
            and isinstance(states, torch.Tensor)
            and states.shape[1] == TEXT_TOKENS
            and set(added) == {"text_embeds", "time_ids"}
            and all(kwargs.get(name) is None for name in _NONE_KWARGS)
            and set(kwargs) <= {"encoder_hidden_states", "added_cond_kwargs", "return_dict", *_NONE_KWARGS}
        )

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        """The UNet's forward: the compiled graph where it applies, the eager UNet elsewhere."""
        if args or not self.covers(sample, timestep, kwargs):
            return self.eager_forward(sample, timestep, *args, **kwargs)
        added = kwargs["added_cond_kwargs"]
        # The timestep is a view into the schedule, unaligned: the graph would copy it and warn.
        inputs = (
            sample,
            timestep.clone(),
            kwargs["encoder_hidden_states"],
            added["text_embeds"],
            added["time_ids"],
        )
        try:
            out = self.call(*inputs)
        except RuntimeError as err:
            if not self.on_gpu:
                raise
            # Its inputs were checked, so a failure is the device's (AOTInductor reports CUDA errors,
            # out-of-memory too, as a generic "API call failed"): say so, so the worker is replaced.
            raise RuntimeError(f"CUDA error in the compiled SDXL UNet: {err}") from err
        return UNet2DConditionOutput(sample=out) if kwargs.get("return_dict", True) else (out,)
