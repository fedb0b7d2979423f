"""The Wan 2.1 family: T2V 1.3B for text-only jobs, VACE 1.3B for reference modes.

Both pipelines share one text encoder, tokenizer and VAE in memory.
"""

from __future__ import annotations

import logging
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
from src.fast_path import FastPaths
from src.loras.apply import loras_applied
from src.loras.files import LoraFiles
from src.media.assets import GeneratedImage, GeneratedVideo, Generation
from src.media.images import to_uint8
from src.media.reference import FetchLimits, fetch_reference
from src.models import device_map_kwargs, model_dirs
from src.progress import Progress
from src.settings import Settings
from src.timing import Phases
from src.wan.compiled_blocks import block_kinds
from src.wan.conditioning import vace_inputs
from src.wan.plan import DEFAULTS, FPS, MAX_FRAMES, WanConfig, WanMetadata, WanPlan, plan_wan

log = logging.getLogger(__name__)

WARM_UP = {"width": 64, "height": 64, "num_frames": 5, "num_inference_steps": 1}
# With COMPILE on, the blocks run compiled at every size; inductor tunes them for this one
# (width, height, frames): the default video size.
TUNED_FOR = (832, 480, 81)
# The most tokens a job may have: the largest area (1280x720) at MAX_FRAMES, plus one latent frame for
# VACE's reference image.
MAX_SIZE = (1280, 720, MAX_FRAMES + 4)


def video_tokens(pipe: WanPipeline, width: int, height: int, frames: int) -> int:
    """The transformer's tokens for a video: latent frames x latent height x width, per patch."""
    p_t, p_h, p_w = pipe.transformer.config.patch_size
    latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
    spatial = pipe.vae_scale_factor_spatial
    return (latent_frames // p_t) * (height // spatial // p_h) * (width // spatial // p_w)


class WanFamily:
    """``video_*`` and ``image_*`` jobs on WanPipeline / WanVACEPipeline."""

    name = "wan"
    job_types = frozenset(DEFAULTS)
    config_model = WanConfig
    metadata_model = WanMetadata

    def __init__(
        self,
        text2video: WanPipeline,
        vace: WanVACEPipeline,
        limits: FetchLimits,
        loras: LoraFiles,
        fast_paths: FastPaths,
    ) -> None:
        self.text2video = text2video
        self.vace = vace
        self.limits = limits
        self.loras = loras
        self.fast_paths = fast_paths

    @classmethod
    def load(cls, settings: Settings) -> WanFamily:
        """Load T2V, then VACE's transformer only: encoder, tokenizer and VAE are shared."""
        from src.wan.tiny import build_tiny_wan

        t2v_dir, vace_dir = model_dirs(settings, ["wan-t2v", "wan-vace"], build_tiny_wan)
        device = settings.torch_device
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        log.info("loading Wan T2V from %s and VACE from %s on %s (%s)", t2v_dir, vace_dir, device, dtype)
        on_device = device_map_kwargs(device)
        vae = AutoencoderKLWan.from_pretrained(t2v_dir, subfolder="vae", dtype=torch.float32, **on_device)
        if device.startswith("cuda"):
            acceleration.conv3d_channels_last(vae)
        text2video = WanPipeline.from_pretrained(t2v_dir, vae=vae, dtype=dtype, **on_device)
        vace = WanVACEPipeline(
            tokenizer=text2video.tokenizer,
            text_encoder=text2video.text_encoder,
            vae=vae,
            scheduler=UniPCMultistepScheduler.from_pretrained(vace_dir, subfolder="scheduler"),
            transformer=WanVACETransformer3DModel.from_pretrained(
                vace_dir, subfolder="transformer", dtype=dtype, **on_device
            ),
        )
        for pipe in (text2video, vace):
            if device != "cpu":
                pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
        transformers = [text2video.transformer, vace.transformer]
        attention = acceleration.attention_backend(settings, device)
        acceleration.set_attention_backend(transformers, attention)
        kinds = []
        if acceleration.compile_enabled(settings, device):
            tokens = (video_tokens(text2video, *TUNED_FOR), video_tokens(text2video, *MAX_SIZE))
            kinds = block_kinds(transformers, settings.compile_cache_path, tokens, attention)
        fast_paths = FastPaths(kinds, acceleration.required_settings(settings))
        limits = FetchLimits.from_settings(settings)
        return cls(text2video, vace, limits, LoraFiles.from_settings(settings), fast_paths)

    def warm_up(self, phases: Phases) -> None:
        """Run both pipelines once, small, so the first job pays no first-call cost; then prepare
        the fast paths.

        With COMPILE on, each block kind records its inputs during that run, and its package is
        then loaded (compiled and saved the first time).
        """
        with phases.phase("pipelines"):
            self.text2video("warm-up", **WARM_UP)
            gray = Image.new("RGB", (WARM_UP["width"], WARM_UP["height"]), (128, 128, 128))
            self.vace("warm-up", reference_images=[gray], **WARM_UP)
        self.fast_paths.prepare(phases)

    def plan(self, request: JobRequest) -> WanPlan:
        """Validate the Wan part of the payload."""
        return plan_wan(request)

    def generate(self, plan: WanPlan, progress: Progress) -> Generation:
        """Fetch references and LoRAs, run T2V or VACE with the LoRAs applied (the models are as before
        once it returns), return one video (or one image)."""
        images = {
            mode: fetch_reference(ref.url, ref.field, self.limits) for mode, ref in plan.references.items()
        }
        pipe = self.vace if images else self.text2video
        loras = self.loras.resolve(plan.loras)
        try:
            with loras_applied(pipe, ["transformer"], loras, "Wan"):
                frames = self._run(pipe, plan, images, progress)
        finally:
            self.loras.release(loras)
        metadata: dict[str, Any] = {}
        if plan.denoise_strength is not None:
            metadata["denoise_strength"] = plan.denoise_strength
        if loras:
            metadata["loras"] = [lora.metadata for lora in loras]
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
            asset = GeneratedImage(Image.fromarray(frames[0]), metadata)
        return Generation([asset], reference_mode=plan.reference_mode)

    def _run(
        self,
        pipe: WanPipeline | WanVACEPipeline,
        plan: WanPlan,
        images: dict[str, Image.Image],
        progress: Progress,
    ) -> np.ndarray:
        def on_step(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            progress.step(step + 1, plan.steps)
            return tensors

        width, height = plan.size
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
