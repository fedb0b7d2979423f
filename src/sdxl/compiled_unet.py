"""The SDXL UNet compiled ahead of time (AOTInductor): compiled once, loaded in seconds.

- One package (``src/aot_package.py``) at one latent size (1024x1024 images), its batch
  dimension dynamic (1-16 rows: ``num_images`` 1-8, with or without CFG), without weights.
- Calls it was not compiled for (other sizes, ControlNet residuals, ...) run the eager UNet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from src.aot_package import CHANNELS_LAST, AotPackage, DynamicDim
from src.compile_cache import package_identity
from src.fast_path import Route, route
from src.sdxl import TEXT_TOKENS
from src.timing import Phases

log = logging.getLogger(__name__)

MAX_BATCH = 16  # 8 images x 2 CFG rows
FORMAT = 1  # bump when the exported signature changes
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


def sdxl_identity(fmt: int, model: Any, latent_size: tuple[int, int], max_batch: int) -> dict[str, Any]:
    """The identity of an SDXL model's package (the UNet's or the VAE's) at one latent size."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    return package_identity(
        fmt,
        model.device,
        dtype=str(model.dtype),
        latent_size=list(latent_size),
        max_batch=max_batch,
        config=config,
    )


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


class CompiledUnet:
    """The UNet's AOTInductor package at one latent size: a fast path for the UNet's forward."""

    name = "sdxl-unet"
    setting = "COMPILE"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        latent_size: tuple[int, int],
        cache_dir: Path,
        compile_missing: bool = True,
    ) -> None:
        self.unet = unet
        self.latent_size = latent_size
        self.exported = _Exported(unet)  # the call that is compiled, checked against, and named by constants
        self.package = AotPackage(
            self.name,
            self.exported,
            lambda batch: example_inputs(unet, latent_size, batch),
            DynamicDim("batch", 1, MAX_BATCH, checked=(1, 2)),
            lambda batch: ({0: batch}, None, {0: batch}, {0: batch}, {0: batch}),
            sdxl_identity(FORMAT, unet, latent_size, MAX_BATCH),
            cache_dir,
            unet.device,
            inductor=CHANNELS_LAST,
            compile_missing=compile_missing,
        )

    def prepare(self, phases: Phases) -> list[Route]:
        """Load the package (or compile and save it), check it, and route the calls it serves to it."""
        self.package.prepare(phases, "aot")
        log.info("SDXL UNet: compiled for %s latents, batch 1-%d", self.latent_size, MAX_BATCH)
        return [route(self.unet, "forward", self)]

    def serves(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> bool:
        """True when the compiled graph computes this call exactly like the eager UNet."""
        added = kwargs.get("added_cond_kwargs") or {}
        states = kwargs.get("encoder_hidden_states")
        return (
            not args
            and tuple(sample.shape[-2:]) == self.latent_size
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

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> Any:
        """The UNet's forward, from the compiled graph."""
        added = kwargs["added_cond_kwargs"]
        # The timestep is a view into the schedule, unaligned: the graph would copy it and warn.
        inputs = (
            sample,
            timestep.clone(),
            kwargs["encoder_hidden_states"],
            added["text_embeds"],
            added["time_ids"],
        )
        out = self.package.run(inputs, "SDXL UNet")
        return UNet2DConditionOutput(sample=out) if kwargs.get("return_dict", True) else (out,)
