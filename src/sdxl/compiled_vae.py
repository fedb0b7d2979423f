"""The SDXL VAE decode compiled ahead of time (AOTInductor), like the UNet.

One package (``src/aot_package.py``) at one latent size (1024x1024 images), batch 1-8
(``num_images``), without weights. Other sizes, and a VAE with tiling or slicing on, decode
eagerly. How much faster it decodes: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput

from src.aot_package import CHANNELS_LAST, AotPackage, DynamicDim
from src.fast_path import Route, route
from src.sdxl.compiled_unet import sdxl_identity
from src.timing import Phases

log = logging.getLogger(__name__)

MAX_IMAGES = 8
FORMAT = 1  # bump when the exported signature changes


class _Decode(torch.nn.Module):
    """The VAE's decode of latents to images, tensors only (what torch.export takes)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae  # named "vae" in the package's constants
        self.eager_decode = type(vae)._decode.__get__(vae)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.eager_decode(latents, return_dict=False)[0]


class CompiledVaeDecode:
    """The VAE decode's AOTInductor package at one latent size: a fast path for ``vae.decode``."""

    name = "sdxl-vae-decode"
    setting = "COMPILE"

    def __init__(
        self, vae: AutoencoderKL, latent_size: tuple[int, int], cache_dir: Path, compile_missing: bool = True
    ) -> None:
        self.vae = vae
        self.latent_size = latent_size
        device = vae.device
        channels = vae.config.latent_channels
        self.package = AotPackage(
            self.name,
            _Decode(vae),
            lambda batch: (torch.randn(batch, channels, *latent_size, device=device, dtype=vae.dtype),),
            DynamicDim("batch", 1, MAX_IMAGES, checked=(1, 2)),
            lambda batch: ({0: batch},),
            sdxl_identity(FORMAT, vae, latent_size, MAX_IMAGES),
            cache_dir,
            device,
            inductor=CHANNELS_LAST,
            compile_missing=compile_missing,
        )

    def prepare(self, phases: Phases) -> list[Route]:
        """Load the package (or compile and save it), check it, and route the decodes it serves to it."""
        self.package.prepare(phases, "vae_aot")
        log.info("SDXL VAE decode: compiled for %s latents, 1-%d images", self.latent_size, MAX_IMAGES)
        return [route(self.vae, "decode", self)]

    def serves(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> bool:
        """True when the package decodes these latents exactly like the eager VAE."""
        return (
            z.ndim == 4
            and tuple(z.shape[1:]) == (self.vae.config.latent_channels, *self.latent_size)
            and 1 <= z.shape[0] <= MAX_IMAGES
            and z.dtype == self.vae.dtype
            and not self.vae.use_tiling
            and not self.vae.use_slicing
        )

    def __call__(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        """The VAE's decode, from the package."""
        images = self.package.run((z,), "SDXL VAE decode")
        return DecoderOutput(sample=images) if return_dict else (images,)
