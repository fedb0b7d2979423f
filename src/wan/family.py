"""The Wan 2.1 family: T2V 1.3B for text-only jobs, VACE 1.3B for reference modes.

Both pipelines share one text encoder, tokenizer and VAE in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanPipeline,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from PIL import Image

from src import acceleration
from src.contract import JobRequest
from src.media.assets import GeneratedImage, GeneratedVideo, Generation, encode_image_async
from src.media.images import to_uint8
from src.media.reference import FetchLimits, fetch_reference
from src.models import model_dirs
from src.progress import Progress
from src.settings import Settings
from src.wan.conditioning import vace_inputs
from src.wan.plan import DEFAULTS, FPS, WanPlan, plan_wan

log = logging.getLogger(__name__)

WARM_UP = {"width": 64, "height": 64, "num_frames": 5, "num_inference_steps": 1}
# Shapes compiled at start-up when COMPILE is on: (width, height, frames). VACE is warmed with
# and without a reference image (which adds one latent frame); other shapes run eagerly.
COMPILED_SHAPES = ((832, 480, 81),)
TEXT_TOKENS = 512  # WanPipeline's max_sequence_length


class WanFamily:
    """``video_*`` and ``image_*`` jobs on WanPipeline / WanVACEPipeline."""

    name = "wan"
    job_types = frozenset(DEFAULTS)

    def __init__(
        self, text2video: WanPipeline, vace: WanVACEPipeline, limits: FetchLimits, compiled: bool = False
    ) -> None:
        self.text2video = text2video
        self.vace = vace
        self.limits = limits
        self.compiled = compiled

    @classmethod
    def load(cls, settings: Settings) -> WanFamily:
        """Load T2V, then VACE's transformer only: encoder, tokenizer and VAE are shared."""
        from src.wan.tiny import build_tiny_wan

        t2v_dir, vace_dir = model_dirs(settings, ["wan-t2v", "wan-vace"], build_tiny_wan)
        device = settings.torch_device
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        log.info("loading Wan T2V from %s and VACE from %s on %s (%s)", t2v_dir, vace_dir, device, dtype)
        vae = AutoencoderKLWan.from_pretrained(t2v_dir, subfolder="vae", dtype=torch.float32)
        text2video = WanPipeline.from_pretrained(t2v_dir, vae=vae, dtype=dtype)
        vace = WanVACEPipeline(
            tokenizer=text2video.tokenizer,
            text_encoder=text2video.text_encoder,
            vae=vae,
            scheduler=UniPCMultistepScheduler.from_pretrained(vace_dir, subfolder="scheduler"),
            transformer=WanVACETransformer3DModel.from_pretrained(
                vace_dir, subfolder="transformer", dtype=dtype
            ),
        )
        for pipe in (text2video, vace):
            if device != "cpu":
                pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
        transformers = (text2video.transformer, vace.transformer)
        acceleration.set_attention_backend(transformers, acceleration.attention_backend(settings, device))
        compiled = acceleration.compile_enabled(settings, device)
        if compiled:
            for transformer in transformers:
                acceleration.compile_repeated_blocks(transformer)
        limits = FetchLimits.from_settings(settings)
        return cls(text2video, vace, limits, compiled)

    def warm_up(self) -> dict[str, float]:
        """Run both pipelines once, small, so the first job pays no first-call cost.

        With COMPILE on, the transformers' blocks also compile here, at COMPILED_SHAPES
        (the small pipeline run stays eager so that it compiles nothing). Returns the
        seconds of each phase.
        """
        timings: dict[str, float] = {}
        started = time.perf_counter()
        with torch.compiler.set_stance("force_eager") if self.compiled else nullcontext():
            self.text2video("warm-up", **WARM_UP)
            gray = Image.new("RGB", (WARM_UP["width"], WARM_UP["height"]), (128, 128, 128))
            self.vace("warm-up", reference_images=[gray], **WARM_UP)
        timings["pipelines"] = round(time.perf_counter() - started, 2)
        if self.compiled:
            for width, height, frames in COMPILED_SHAPES:
                self._warm_transformers(width, height, frames, timings)
        return timings

    def _warm_transformers(self, width: int, height: int, frames: int, timings: dict[str, float]) -> None:
        """Call each transformer as the pipelines do (bf16 inputs, CFG batch 1) at one shape."""
        pipe = self.text2video
        transformer = pipe.transformer
        device, dtype = transformer.device, transformer.dtype
        latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
        latent_size = (height // pipe.vae_scale_factor_spatial, width // pipe.vae_scale_factor_spatial)
        text = torch.randn(1, TEXT_TOKENS, transformer.config.text_dim, device=device, dtype=dtype)
        timestep = torch.tensor([999], device=device)
        channels = transformer.config.in_channels
        vace = self.vace.transformer
        scale = torch.ones(len(vace.config.vace_layers), device=device, dtype=dtype)

        def timed(name: str, call: Callable[[], Any]) -> None:
            started = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings[name] = round(time.perf_counter() - started, 2)

        with torch.inference_mode():
            latents = torch.randn(1, channels, latent_frames, *latent_size, device=device, dtype=dtype)
            timed("t2v", lambda: transformer(latents, timestep, text, return_dict=False))
            for extra_frames in (0, 1):  # start/end/both modes; single mode (reference frame prepended)
                shape = (latent_frames + extra_frames, *latent_size)
                noisy = torch.randn(1, channels, *shape, device=device, dtype=dtype)
                control = torch.randn(1, vace.config.vace_in_channels, *shape, device=device, dtype=dtype)
                timed(
                    f"vace_{latent_frames + extra_frames}_frames",
                    lambda noisy=noisy, control=control: vace(
                        hidden_states=noisy,
                        timestep=timestep,
                        encoder_hidden_states=text,
                        control_hidden_states=control,
                        control_hidden_states_scale=scale,
                        return_dict=False,
                    ),
                )

    def plan(self, request: JobRequest) -> WanPlan:
        """Validate the Wan part of the payload."""
        return plan_wan(request)

    def generate(self, plan: WanPlan, progress: Progress) -> Generation:
        """Fetch references, run T2V or VACE, return one video (or one image)."""
        images = {
            mode: fetch_reference(ref.url, ref.field, self.limits) for mode, ref in plan.references.items()
        }
        frames = self._run(plan, images, progress)
        metadata: dict[str, Any] = {}
        if plan.denoise_strength is not None:
            metadata["denoise_strength"] = plan.denoise_strength
        if plan.is_video:
            metadata.update(generation_seed=plan.seed, seed=plan.seed)
            asset: GeneratedImage | GeneratedVideo = GeneratedVideo(frames, FPS, metadata)
        else:
            metadata.update(
                steps=plan.steps,
                guidance_scale=plan.guidance_scale,
                seed=plan.seed,
                generation_seed=plan.seed,
            )
            image = Image.fromarray(frames[0])
            asset = GeneratedImage(image, metadata, encoded=encode_image_async(image))
        return Generation([asset], reference_mode=plan.reference_mode)

    def _run(self, plan: WanPlan, images: dict[str, Image.Image], progress: Progress) -> np.ndarray:
        def on_step(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            progress.step(step + 1, plan.steps)
            return tensors

        width, height = plan.size
        pipe = self.vace if images else self.text2video
        pipe.scheduler = UniPCMultistepScheduler.from_config(
            pipe.scheduler.config, flow_shift=plan.flow_shift
        )
        extra = vace_inputs(plan, images) if images else {}
        with torch.inference_mode():
            output = pipe(
                prompt=plan.prompt,
                negative_prompt=plan.negative_prompt,
                width=width,
                height=height,
                num_frames=plan.num_frames,
                num_inference_steps=plan.steps,
                guidance_scale=plan.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(plan.seed),
                callback_on_step_end=on_step,
                output_type="pt",
                **extra,
            )
            return to_uint8(output.frames[0])  # frames [T, 3, H, W]
