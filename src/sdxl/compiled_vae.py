"""The SDXL VAE decode compiled ahead of time (AOTInductor), like the UNet.

One package (``src/aot_package.py``) at one latent size (1024x1024 images), batch 1-8
(``num_images``), without weights. Other sizes, and a VAE with tiling or slicing on, decode
eagerly. On the H100 the same call through inductor took 39 ms instead of 92 ms eager for one
1024x1024 image (``bench/probe.py``, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput

from src.aot_package import CHANNELS_LAST, AotPackage, DynamicDim
from src.sdxl.compiled_unet import sdxl_identity

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
    """The VAE decode's AOTInductor package at one latent size, and the routing to it."""

    def __init__(self, vae: AutoencoderKL, latent_size: tuple[int, int], cache_dir: Path) -> None:
        self.vae = vae
        self.latent_size = latent_size
        self.eager: Callable[..., Any] = type(vae).decode.__get__(vae)
        device = vae.device
        channels = vae.config.latent_channels
        self.package = AotPackage(
            "sdxl-vae-decode",
            _Decode(vae),
            lambda batch: (torch.randn(batch, channels, *latent_size, device=device, dtype=vae.dtype),),
            DynamicDim("batch", 1, MAX_IMAGES, checked=(1, 2)),
            lambda batch: ({0: batch},),
            sdxl_identity(FORMAT, vae, latent_size, MAX_IMAGES),
            cache_dir,
            device,
            inductor=CHANNELS_LAST,
        )

    def prepare(self) -> dict[str, float]:
        """Load the package (or compile and save it), check it, and route matching decodes to it.

        Returns the seconds each phase took. Any failure leaves the eager decode serving.
        """
        timings: dict[str, float] = {}
        if self.package.prepare(timings, "vae_aot"):
            self.vae.decode = self.decode
            log.info("SDXL VAE decode: compiled for %s latents, 1-%d images", self.latent_size, MAX_IMAGES)
        return timings

    def covers(self, latents: torch.Tensor) -> bool:
        """True when the package decodes these latents exactly like the eager VAE."""
        return (
            latents.ndim == 4
            and tuple(latents.shape[1:]) == (self.vae.config.latent_channels, *self.latent_size)
            and 1 <= latents.shape[0] <= MAX_IMAGES
            and latents.dtype == self.vae.dtype
            and not self.vae.use_tiling
            and not self.vae.use_slicing
        )

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        """The VAE's decode: the package where it applies, the eager decode elsewhere."""
        if not self.covers(z):
            return self.eager(z, return_dict=return_dict, generator=generator)
        images = self.package.run((z,), "SDXL VAE decode")
        return DecoderOutput(sample=images) if return_dict else (images,)
